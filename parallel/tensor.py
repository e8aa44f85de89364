"""Tensor parallelism: attention QKV/out and MLP linears sharded column-/row-wise across the tp group.

Why ours: diffusers' TP goes through DTensor device meshes that need an accelerator per rank; this
runs on gloo and NCCL alike. What to shard comes from the class's diffusers ``_tp_plan``
("colwise", "rowwise", or packed: column-wise for fused projections whose outputs are several
blocks, e.g. FLUX.2's Q|K|V|gate|up, each sharded alike; row-wise for FLUX's single-stream
``proj_out``, whose input is two column-sharded streams side by side). Column-sharded Q/K/V keep whole heads per rank (the
processors reshape by head_dim, so they see H/T heads); each block half ends in one row-sharded
linear and one all-reduce.

Shards are cut at load: the model is built with empty (meta) parameters, the sharded linears
replaced by their shards, and every tensor read from safetensors as a slice, so no rank ever holds
the full weights of a sharded layer. A checkpoint stored in FP8 (``features/quantization.py``)
loads as stored: float8 weights and their float32 ``weight_scale`` (one per output row) are never
upcast, and a column-sharded linear's scales are sliced with its rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .groups import Group


class ColumnParallelLinear(torch.nn.Module):
    """Output features sharded: this rank computes its slice of the outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device="meta"))
        self.bias = torch.nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(torch.nn.Module):
    """Input features sharded: partial products are summed over the tp group, then the bias added."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Group) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = group
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device="meta"))
        self.bias = torch.nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


def _style(entry: object) -> str:
    if isinstance(entry, str):
        return entry
    return "packed_colwise" if type(entry).__name__ == "PackedColwiseParallel" else "packed_rowwise"


def _packed_blocks(entry: object, linear: torch.nn.Linear, style: str) -> list[int] | None:
    """Block sizes of a packed style: the entry's own ``blocks`` (proportions of the sharded
    dimension), else the ``_tp_packed_col_blocks`` / ``_tp_packed_row_blocks`` sizes the model's
    ``__init__`` stored on the Linear (``None``: not packed)."""
    if not style.startswith("packed_"):
        return None
    total = linear.out_features if style == "packed_colwise" else linear.in_features
    blocks = getattr(entry, "blocks", None)
    if blocks:
        unit, rest = divmod(total, sum(blocks))
        if rest:
            raise ValueError(f"packed blocks {blocks} do not divide the {total} features of a sharded linear")
        return [b * unit for b in blocks]
    return getattr(linear, "_tp_packed_col_blocks" if style == "packed_colwise" else "_tp_packed_row_blocks", None)


def _ranges(blocks: list[int], rank: int, size: int, what: str) -> list[tuple[int, int]]:
    """The index ranges ``rank`` keeps along a sharded dimension: its slice of every packed block."""
    ranges, offset = [], 0
    for block in blocks:
        if block % size:
            raise ValueError(f"tensor_parallel_size={size} must divide the {block} {what} of a sharded linear")
        shard = block // size
        ranges.append((offset + rank * shard, offset + (rank + 1) * shard))
        offset += block
    return ranges


def _column_ranges(style: str, linear: torch.nn.Linear, rank: int, size: int, entry: object = None) -> list[tuple[int, int]]:
    """The input-column ranges a row-sharded linear keeps on ``rank`` (one per packed block)."""
    blocks = _packed_blocks(entry, linear, style)
    return _ranges(blocks or [linear.in_features], rank, size, "input features")


_SCALE = "weight_scale"  # per-output-row scales of a weight stored in FP8


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor in the load dtype, except FP8 weights and their float32 scales."""
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn or key.endswith("." + _SCALE):
        return tensor
    return tensor.to(dtype)


def load_tensor_parallel_transformer(cls: type, folder: str | Path, dtype: torch.dtype, group: Group,
                                     plan: dict[str, Any] | None = None,
                                     prepare: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Build ``cls`` from ``folder`` (config + safetensors) with the linears of ``plan`` (diffusers'
    ``_tp_plan`` format; default: the class's own) sharded over ``group``, reading only this rank's
    slices of their weights.

    Args:
        prepare: called on the (meta, sharded) model before the weights are assigned, e.g. to give
            the linears of a pre-quantized checkpoint their FP8 weight and scale placeholders.
    """
    from accelerate import init_empty_weights

    plan = plan or getattr(cls, "_tp_plan", None)
    if not plan:
        raise ValueError(f"{cls.__name__} has no _tp_plan: tensor parallel is not available for it")
    folder = Path(folder)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(folder))

    rank, size = group.rank, group.size
    slices: dict[str, tuple[int, list[tuple[int, int]]]] = {}  # parameter -> (dim, kept index ranges)
    for name, module in list(model.named_modules()):
        entry = next((e for pattern, e in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if entry is None:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"_tp_plan entry for {name} is not a Linear")
        style = _style(entry)
        has_bias = module.bias is not None
        if style in ("colwise", "packed_colwise"):
            blocks = _packed_blocks(entry, module, style) or [module.out_features]
            if any(b % size for b in blocks):
                raise ValueError(
                    f"tensor_parallel_size={size} must divide the {module.out_features} outputs of {name}"
                    + (f" in each packed block {blocks}" if len(blocks) > 1 else "")
                )
            keep = _ranges(blocks, rank, size, "outputs")  # this rank's slice of every packed block
            shard = ColumnParallelLinear(module.in_features, sum(b - a for a, b in keep), has_bias)
            shard.tp_style, shard.tp_ranges = "colwise", keep
            slices[f"{name}.weight"] = (0, keep)
            slices[f"{name}.{_SCALE}"] = (0, keep)  # present only in FP8 checkpoints
            if has_bias:
                slices[f"{name}.bias"] = (0, keep)
        else:
            keep = _column_ranges(style, module, rank, size, entry)
            shard = RowParallelLinear(sum(b - a for a, b in keep), module.out_features, has_bias, group)
            shard.tp_style, shard.tp_ranges = "rowwise", keep
            slices[f"{name}.weight"] = (1, keep)
        shard.tp_full = (module.in_features, module.out_features)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, shard)

    if prepare is not None:
        prepare(model)
    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in slices:
                    dim, ranges = slices[key]
                    view = f.get_slice(key)
                    parts = [view[a:b] if dim == 0 else view[:, a:b] for a, b in ranges]
                    tensor = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
                else:
                    tensor = f.get_tensor(key)
                state[key] = _cast(key, tensor, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _take(tensor: torch.Tensor, ranges: list[tuple[int, int]], dim: int) -> torch.Tensor:
    parts = [tensor.narrow(dim, a, b - a) for a, b in ranges]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()


class TensorParallelLora:
    """How a LoRA adapter follows this rank's shard of a linear (``features.lora.Sharder``): a
    column-sharded linear keeps its slice of ``B``'s rows (the outputs it computes); a row-sharded one
    its slice of ``A``'s columns, and the rank-r intermediate ``x @ A.T`` is summed over the group
    before ``B`` (r values per token: small next to the linear's own all-reduce). Whole linears
    (not in the plan) take the adapter as it is. Reads the shard's ``tp_style``/``tp_ranges``/``tp_full``,
    set at load, so any shard class that keeps them works (e.g. quantized ones)."""

    def full_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return getattr(module, "tp_full", (module.in_features, module.out_features))

    def shard(self, module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor):
        style = getattr(module, "tp_style", None)
        if style == "colwise":
            return a, _take(b, module.tp_ranges, 0), None
        if style == "rowwise":
            return _take(a, module.tp_ranges, 1), b, module.group.all_reduce
        return a, b, None
