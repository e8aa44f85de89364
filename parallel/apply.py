"""The start-up checks that refuse layouts a model cannot run (each message names the option and
what would work), and the tensor-parallel loader. Attaching the layout to a loaded adapter is the
feature table's work (``deployments/attach.py``)."""

from __future__ import annotations

from typing import Any

from .groups import ParallelConfig, ParallelGroups


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def num_heads(transformer_config: dict[str, Any]) -> int | None:
    """Attention heads from a denoiser's config.json (diffusers' ``num_attention_heads``, or
    ``n_heads`` as Z-Image names it); ``None`` when it names neither."""
    for key in ("num_attention_heads", "n_heads"):
        if transformer_config.get(key) is not None:
            return int(transformer_config[key])
    return None


def check_parallel(config: ParallelConfig, transformer_config: dict[str, Any], *, model: str,
                   cfg_ok: bool, sp_ok: bool, tp_ok: bool) -> None:
    """Refuse a layout the model cannot run, naming the option.

    Args:
        transformer_config: the transformer's config.json (for the head count).
        cfg_ok, sp_ok, tp_ok: whether the model supports CFG-, sequence- and tensor parallelism
            (the registry's feature flags; sequence parallel also needs a ``_cp_plan``).
    """
    heads = num_heads(transformer_config) or 0
    if config.cfg_parallel_size > 1 and not cfg_ok:
        raise ValueError(
            f"cfg_parallel_size={config.cfg_parallel_size}: model {model} has no CFG branches to split "
            "(not a true-CFG model); use cfg_parallel_size=1"
        )
    if config.sp_degree > 1 and not sp_ok:
        raise ValueError(
            f"ulysses_degree={config.ulysses_degree}, ring_degree={config.ring_degree}: model {model} does not "
            "support sequence parallelism; use 1"
        )
    if config.tensor_parallel_size > 1 and not tp_ok:
        raise ValueError(
            f"tensor_parallel_size={config.tensor_parallel_size}: model {model} does not support tensor "
            "parallelism; use 1"
        )
    if heads % (config.ulysses_degree * config.tensor_parallel_size):
        works = _divisors(heads)
        if config.tensor_parallel_size > 1 and config.ulysses_degree > 1:
            raise ValueError(
                f"ulysses_degree={config.ulysses_degree} × tensor_parallel_size={config.tensor_parallel_size} "
                f"must divide num_heads={heads} of model {model} (products that work: {works})"
            )
        name, value = (
            ("tensor_parallel_size", config.tensor_parallel_size) if config.tensor_parallel_size > 1
            else ("ulysses_degree", config.ulysses_degree)
        )
        raise ValueError(f"{name}={value} must divide num_heads={heads} of model {model} (try {works})")


def transformer_loader(groups: ParallelGroups, plan: dict[str, Any] | None = None, prepare: Any = None):
    """The component loader that builds the transformer tensor-parallel (``None`` at tp size 1);
    ``plan``: the adapter's tensor plan (default: the class's ``_tp_plan``); ``prepare``: see
    ``load_tensor_parallel_transformer``."""
    if groups.config.tensor_parallel_size == 1:
        return None
    from .tensor import load_tensor_parallel_transformer

    return lambda cls, folder, dtype: load_tensor_parallel_transformer(cls, folder, dtype, groups.tp, plan, prepare)
