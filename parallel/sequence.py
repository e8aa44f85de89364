"""Sequence parallelism: Ulysses, Ring and hybrid Ulysses × Ring (USP) across the sp group.

Why ours: diffusers' context parallelism needs an accelerator (and ring needs an LSE-returning
CUDA backend), so it cannot run on gloo/CPU; here the same plans run on gloo and NCCL alike.

Where to split and gather comes from the model class's diffusers ``_cp_plan`` (text and image
tokens are both split: each rank holds a contiguous shard of every sequence, so the union over
ranks is every token once and joint MMDiT attention needs no special case). Shards may be uneven
(``torch.tensor_split`` sizes), so any image size and prompt length work with any degree.

Attention is the one place ranks must talk. A hook on every attention module runs the module
under a ``TorchFunctionMode`` that replaces ``scaled_dot_product_attention`` (the diffusers
processors stay untouched) with:

- Ulysses: all-to-all turns sequence shards into head shards, full-sequence attention on H/U heads,
  all-to-all back;
- Ring: each rank attends to its own K/V block and to the blocks passed around the ring, partial
  outputs merged with log-sum-exp in fp32, always in the same (source-rank) order so every rank's
  numbers are identical;
- USP: Ulysses inside each ulysses group, then Ring across the ring group.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from .groups import Group, ParallelGroups

SP_SPLIT_HOOK = "ditserve_sp_split"
SP_GATHER_HOOK = "ditserve_sp_gather"
SP_ATTENTION_HOOK = "ditserve_sp_attention"
SP_ROOT_HOOK = "ditserve_sp_root"


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(x, parts)`` along a dim of length ``n``."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _shard(x: torch.Tensor | tuple[torch.Tensor, ...], dim: int, group: Group) -> Any:
    """This rank's shard of ``x``; a tuple of tensors (e.g. RoPE's ``(cos, sin)``, Stable Audio's
    ``rotary_embedding``) is split part by part along the same dim."""
    if isinstance(x, tuple | list):
        return type(x)(_shard(part, dim, group) for part in x)
    return torch.tensor_split(x, group.size, dim=dim)[group.rank]


class _ForwardState:
    """What the attention calls of one transformer forward share: the sp members' local sequence
    lengths, found with one small all-gather per distinct local length (one per forward for most
    models; SD3.5-Medium's image-only attention next to its joint attention makes two). Keyed by
    this rank's local length: two kinds of call must not have equal local lengths on one rank and
    different ones on another (true when each split sequence has at least ``sp`` tokens)."""

    def __init__(self) -> None:
        self.seq_sizes: dict[int, list[int]] = {}


# ---- attention ----------------------------------------------------------------------------------


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention of one K/V block, in fp32: output (B, H, Sq, D) and log-sum-exp (B, H, Sq, 1)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse), v.float()), lse


def _merge(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Merge per-block (output, lse) pairs in list order, in fp32."""
    out, lse = partials[0]
    for block_out, block_lse in partials[1:]:
        new_lse = torch.logaddexp(lse, block_lse)
        out = out * torch.exp(lse - new_lse) + block_out * torch.exp(block_lse - new_lse)
        lse = new_lse
    return out


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ring: Group,
                   block_sizes: list[int]) -> torch.Tensor:
    """Attention of local queries over the K/V blocks of every ring member.

    Args:
        q, k, v: (B, H, S_local, D); member i's K/V blocks have ``block_sizes[i]`` tokens.
    """
    if ring.size == 1:
        out, _ = _attention_with_lse(q, k, v, scale)
        return out.to(q.dtype)
    partials: list[Any] = [None] * ring.size
    kv = torch.stack([k, v])
    for step in range(ring.size):
        source = (ring.rank - step) % ring.size
        if step + 1 < ring.size:  # start passing the current block on while computing with it
            incoming = kv.new_empty((2, *k.shape[:2], block_sizes[(source - 1) % ring.size], k.shape[-1]))
            ring.send_recv(kv, incoming)
        partials[source] = _attention_with_lse(q, kv[0], kv[1], scale)
        if step + 1 < ring.size:
            kv = incoming
    # collective: merged in source order, not arrival order, so every rank gets identical numbers
    return _merge(partials).to(q.dtype)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, groups: ParallelGroups,
                      seq_sizes: list[int]) -> torch.Tensor:
    """USP: Ulysses all-to-all in the ulysses group, Ring across the ring group, all-to-all back.

    Args:
        q, k, v: (B, H, S_local, D), this rank's sequence shard with all heads.
        seq_sizes: local sequence length of every sp member, in sp order.
    """
    uly, ring = groups.ulysses, groups.ring
    u = uly.size
    heads = q.shape[1]
    # members of my ulysses group: sp indices ring.rank * u + j
    member_sizes = seq_sizes[ring.rank * u:(ring.rank + 1) * u]
    block_sizes = [sum(seq_sizes[i * u:(i + 1) * u]) for i in range(ring.size)]

    def to_heads(x: torch.Tensor) -> torch.Tensor:
        chunks = list(torch.tensor_split(x, u, dim=1))
        shape = chunks[0].shape
        recv = uly.all_to_all(chunks, [(shape[0], shape[1], n, shape[3]) for n in member_sizes])
        return torch.cat(recv, dim=2)

    q2, k2, v2 = (to_heads(x) for x in (q, k, v))
    out = ring_attention(q2, k2, v2, scale, ring, block_sizes)
    pieces = list(torch.split(out, member_sizes, dim=2))
    back = uly.all_to_all(pieces, [(q.shape[0], heads // u, q.shape[2], q.shape[3])] * u)
    return torch.cat(back, dim=1)


class _SequenceParallelSDPA(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to USP attention while an attention module runs."""

    def __init__(self, groups: ParallelGroups, state: _ForwardState) -> None:
        super().__init__()
        self.groups = groups
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = {**dict(zip(names, args)), **kwargs}
        q, k, v = bound["query"], bound["key"], bound["value"]
        if bound.get("attn_mask") is not None or bound.get("is_causal") or bound.get("dropout_p", 0.0):
            raise NotImplementedError("sequence parallel attention supports no attention mask, causal or dropout")
        if k.shape[1] != q.shape[1]:
            raise NotImplementedError("sequence parallel attention does not support grouped-query attention")
        scale = bound.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        sizes = self.state.seq_sizes.get(q.shape[2])
        if sizes is None:
            local = torch.tensor([q.shape[2]], dtype=torch.int64, device=q.device)
            sizes = self.state.seq_sizes[q.shape[2]] = [int(t.item()) for t in self.groups.sp.all_gather(local)]
        return ulysses_attention(q, k, v, scale, self.groups, sizes)


# ---- hooks --------------------------------------------------------------------------------------


class _RootHook(ModelHook):
    """Resets the per-forward state at the start of every transformer forward."""

    def __init__(self, state: _ForwardState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.seq_sizes = {}
        return args, kwargs


class _AttentionHook(ModelHook):
    def __init__(self, groups: ParallelGroups, state: _ForwardState) -> None:
        super().__init__()
        self.mode = _SequenceParallelSDPA(groups, state)

    def new_forward(self, module, *args, **kwargs):
        with self.mode:
            return self.fn_ref.original_forward(*args, **kwargs)


class _SplitHook(ModelHook):
    """Splits inputs (by name or position) or outputs (by index) of a module, per a cp-plan entry."""

    def __init__(self, entries: dict, group: Group) -> None:
        super().__init__()
        self.inputs = {k: v for k, v in entries.items() if not getattr(v, "split_output", False)}
        self.outputs = {k: v for k, v in entries.items() if getattr(v, "split_output", False)}
        self.group = group
        self.params: list[str] = []

    def initialize_hook(self, module):
        self.params = list(inspect.signature(module.forward).parameters)
        return module

    def _split(self, x: torch.Tensor | None, spec: Any) -> torch.Tensor | None:
        # as diffusers: a tensor of another rank than the plan expects is left whole (e.g. Wan's
        # ``timestep``: split only when it is one per token, ``expand_timesteps``)
        if isinstance(x, tuple | list):  # e.g. a RoPE (cos, sin) pair: each is split
            return type(x)(self._split(t, spec) for t in x)
        expected = getattr(spec, "expected_dims", None)
        if x is None or (expected is not None and x.dim() != expected):
            return x
        return _shard(x, spec.split_dim, self.group)

    def pre_forward(self, module, *args, **kwargs):
        args = list(args)
        for name, spec in self.inputs.items():
            if name in kwargs:
                kwargs[name] = self._split(kwargs[name], spec)
            elif name in self.params and self.params.index(name) < len(args):
                i = self.params.index(name)
                args[i] = self._split(args[i], spec)
        return tuple(args), kwargs

    def post_forward(self, module, output):
        if not self.outputs:
            return output
        if isinstance(output, torch.Tensor):  # a module returning one tensor: plan index 0 is it
            return self._split(output, self.outputs[0])
        output = list(output)
        for index, spec in self.outputs.items():
            output[index] = self._split(output[index], spec)
        return tuple(output)


class _GatherHook(ModelHook):
    def __init__(self, gather_dim: int, group: Group) -> None:
        super().__init__()
        self.dim = gather_dim
        self.group = group

    def post_forward(self, module, output):
        local = torch.tensor([output.shape[self.dim]], dtype=torch.int64, device=output.device)
        sizes = [int(t.item()) for t in self.group.all_gather(local)]
        return self.group.all_gather_uneven(output, self.dim, sizes)


def _modules_matching(model: torch.nn.Module, pattern: str) -> list[torch.nn.Module]:
    if pattern == "":
        return [model]
    return [m for name, m in model.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "set_processor")


def apply_sequence_parallel(transformer: torch.nn.Module, groups: ParallelGroups,
                            plan: dict[str, Any] | None = None, attention: str | None = None) -> None:
    """Split and gather per ``plan`` (diffusers' ``_cp_plan`` format; default: the class's own);
    run every attention module under USP, or only those whose name matches the pattern
    ``attention`` (for models that also attend over sequences outside the split region, e.g.
    Z-Image's refiners before its streams are joined)."""
    from diffusers.models._modeling_parallel import ContextParallelOutput

    plan = plan or getattr(type(transformer), "_cp_plan", None)
    if not plan:
        raise ValueError(f"{type(transformer).__name__} has no _cp_plan: sequence parallel is not available for it")
    state = _ForwardState()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_RootHook(state), SP_ROOT_HOOK)
    for pattern, entry in plan.items():
        modules = _modules_matching(transformer, pattern)
        if not modules:
            raise ValueError(f"_cp_plan entry {pattern!r} matches no module of {type(transformer).__name__}")
        for module in modules:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if isinstance(entry, ContextParallelOutput):
                registry.register_hook(_GatherHook(entry.gather_dim, groups.sp), f"{SP_GATHER_HOOK}:{pattern}")
            else:
                registry.register_hook(_SplitHook(entry, groups.sp), f"{SP_SPLIT_HOOK}:{pattern}")
    for name, module in transformer.named_modules():
        if _is_attention(module) and (attention is None or fnmatch.fnmatchcase(name, attention)):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_AttentionHook(groups, state), SP_ATTENTION_HOOK)


def remove_sequence_parallel(transformer: torch.nn.Module) -> None:
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in list(registry.hooks):
            if name.split(":")[0] in (SP_ROOT_HOOK, SP_SPLIT_HOOK, SP_GATHER_HOOK, SP_ATTENTION_HOOK):
                registry.remove_hook(name, recurse=False)
