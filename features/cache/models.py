"""What the caches need to know about each transformer class, as data.

- ``block_lists``: the ``ModuleList`` attributes holding the transformer blocks, in call order. Every
  block is called as ``block(hidden_states=..., encoder_hidden_states=..., ...)`` and returns
  ``(encoder_hidden_states, hidden_states)`` (true of both diffusers MMDiT families here).
- ``modulated_input``: TeaCache's probe, the first block's timestep-modulated image input, computed
  with the block's own modules from the arguments the transformer passes it.
- ``tea_cache_coefficients``: the family's default TeaCache polynomial (highest power first), used
  when neither the config nor the checkpoint (``ditserve.json``, fitted by
  ``tools/fit_tea_cache.py``) gives one. FLUX's is TeaCache's published fit for FLUX.1-dev;
  Qwen-Image's is vLLM-Omni's published one for Qwen-Image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class CacheModelInfo:
    block_lists: tuple[str, ...]
    modulated_input: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    tea_cache_coefficients: tuple[float, float, float, float, float]


def _qwen_image_modulated(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    img_mod1 = block.img_mod(kwargs["temb"]).chunk(2, dim=-1)[0]
    modulated, _ = block._modulate(block.img_norm1(kwargs["hidden_states"]), img_mod1, kwargs.get("modulate_index"))
    return modulated


def _flux_modulated(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    return block.norm1(kwargs["hidden_states"], emb=kwargs["temb"])[0]


MODELS: dict[str, CacheModelInfo] = {
    "QwenImageTransformer2DModel": CacheModelInfo(
        ("transformer_blocks",), _qwen_image_modulated, (-450.0, 280.0, -45.0, 3.2, -0.02)
    ),
    "FluxTransformer2DModel": CacheModelInfo(
        ("transformer_blocks", "single_transformer_blocks"), _flux_modulated, (498.65, -283.78, 55.86, -3.82, 0.264)
    ),
}


def cache_info(transformer: torch.nn.Module) -> CacheModelInfo:
    """The table entry of ``transformer``'s class; raises naming the classes that have one."""
    name = type(transformer).__name__
    info = MODELS.get(name)
    if info is None:
        raise ValueError(f"cache_backend: transformer class {name} has no cache support; supported: {sorted(MODELS)}")
    return info


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of ``transformer`` in call order."""
    return [block for attr in cache_info(transformer).block_lists for block in getattr(transformer, attr)]


def num_blocks(transformer_class: str, config: dict[str, Any]) -> int | None:
    """Block count from a transformer's config.json, without loading it (``None``: unknown class)."""
    if transformer_class not in MODELS:
        return None
    return int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0))
