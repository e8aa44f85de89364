"""Model-level offload: a stage's modules wait in host memory and move to the device for the stage's
call, taking turns with the other stages on the same GPU.

Why ours: diffusers' ``enable_model_cpu_offload`` moves the components of *one pipeline* in turn in
one process; here the text encoder, DiT and VAE are separate deployments (often separate
processes) that may share one GPU, so the turns are a per-GPU lease that processes share: an
``fcntl`` lock on a file named after the GPU's UUID in the node's temp folder. A stage holds the
lease from its onload to its offload, so the GPU's peak is the largest stage, not the sum.

``apply_model_offload(modules, device)`` offloads the modules and registers a hook named
``ditserve_offload`` on each; ``offload_session(modules)`` (the stage objects wrap each call in it)
takes the lease, onloads, and offloads at the end. A direct call of a module outside a session
(tools, tests) gets a session of its own from the hook — for ``forward`` only (a VAE's ``decode``
needs the session).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .weights import MemoryTier, Weights

HOOK_NAME = "ditserve_offload"


class DeviceLease(Protocol):
    """Turns on one device: at most one holder at a time, across processes."""

    def hold(self) -> contextlib.AbstractContextManager[None]: ...


class FileLease:
    """An exclusive ``fcntl.flock`` on ``path``: every process (and thread: each hold opens its own
    file description) that holds the same path takes turns."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with open(self.path, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class NoLease:
    """No turns: on CPU the weights are onloaded into the memory they wait in, nothing to share."""

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def device_lease(device: torch.device | str, folder: str | None = None) -> DeviceLease:
    """The lease of ``device`` that every stage on this node computing on it shares.

    Args:
        folder: where the lock files live (default: ``<tempdir>/ditserve-leases``; one per node).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return NoLease()
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    # the UUID names the physical GPU whatever CUDA_VISIBLE_DEVICES each process was given
    key = str(getattr(props, "uuid", "") or f"{props.name}-{getattr(props, 'pci_bus_id', index)}")
    folder = folder or os.path.join(tempfile.gettempdir(), "ditserve-leases")
    return FileLease(os.path.join(folder, f"gpu-{key}.lock"))


class ModelOffload:
    """One stage's modules as one offloaded unit, onloaded for a session under the device lease."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device, lease: DeviceLease) -> None:
        self.weights = Weights(modules, device, MemoryTier(pin=torch.device(device).type == "cuda"))
        self.lease = lease
        self._lock = threading.RLock()  # one thread at a time computes with these modules
        self._depth = 0
        self.onloads = 0  # sessions that moved the weights (tests, benchmarks)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The modules on the device inside (nested sessions share the outer one)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with self.lease.hold():
                self.weights.onload()
                self.onloads += 1
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    self.weights.offload()


class _SessionHook(ModelHook):
    """A direct call of the module outside a stage's session gets one of its own."""

    def __init__(self, offload: ModelOffload) -> None:
        super().__init__()
        self.offload = offload

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with self.offload.session():
            return self.fn_ref.original_forward(*args, **kwargs)


def apply_model_offload(modules: Sequence[torch.nn.Module], device: torch.device | str,
                        lease: DeviceLease | None = None) -> ModelOffload:
    """Offload ``modules`` (one stage's) as one unit that onloads to ``device`` for a session.

    Args:
        lease: the device's turns (default: ``device_lease(device)``; tests pass their own).
    """
    device = torch.device(device)
    offload = ModelOffload(modules, device, lease or device_lease(device))
    for module in modules:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_SessionHook(offload), HOOK_NAME)
    return offload


def model_offload_of(modules: Sequence[torch.nn.Module]) -> list[ModelOffload]:
    """The model-level offloads registered on ``modules`` (each once)."""
    out: list[ModelOffload] = []
    for module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if registry is not None else None
        if isinstance(hook, _SessionHook) and hook.offload not in out:
            out.append(hook.offload)
    return out


@contextlib.contextmanager
def offload_session(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Onload the model-level offloaded ``modules`` for the block inside (others: no-op)."""
    with contextlib.ExitStack() as stack:
        for offload in model_offload_of(modules):
            stack.enter_context(offload.session())
        yield


def remove_model_offload(modules: Sequence[torch.nn.Module]) -> None:
    """Put the modules back on the device for good and remove the hooks."""
    for offload in model_offload_of(modules):
        offload.weights.close()
    for module in modules:
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
