"""LoRA on a loaded DiT, per request and unmerged: a rank's adapter store and the hooks that apply it.

Why ours: diffusers/peft keep one set of active adapters per model object (``set_adapters``), a
process-wide switch that one request changes for every other; vLLM-Omni keeps one active adapter.
Here the base weights never change: each targeted linear gets a ``ModelHook`` (``ditserve_lora``)
that adds ``sum_i scale_i * scaling_i * (x @ A_i.T) @ B_i.T`` for the adapters of *the active
request* (``models.context.request_state``), so consecutive requests with different adapters, or
none, need no reload and nothing leaks from one request into the next — a failed request's
adapters go with its context. Several adapters are concatenated along the rank dimension once per
request and module (one pair of matmuls, not one per adapter).

``LoraStore`` is one rank's LRU: ``max_loras_per_replica`` adapters on the device,
``max_cpu_loras`` more in CPU memory, the rest read from ``lora_dir`` again when asked. Every rank
of a DiT group loads the same adapters for a request (they all receive it) and then agrees that all
succeeded (``# collective:`` below) before any computes, so one rank's failure fails the request
on all of them alike and leaves the group serving.

Tensor parallel: a ``Sharder`` (given by the caller; ``parallel/`` owns the layout) cuts each
adapter like the linear it adapts — column-sharded: ``B``'s rows; row-sharded: ``A``'s columns,
with the rank-``r`` intermediate summed over the group (a small all-reduce) before ``B``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from ditserve.models.context import active_request, request_state

from ..reducer import Reducer
from .config import LoraConfig, LoraError
from .files import AdapterWeights, adapter_path, read_adapter

logger = logging.getLogger(__name__)

HOOK_NAME = "ditserve_lora"
STATE_KEY = "lora"  # this feature's slot in the request's state

Reduce = Callable[[torch.Tensor], torch.Tensor]


class Sharder(Protocol):
    """How an adapter follows this rank's shard of a linear (``parallel.tensor`` implements it)."""

    def full_features(self, module: torch.nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the whole, unsharded linear."""
        ...

    def shard(self, module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Reduce | None]:
        """This rank's (A, B) and the sum over the group the intermediate needs (``None``: none)."""
        ...


class WholeLinears:
    """No tensor parallelism: every linear is whole."""

    def full_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def shard(self, module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Reduce | None]:
        return a, b, None


@dataclasses.dataclass
class LoadedLora:
    """An adapter on one rank: per module this rank's ``A`` (r, in) and ``B`` (out, r) with the
    adapter's own ``alpha / r`` folded into ``B``, and the module's group sum (row-sharded)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, Reduce | None]]

    def to(self, device: torch.device | str) -> LoadedLora:
        return LoadedLora(self.name, {m: (a.to(device), b.to(device), r) for m, (a, b, r) in self.modules.items()})

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values())


@dataclasses.dataclass
class LoraStats:
    """What the store did (this rank; the same on every rank of a group)."""

    loads: int = 0  # read from lora_dir
    hits: int = 0  # already on the device
    restores: int = 0  # moved back from CPU memory
    evictions: int = 0  # moved off the device
    load_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def counts_since(self, before: LoraStats) -> dict[str, int]:
        """What happened since ``before`` (a copy taken earlier): loads, hits, restores, evictions."""
        names = ("loads", "hits", "restores", "evictions")
        return {name: getattr(self, name) - getattr(before, name) for name in names}


class LoraRun:
    """One request's adapters and their per-module concatenation (built on first use)."""

    def __init__(self, adapters: Sequence[tuple[LoadedLora, float]]) -> None:
        self.adapters = list(adapters)
        self.names = [a.name for a, _ in adapters]
        self._fused: dict[str, tuple[torch.Tensor, torch.Tensor, Reduce | None] | None] = {}

    def weights(self, module: str) -> tuple[torch.Tensor, torch.Tensor, Reduce | None] | None:
        if module not in self._fused:
            parts = [(adapter.modules[module], scale) for adapter, scale in self.adapters if module in adapter.modules]
            if not parts:
                self._fused[module] = None
            else:
                a = torch.cat([p[0] for p, _ in parts])
                b = torch.cat([p[1] * scale for p, scale in parts], dim=1)
                self._fused[module] = (a, b, parts[0][0][2])
        return self._fused[module]


def _active_run() -> LoraRun | None:
    request = active_request()
    return None if request is None else request.state.get(STATE_KEY, {}).get("run")


class _LoraHook(ModelHook):
    """Adds the active request's low-rank update to one linear's output (idle without one)."""

    def __init__(self, module_name: str) -> None:
        super().__init__()
        self.module_name = module_name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        run = _active_run()
        weights = None if run is None else run.weights(self.module_name)
        if weights is None:
            return out
        a, b, reduce = weights
        x = args[0] if args else kwargs["input"]
        h = F.linear(x.to(a.dtype), a)
        if reduce is not None:
            h = reduce(h.contiguous())  # row-sharded linear: x @ A.T is a partial sum over the group
        return out + F.linear(h, b).to(out.dtype)


class LoraStore:
    """One rank's adapters: an LRU on the device, another in CPU memory, hooks on the targeted linears.

    Args:
        transformer: the loaded DiT (this rank's shards under TP).
        config: the deployment's ``LoraConfig``.
        loader: the family pipeline class (its diffusers LoRA mixin reads community formats).
        device, dtype: where and in what precision adapters compute (the DiT's).
        sharder: the TP layout (default: whole linears).
        reducers: the groups whose product is the DiT world (``# collective:`` agreement on loads).
    """

    def __init__(self, transformer: torch.nn.Module, config: LoraConfig, loader: type, device: torch.device | str,
                 dtype: torch.dtype, sharder: Sharder | None = None, reducers: Sequence[Reducer] = ()) -> None:
        self.transformer = transformer
        self.config = config
        self.loader = loader
        self.device, self.dtype = torch.device(device), dtype
        self.sharder = sharder or WholeLinears()
        self.reducers = list(reducers)
        self.on_device: collections.OrderedDict[str, LoadedLora] = collections.OrderedDict()
        self.on_cpu: collections.OrderedDict[str, LoadedLora] = collections.OrderedDict()
        self.stats = LoraStats()
        self._hooked: set[str] = set()
        # name -> module, once: adapters are checked, sharded and hooked by name on every load
        self._modules = dict(transformer.named_modules())

    # ---- loading ---------------------------------------------------------------------------------

    def _check(self, weights: AdapterWeights) -> None:
        for name, lora in weights.modules.items():
            module = self._modules.get(name)
            key = f"transformer.{name}.lora_A.weight"
            if module is None or not hasattr(module, "in_features"):
                what = "no such module" if module is None else f"a {type(module).__name__}, not a linear"
                raise LoraError("lora.name", f"adapter {weights.name!r} does not fit this model: {key} targets {name} "
                                f"({what}); is it a LoRA for another model?")
            n_in, n_out = self.sharder.full_features(module)
            if lora.a.shape[1] != n_in or lora.b.shape[0] != n_out:
                raise LoraError("lora.name", f"adapter {weights.name!r} does not fit this model: {key} is "
                                f"{tuple(lora.a.shape)} / lora_B {tuple(lora.b.shape)}, but {name} maps {n_in} -> {n_out} "
                                "features; is it a LoRA for another model or size?")

    def _read(self, name: str) -> LoadedLora:
        path = adapter_path(self.config.lora_dir, name)
        weights = read_adapter(Path(path), name, self.loader)
        self._check(weights)
        out = {}
        for module_name, lora in weights.modules.items():
            a, b, reduce = self.sharder.shard(self._modules[module_name], lora.a, lora.b * lora.scaling)
            out[module_name] = (a.to(self.device, self.dtype), b.to(self.device, self.dtype), reduce)
        return LoadedLora(name, out)

    def _hook(self, loaded: LoadedLora) -> None:
        for name in loaded.modules:
            if name not in self._hooked:
                HookRegistry.check_if_exists_or_initialize(self._modules[name]).register_hook(_LoraHook(name), HOOK_NAME)
                self._hooked.add(name)

    def _evict(self, keep: set[str]) -> None:
        while len(self.on_device) > self.config.max_loras_per_replica:
            victim = next(n for n in self.on_device if n not in keep)
            loaded = self.on_device.pop(victim)
            self.stats.evictions += 1
            if self.config.max_cpu_loras > 0:
                self.on_cpu[victim] = loaded.to("cpu")
                while len(self.on_cpu) > self.config.max_cpu_loras:
                    self.on_cpu.popitem(last=False)
            logger.info("LoRA %r evicted from %s (%s)", victim, self.device,
                        "kept in CPU memory" if self.config.max_cpu_loras > 0 else "dropped")

    def _ensure(self, name: str, keep: set[str]) -> LoadedLora:
        if name in self.on_device:
            self.stats.hits += 1
            self.on_device.move_to_end(name)
            return self.on_device[name]
        start = time.perf_counter()
        if name in self.on_cpu:
            loaded = self.on_cpu.pop(name).to(self.device)
            self.stats.restores += 1
            source = "CPU memory"
        else:
            loaded = self._read(name)
            self.stats.loads += 1
            source = "lora_dir"
        self._hook(loaded)
        self.on_device[name] = loaded
        self._evict(keep)
        seconds = time.perf_counter() - start
        self.stats.load_s += seconds
        logger.info("LoRA %r loaded from %s in %.3f s (%.1f MiB, %d modules)", name, source, seconds,
                    loaded.nbytes / 2**20, len(loaded.modules))
        return loaded

    def acquire(self, names: Sequence[str]) -> list[LoadedLora]:
        """The adapters ``names`` on the device (loaded, restored or already there), agreed by every
        rank of the group: if any rank fails, all raise.

        Raises:
            LoraError: this rank could not load one (named), or another rank could not.
        """
        error: BaseException | None = None
        loaded: list[LoadedLora] = []
        try:
            loaded = [self._ensure(name, set(names)) for name in names]
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the group agreed
            error = exc
        # collective: every rank learns whether any rank failed, so all leave the request together
        # instead of some entering the denoising collectives while others have raised
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.device)  # the group's device
        for reducer in self.reducers:
            reducer.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item() > 0:
            raise LoraError("lora.name", f"loading {', '.join(names)} failed on another rank of this DiT group "
                            "(see that rank's log)", status=500)
        return loaded

    # ---- per request -------------------------------------------------------------------------------

    def prepare(self, loras: Sequence[tuple[str, float]]) -> LoraRun:
        """The run of ``loras`` ((name, scale) pairs): every adapter on the device, agreed by the group."""
        loaded = self.acquire([name for name, _ in loras])
        return LoraRun([(adapter, scale) for adapter, (_, scale) in zip(loaded, loras)])

    @staticmethod
    @contextlib.contextmanager
    def activated(run: LoraRun) -> Iterator[LoraRun]:
        """``run`` applies to the active request's forward calls inside the block (and to no other)."""
        state = request_state(STATE_KEY)
        state["run"] = run
        try:
            yield run
        finally:
            state.pop("run", None)

    @contextlib.contextmanager
    def run(self, loras: Sequence[tuple[str, float]]) -> Iterator[LoraRun]:
        """``prepare`` then ``activated``, for the active request."""
        with self.activated(self.prepare(loras)) as run:
            yield run

    def remove(self) -> None:
        """Remove every hook and drop every adapter (the base model is as loaded)."""
        for name in self._hooked:
            HookRegistry.check_if_exists_or_initialize(self._modules[name]).remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()
        self.on_device.clear()
        self.on_cpu.clear()
