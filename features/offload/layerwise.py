"""Layerwise offload of a DiT: its transformer blocks wait on the host, one group computes while the
next is prefetched, so at most two groups' weights are on the device.

Why ours, not diffusers' group offloading (``apply_group_offloading`` with streams): ours must (1)
sit *inside* the block caches' hooks, so a block the cache skips is never onloaded, and must not
prefetch a block the cache may skip in this call (diffusers prefetches by a recorded execution
order, blind to skips); (2) move every tensor of a block, whatever it is (fp8 storage and scales,
a LoRA adapter's tensors) — the same ``Weights`` unit model-level offload uses; (3) keep the host
copy sharded over the sequence-parallel group and all-gather it before use; and (4) add a disk
tier. It also runs on CPU (the "device" copy a separate tensor), so residency is tested there.

Hooks (diffusers ``HookRegistry``): ``ditserve_offload`` on every block — its ``pre_forward``
onloads the block's group (waiting for its prefetch), evicts any other group and prefetches the
next one — and ``ditserve_offload_call`` on the transformer, which evicts every group when the
call ends (nothing stays between steps or requests). The block hooks must be registered before the
cache's (a hook registered later wraps the earlier ones): the feature table orders them so.
"""

from __future__ import annotations

import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .config import OffloadConfig
from .weights import Gatherer, Weights, disk_folder, make_tier

HOOK_NAME = "ditserve_offload"
CALL_HOOK_NAME = "ditserve_offload_call"

SkipHint = Callable[[int, int], bool]  # (block index, index of the block now starting) -> may be skipped


class LayerwiseOffload:
    """The block groups of one transformer and where each is.

    Attributes:
        units: one ``Weights`` per group of ``offload_blocks_per_group`` blocks, in call order.
        onloads: groups moved to the device so far (prefetched or onloaded on demand).
        max_blocks_materialized: the most blocks on the device at one time so far.
        max_device_bytes: the most block bytes on the device at one time so far.
    """

    def __init__(self, transformer: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device,
                 config: OffloadConfig, gather: Gatherer | None = None, skip_hint: SkipHint | None = None) -> None:
        self.transformer = transformer
        self.blocks = list(blocks)
        self.per_group = config.offload_blocks_per_group
        self.device = torch.device(device)
        self.skip_hint = skip_hint
        self.folder = disk_folder(config.offload_disk_dir) if config.offload_device == "disk" else None
        if self.folder is not None:  # the files go with the model, removed or not
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        groups = [self.blocks[i:i + self.per_group] for i in range(0, len(self.blocks), self.per_group)]
        self.units = [Weights(g, self.device, make_tier(config.offload_device, self.device, self.folder, f"group{k}"),
                              shard_over=gather if config.offload_shard_host_copy else None)
                      for k, g in enumerate(groups)]
        self.prefetching = config.offload_prefetch
        # a copy stream only where copies can overlap compute (CUDA)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.prefetching else None
        self.current: int | None = None
        self._next_asked = False  # the current group's call asked for the next group
        self.onloads = 0
        self.max_blocks_materialized = 0
        self.max_device_bytes = 0
        self._lock = threading.RLock()  # one call at a time moves this transformer's blocks

    @property
    def blocks_materialized(self) -> int:
        return sum(len(self._group(k)) for k, u in enumerate(self.units) if u.materialized)

    def _group(self, k: int) -> list[torch.nn.Module]:
        return self.blocks[k * self.per_group:(k + 1) * self.per_group]

    def host_bytes(self) -> int:
        """Bytes this rank keeps in its host tier (memory or disk)."""
        return sum(u.tier.nbytes for u in self.units)

    def device_bytes(self) -> int:
        """Block bytes on the device now."""
        return sum(u.nbytes for u in self.units if u.materialized)

    def enter(self, index: int, *, prefetch: bool = True) -> None:
        """Block ``index`` is about to compute: its group on the device, the next one on its way.

        Args:
            prefetch: ``False`` for a caller that reads the block's weights before the block runs
                (TeaCache's probe of block 0): only its group comes; the block's own call, if it
                comes, prefetches the next.
        """
        k = index // self.per_group
        if k != self.current:
            for j, unit in enumerate(self.units):
                if j != k and unit.materialized:
                    unit.offload()
            unit = self.units[k]
            if not unit.materialized:
                self.onloads += 1
            unit.onload()
            self.current = k
            self._next_asked = False
        nxt = k + 1
        if prefetch and not self._next_asked:
            self._next_asked = True
            if self.prefetching and nxt < len(self.units) and not self.units[nxt].materialized and \
                    not self._may_skip_group(nxt, index):
                self.units[nxt].prefetch(self.stream)
                self.onloads += 1
        self.max_blocks_materialized = max(self.max_blocks_materialized, self.blocks_materialized)
        self.max_device_bytes = max(self.max_device_bytes, self.device_bytes())

    def _may_skip_group(self, k: int, current: int) -> bool:
        if self.skip_hint is None:
            return False
        return all(self.skip_hint(i, current) for i in range(k * self.per_group, min((k + 1) * self.per_group,
                                                                                     len(self.blocks))))

    def evict(self) -> None:
        """Every group back to the host."""
        for unit in self.units:
            unit.offload()
        self.current = None

    def close(self) -> None:
        for unit in self.units:
            unit.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _BlockHook(ModelHook):
    def __init__(self, offload: LayerwiseOffload, index: int) -> None:
        super().__init__()
        self.offload = offload
        self.index = index

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.offload.enter(self.index)
        return args, kwargs


class _CallHook(ModelHook):
    """One transformer call: its blocks come and go inside, none stays after it."""

    def __init__(self, offload: LayerwiseOffload) -> None:
        super().__init__()
        self.offload = offload

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with self.offload._lock:
            self.offload.current = None
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                self.offload.evict()


def apply_layerwise_offload(transformer: torch.nn.Module, blocks: Sequence[torch.nn.Module],
                            device: torch.device | str, config: OffloadConfig, *, gather: Gatherer | None = None,
                            skip_hint: SkipHint | None = None) -> LayerwiseOffload:
    """Offload ``blocks`` (the transformer's, in call order) group by group.

    The non-block modules of ``transformer`` are moved to ``device`` (they stay there).

    Args:
        gather: the sequence-parallel group, for ``offload_shard_host_copy``.
        skip_hint: ``(index, current) -> bool``: block ``index`` may be skipped in this call, seen
            from block ``current`` (the caches' ``may_skip``); such a block is not prefetched.
    """
    device = torch.device(device)
    offload = LayerwiseOffload(transformer, blocks, device, config, gather, skip_hint)
    transformer.to(device)  # the rest of the transformer (block tensors are placeholders by now)
    for index, block in enumerate(offload.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(offload, index), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_CallHook(offload), CALL_HOOK_NAME)
    return offload


def layerwise_offload_of(transformer: torch.nn.Module) -> LayerwiseOffload | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(CALL_HOOK_NAME) if registry is not None else None
    return hook.offload if isinstance(hook, _CallHook) else None


def remove_layerwise_offload(transformer: torch.nn.Module) -> None:
    """Blocks back on the device for good; hooks removed; the disk tier's files deleted."""
    offload = layerwise_offload_of(transformer)
    if offload is None:
        return
    offload.close()
    for block in offload.blocks:
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(HOOK_NAME, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(CALL_HOOK_NAME, recurse=False)
