"""The weights of a set of modules, on the device or waiting in a host tier, moved as one unit.

A ``Weights`` unit (one block group, or one stage's modules) owns every tensor its modules hold
directly — parameters *and* buffers, whatever their dtype (fp8 storage and its scales move like
float weights; a LoRA adapter's tensors inside a block move with it). Offloaded, each tensor is an
empty placeholder on the device (so a call that forgets to onload fails loudly instead of running on
host memory) and its value waits in a ``HostTier``:

- ``MemoryTier``: a host copy (pinned when the device is CUDA, so copies can be asynchronous);
- ``DiskTier``: one safetensors file per unit, read back through mmap;
- either of them holding only this rank's 1/N of every tensor's bytes (``shard_over``): the
  sequence-parallel group all-gathers the tensor before use (``Gatherer``, passed in).

On CPU the "device" copy is a separate tensor (a clone of the host tier), so the same code runs and
residency can be counted. On CUDA, ``prefetch`` copies on a side stream and ``onload`` makes the
compute stream wait for it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Gatherer(Protocol):
    """The ranks that share a sharded host copy (a ``parallel.groups.Group`` is one)."""

    @property
    def size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Equal-shaped tensors of every member, in group order."""
        ...


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One tensor a module holds directly: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: torch.nn.Module
    name: str
    is_param: bool
    shape: torch.Size
    dtype: torch.dtype

    def get(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    def set(self, value: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = value
        else:
            self.module._buffers[self.name] = value

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _slots(modules: Iterable[torch.nn.Module]) -> list[_Slot]:
    """Every parameter and buffer held by ``modules`` or their children, each tensor once."""
    seen: set[int] = set()
    out = []
    for root in modules:
        for module in root.modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    out.append(_Slot(module, name, is_param, tensor.shape, tensor.dtype))
    return out


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(flat: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return flat.view(dtype).reshape(shape)


class HostTier:
    """Where the tensors of one unit wait (their full bytes, or this rank's share of them)."""

    def prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        """One tensor as the tier keeps it, taken before the unit's own tensor is dropped (so a
        model is never held twice in host memory, only one tensor at a time)."""
        return tensor.detach()  # a new tensor on the same storage: it outlives the parameter's swap

    def put(self, tensors: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def get(self) -> list[torch.Tensor]:
        """The stored tensors (host memory), in ``put`` order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class MemoryTier(HostTier):
    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.tensors: list[torch.Tensor] = []

    def prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        # a tensor already on the host is kept as it is (the unit's own becomes a placeholder, and
        # every onload makes a new device copy); pinning copies
        host = tensor.detach().to("cpu")
        return host.pin_memory() if self.pin else host

    def put(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    def close(self) -> None:
        self.tensors = []

    def get(self) -> list[torch.Tensor]:
        return self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class DiskTier(HostTier):
    """One safetensors file; ``get`` reads it through ``safe_open`` (mmap), so the host keeps no copy
    beyond the page cache."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0
        self._nbytes = 0

    def put(self, tensors: Sequence[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        # stored as raw bytes: any dtype (fp8, bool) round-trips exactly
        save_file({str(i): _as_bytes(t).cpu().clone() for i, t in enumerate(tensors)}, self.path)
        self.count = len(tensors)
        self._nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def get(self) -> list[torch.Tensor]:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt", device="cpu") as f:
            return [f.get_tensor(str(i)) for i in range(self.count)]

    def close(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    @property
    def nbytes(self) -> int:
        return self._nbytes


class Weights:
    """The tensors of ``modules``, onloaded to ``device`` or offloaded to ``tier`` as one unit.

    Args:
        modules: the modules whose parameters and buffers move together.
        device: the onload (compute) device.
        tier: where offloaded tensors wait.
        shard_over: keep only this rank's 1/N of every tensor in ``tier`` and all-gather at onload.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device, tier: HostTier,
                 shard_over: Gatherer | None = None) -> None:
        self.device = torch.device(device)
        self.tier = tier
        self.shard = shard_over if shard_over is not None and shard_over.size > 1 else None
        self.slots = _slots(modules)
        self.nbytes = sum(s.nbytes for s in self.slots)  # on the device when onloaded
        self.resident = False
        self._pending: list[torch.Tensor] | None = None  # prefetched, not yet swapped in
        self._event: torch.cuda.Event | None = None
        with _plain_tensors():
            parts = []
            for slot in self.slots:
                parts.append(self.tier.prepare(self._host_part(slot.get())))
                slot.set(torch.empty(0, dtype=slot.dtype, device=self.device))
            self.tier.put(parts)

    # ---- host side ------------------------------------------------------------------------------

    def _host_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """What the tier keeps of ``tensor``: all of it, or this rank's chunk of its (padded) bytes."""
        if self.shard is None:
            return tensor
        flat = _as_bytes(tensor)
        n = self.shard.size
        chunk = -(-flat.numel() // n)
        padded = torch.nn.functional.pad(flat, (0, chunk * n - flat.numel())) if chunk * n != flat.numel() else flat
        return padded[self.shard.rank * chunk:(self.shard.rank + 1) * chunk].clone()

    def _set_placeholders(self) -> None:
        for s in self.slots:
            s.set(torch.empty(0, dtype=s.dtype, device=self.device))

    # ---- moves ----------------------------------------------------------------------------------

    @property
    def materialized(self) -> bool:
        """Whether this unit's tensors take memory on the device (resident or prefetched)."""
        return self.resident or self._pending is not None

    def prefetch(self, stream: torch.cuda.Stream | None = None) -> None:
        """Start copying the host tier to the device (on ``stream`` when given, CUDA); ``onload``
        finishes it. On CPU the copy is made now, in order."""
        if self.materialized:
            return
        with _plain_tensors():
            host = self.tier.get()
            if stream is not None:
                with torch.cuda.stream(stream):
                    self._pending = [h.to(self.device, non_blocking=True) for h in host]
                    self._event = torch.cuda.Event()
                    self._event.record(stream)
            else:
                self._pending = [self._copy(h) for h in host]

    def _copy(self, host: torch.Tensor) -> torch.Tensor:
        # on CPU the device copy is a separate tensor, as it would be on an accelerator
        return host.clone() if host.device == self.device else host.to(self.device, non_blocking=True)

    def onload(self) -> None:
        """Make the tensors live on the device (waits for a prefetch; all-gathers sharded copies)."""
        if self.resident:
            return
        if self._pending is None:
            self.prefetch()
        parts, self._pending = self._pending, None
        with _plain_tensors():
            if self._event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(self._event)
                for t in parts:  # allocated on the copy stream, used on this one
                    t.record_stream(current)
                self._event = None
            for slot, part in zip(self.slots, parts):
                if self.shard is not None:
                    # collective: every rank of the group onloads the same units in the same order
                    # (the forward is the same on every rank; cache skips are decided collectively)
                    full = torch.cat(self.shard.all_gather(part))[: slot.nbytes]
                    part = _from_bytes(full, slot.shape, slot.dtype)
                elif isinstance(self.tier, DiskTier):  # stored as bytes
                    part = _from_bytes(part, slot.shape, slot.dtype)
                slot.set(part)
        self.resident = True

    def offload(self) -> None:
        """Drop the device tensors (the host tier still has them); also drops a pending prefetch."""
        if not self.materialized:
            return
        with _plain_tensors():
            self._set_placeholders()
        self._pending = self._event = None
        self.resident = False

    def close(self) -> None:
        """Restore the tensors on the device for good and release the tier (feature removal)."""
        if not self.resident and self.shard is None and isinstance(self.tier, MemoryTier) and \
                self.device.type == "cpu":
            with _plain_tensors():  # the host copy is on the device already: hand it back, no copy
                for slot, host in zip(self.slots, self.tier.get()):
                    slot.set(host)
            self._pending = self._event = None
            self.resident = True
        else:
            self.onload()
        self.tier.close()


class _plain_tensors:
    """Tensor swaps make ordinary tensors even inside ``inference_mode`` (modules outlive a request)."""

    def __enter__(self) -> None:
        self._stack = [torch.inference_mode(False), torch.no_grad()]
        for ctx in self._stack:
            ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        for ctx in reversed(self._stack):
            ctx.__exit__(*exc)


def make_tier(kind: str, device: torch.device, folder: str | None, name: str) -> HostTier:
    """A host tier: ``cpu`` (memory, pinned for CUDA) or ``disk`` (``folder``/``name``.safetensors;
    the folder must be private to this process: see ``disk_folder``)."""
    if kind == "disk":
        if folder is None:
            raise ValueError("the disk tier needs a folder")
        return DiskTier(os.path.join(folder, f"{name}.safetensors"))
    return MemoryTier(pin=torch.device(device).type == "cuda")


def disk_folder(parent: str | None) -> str:
    """A new folder for one model's block files, under ``parent`` (default: the temp dir), so ranks
    and replicas sharing a disk never write the same file."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="ditserve-offload-", dir=parent)
