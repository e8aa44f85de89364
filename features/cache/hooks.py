"""Block caches on a DiT: one hook per transformer block, state per request and CFG branch.

Why ours: diffusers 0.42 has FirstBlockCache/TaylorSeer hooks but no TeaCache, no DBCache with
Fn/Bn, warm-up limits and SCM masks; its state lives in the hook (per process, not per request)
and its skip decision is rank-local, which lets sequence-parallel ranks diverge and deadlock.

How it works: ``apply_cache(transformer, blocks)`` (``blocks``: the ``CacheBlocks`` the model's
adapter declares) registers a ``ModelHook`` named ``ditserve_cache`` on
every block (diffusers ``HookRegistry``; the model's code is untouched). With no active
``CacheRun`` the hook calls the block. ``cache_run(...)`` (a context manager around one request's
denoising loop) puts a run in the active request's state (``models.context.request_state``), so
concurrent requests each see their
own settings and state, and nothing outlives the request. Within a run, for each call of the
transformer (one step, one CFG branch, known from ``step_context``), the policy decides whether
to skip its range of blocks; skipped blocks pass their inputs through and the last one adds the
cached residual of the range.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ditserve.models.context import RequestContext, active_request, current_step, request_context, request_state
from ditserve.models.contract import CacheBlocks

from ..reducer import LOCAL, Reducer
from .config import CacheConfigError, CacheDiTSettings, CacheSettings, TeaCacheSettings
from .policies import BranchState, DBCachePolicy, TeaCachePolicy

HOOK_NAME = "ditserve_cache"

STATE_KEY = "cache"  # this feature's slot in the request's state (models.context.request_state)


def _active_run() -> CacheRun | None:
    request = active_request()
    return None if request is None else request.state.get(STATE_KEY, {}).get("run")


@dataclasses.dataclass
class CacheStats:
    """What caching did in one request (this rank's view; identical on every rank of a branch).

    Attributes:
        backend: tea_cache or cache_dit.
        calls_computed: transformer calls (steps × CFG branches run here) that ran all blocks.
        calls_cached: calls that skipped their cacheable range.
        blocks_evaluated: transformer blocks actually run.
        blocks_total: blocks an uncached run would have run.
        decisions: per CFG branch, one letter per step: C computed, S skipped.
    """

    backend: str
    calls_computed: int = 0
    calls_cached: int = 0
    blocks_evaluated: int = 0
    blocks_total: int = 0
    decisions: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_ratio"] = round(self.blocks_total / self.blocks_evaluated, 4) if self.blocks_evaluated else None
        return out


class CacheRun:
    """One request's cache: settings, per-branch state and stats."""

    def __init__(self, settings: CacheSettings, transformer: torch.nn.Module, blocks: CacheBlocks, num_steps: int,
                 group: Reducer = LOCAL, coefficients: tuple[float, ...] | None = None) -> None:
        self.num_blocks = len(blocks.blocks(transformer))
        self.modulated_input = blocks.modulated_input
        self.io = blocks
        check_blocks(settings, self.num_blocks)
        if isinstance(settings, TeaCacheSettings):
            coeffs = settings.config.coefficients or coefficients or blocks.tea_cache_coefficients
            self.policy = TeaCachePolicy(settings.config, coeffs, self.num_blocks, num_steps, group)
        else:
            self.policy = DBCachePolicy(settings.config, self.num_blocks, num_steps, group)
        self.states: dict[str, BranchState] = {}
        self.text_len: dict[str, int] = {}  # per branch: text tokens of the dual-stream blocks' calls
        self.stats = CacheStats(settings.backend)

    def block(self, index: int, module: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        step = current_step()
        state = self.states.setdefault(step.branch, BranchState())
        io = self.io
        if args:
            if len(args) > len(io.positional_args):  # refuse silently wrong caching
                raise TypeError(f"{type(module).__name__} called with {len(args)} positional arguments; the "
                                f"cache knows the names of {len(io.positional_args)} (CacheBlocks.positional_args)")
            kwargs = {**dict(zip(io.positional_args, args)), **kwargs}
            args = ()
        hidden = kwargs[io.hidden_arg]
        # a single-stream block with no text argument (Z-Image): an empty tensor stands in for it
        encoder = kwargs.get(io.encoder_arg) if io.encoder_arg else hidden.new_empty(0)
        # A single-stream block called with encoder_hidden_states=None runs on the joined
        # [text; image] sequence and returns it alone (FLUX.2): split it at the text length of this
        # call's dual-stream blocks, so both streams keep their own residuals, and join it on return.
        joined = encoder is None
        if joined:
            if step.branch not in self.text_len:
                raise TypeError(f"{type(module).__name__}: a joined single-stream block needs a dual-stream "
                                "block before it in the same call (to learn the text length)")
            n = self.text_len[step.branch]
            encoder, hidden = hidden[:, :n], hidden[:, n:]
        elif io.encoder_arg:
            self.text_len[step.branch] = encoder.shape[1]
        first, last = self.policy.skip_range
        if index == 0:
            state.skipping = False
            state.call_input = (hidden, encoder)
            if self.policy.decide_after is None:  # TeaCache: decide on the modulated input
                state.skipping = self.policy.decide(state, step.index, self.modulated_input(module, kwargs))
        if state.skipping and first <= index <= last:
            out: tuple[torch.Tensor | None, torch.Tensor] = (encoder, hidden)
            if index == last:
                res_hidden, res_encoder = self.policy.residual(state, step.index)
                out = (None if res_encoder is None else encoder + res_encoder, hidden + res_hidden)
        else:
            if index == first:
                state.range_input = (hidden, encoder)
            out = forward(*args, **kwargs)
            if io.hidden_first:
                out = (out[1], out[0])
            if io.encoder_arg is None:
                out = (encoder, out)
            elif joined:
                out = (out[:, :n], out[:, n:])
            self.stats.blocks_evaluated += 1
            if index == last:
                # a block that ends the text stream (SD3's last, context_pre_only) returns None for it
                res_encoder = None if out[0] is None else out[0] - state.range_input[1]
                self.policy.stored(state, step.index, (out[1] - state.range_input[0], res_encoder))
            if index == self.policy.decide_after:  # DBCache: decide on the Fn blocks' residual
                state.skipping = self.policy.decide(state, step.index, out[1] - state.call_input[0])
        if index == self.num_blocks - 1:
            self._end_call(state, step.branch)
        if io.encoder_arg is None:
            return out[1]
        if io.hidden_first:
            return out[1], out[0]
        return torch.cat(out, dim=1) if joined else out

    def _end_call(self, state: BranchState, branch: str) -> None:
        self.stats.blocks_total += self.num_blocks
        if state.skipping:
            self.stats.calls_cached += 1
            state.cached_steps += 1
            state.continuous_cached += 1
        else:
            self.stats.calls_computed += 1
            state.continuous_cached = 0
        state.decisions.append("S" if state.skipping else "C")
        self.stats.decisions[branch] = "".join(state.decisions)
        state.call_input = state.range_input = None


def check_blocks(settings: CacheSettings, num_blocks: int, field: str = "cache_config") -> None:
    """Refuse a Cache-DiT config that leaves no block to skip (naming the option)."""
    if not isinstance(settings, CacheDiTSettings):
        return
    fn, bn = settings.config.Fn_compute_blocks, settings.config.Bn_compute_blocks
    if fn + bn >= num_blocks:
        raise CacheConfigError(
            f"{field}.Fn_compute_blocks",
            f"Fn_compute_blocks={fn} + Bn_compute_blocks={bn} must be less than the model's {num_blocks} "
            "transformer blocks (leave at least one block to cache)",
        )


def may_skip(index: int, current: int) -> bool:
    """Whether block ``index`` may be skipped in the active transformer call, seen from the hook of
    block ``current`` (``True`` while the call's skip decision is still to come). For the layerwise
    offload (``features/offload``): a block that may be skipped is not prefetched."""
    run = _active_run()
    if run is None:
        return False
    first, last = run.policy.skip_range
    if not first <= index <= last:
        return False
    decide_after = run.policy.decide_after
    if decide_after is not None and current <= decide_after:
        return True  # DBCache decides after block decide_after has computed
    try:
        branch = current_step().branch
    except RuntimeError:
        return False
    state = run.states.get(branch)
    return bool(state is not None and state.skipping)


class _BlockHook(ModelHook):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = _active_run()
        if run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return run.block(self.index, module, self.fn_ref.original_forward, args, kwargs)


def apply_cache(transformer: torch.nn.Module, blocks: CacheBlocks) -> None:
    """Register the cache hook on every block of ``transformer`` (idle until a ``cache_run``)."""
    for index, block in enumerate(blocks.blocks(transformer)):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(index), HOOK_NAME)


def remove_cache(transformer: torch.nn.Module, blocks: CacheBlocks) -> None:
    for block in blocks.blocks(transformer):
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(HOOK_NAME, recurse=False)


def has_cache(transformer: torch.nn.Module, blocks: CacheBlocks) -> bool:
    modules = blocks.blocks(transformer)
    return bool(modules) and HookRegistry.check_if_exists_or_initialize(modules[0]).get_hook(HOOK_NAME) is not None


@contextlib.contextmanager
def cache_run(settings: CacheSettings | None, transformer: torch.nn.Module, blocks: CacheBlocks, num_steps: int,
              group: Reducer = LOCAL, coefficients: tuple[float, ...] | None = None) -> Iterator[CacheRun | None]:
    """Activate ``settings`` for the denoising loop inside (``None``: no cache, yields ``None``).

    Args:
        blocks: the ``CacheBlocks`` the model's adapter declares.
        group: the ranks that compute this rank's CFG branch together (sequence × tensor
            parallel; a ``parallel.groups.Group`` is one); skip metrics are reduced over it.
            Default: this process alone.
        coefficients: the checkpoint's fitted TeaCache polynomial, if any.
    """
    if settings is None:
        yield None
        return
    if not has_cache(transformer, blocks):
        raise RuntimeError("cache hooks are not attached: call apply_cache(transformer, blocks) at load")
    run = CacheRun(settings, transformer, blocks, num_steps, group, coefficients)
    with contextlib.ExitStack() as stack:
        if active_request() is None:  # a run outside a served request (tools, toy tests) gets its own
            stack.enter_context(request_context(RequestContext()))
        slot = request_state(STATE_KEY)
        slot["run"] = run  # per-branch state lives in run.states, keyed by CFG branch
        try:
            yield run
        finally:
            slot.pop("run", None)
