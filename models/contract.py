"""The data an adapter declares about itself: the shape of its work and what it supports.

Everything here is plain data (enums and frozen dataclasses), readable without loading weights:
the registry derives a model's feature flags from it, start-up checks read it (``capabilities``
in ``families.py``), and features take it as an argument instead of keeping tables by class name.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import torch

from .registry import Feature, Guidance


class LatentLayout(str, enum.Enum):
    """How the denoiser's latents are laid out."""

    PACKED_TOKENS = "packed_tokens"  # (B, seq, C): image latents packed into tokens (e.g. 2x2 patches)
    SPATIAL = "spatial"  # (B, C, H, W): image latents as the VAE gives them; the denoiser patchifies (SD3, Z-Image)
    VIDEO = "video"  # (B, C, F, H, W)
    AUDIO = "audio"  # (B, C, T)


class CFGEvaluation(str, enum.Enum):
    """How the CFG branches of one step are evaluated on one process (when no CFG-parallel
    strategy splits them across ranks)."""

    SERIAL = "serial"  # one denoiser call per branch (branches may differ in text length)
    BATCHED = "batched"  # one call, branches concatenated along the batch (diffusers SD3, Wan)


class Conditioning(str, enum.Enum):
    """Inputs a family conditions on."""

    TEXT = "text"
    IMAGE = "image"  # input images (editing, image-to-video)
    PRIOR_TOKENS = "prior_tokens"  # tokens of an autoregressive prior (GLM-Image)


class Output(str, enum.Enum):
    """What the decoder produces."""

    IMAGE = "image"
    LAYERED_IMAGE = "layered_image"  # several RGBA layers per sample
    VIDEO = "video"
    AUDIO = "audio"


@dataclasses.dataclass(frozen=True)
class Audio:
    """Decoded audio as the Decoder hands it on (``Output.AUDIO``).

    Attributes:
        waveforms: float32 samples, (n, channels, samples), as the pipeline returns them (not
            clipped to [-1, 1]; encoders to 16-bit PCM clip).
        sample_rate: samples per second.
    """

    waveforms: Any
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.waveforms.shape[-1] / self.sample_rate


@dataclasses.dataclass(frozen=True)
class CacheBlocks:
    """What the block caches (``features/cache``) need to know about a denoiser class.

    Attributes:
        block_lists: the ``ModuleList`` attributes holding the blocks, in call order. By default
            every block is called by keyword with ``hidden_states`` and ``encoder_hidden_states`` and
            returns ``(encoder_hidden_states, hidden_states)`` (dual stream); a block that ends the
            text stream returns ``None`` for it (SD3's last, ``context_pre_only`` block), and so does a
            skipped range that ends with such a block; a single-stream block after dual-stream ones
            may be called with ``encoder_hidden_states=None`` on the joined ``[text; image]``
            sequence, returning that sequence alone (FLUX.2; the hooks split it at the text length).
        modulated_input: TeaCache's probe: the first block's timestep-modulated image input,
            computed with the block's own modules from the keyword arguments it was called with.
        tea_cache_coefficients: the family's default TeaCache polynomial (highest power first), used
            when neither the request nor the checkpoint gives one.
        layer_config_keys: keys of the denoiser's config.json whose values sum to the block count.
        positional_args: names of the block's positional parameters, for blocks the model calls
            positionally (they are bound to these names before the hooks read them).
        hidden_arg: the block's argument holding the (image) stream.
        encoder_arg: the argument holding the text stream; ``None``: a single-stream block that
            takes one sequence and returns it alone (Z-Image).
        hidden_first: a dual-stream block that returns ``(hidden_states, encoder_hidden_states)``
            (GLM-Image) instead of the default ``(encoder_hidden_states, hidden_states)``.
    """

    block_lists: tuple[str, ...]
    modulated_input: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    tea_cache_coefficients: tuple[float, ...]
    layer_config_keys: tuple[str, ...] = ("num_layers",)
    positional_args: tuple[str, ...] = ()
    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = "encoder_hidden_states"
    hidden_first: bool = False

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks of ``transformer`` in call order."""
        return [block for attr in self.block_lists for block in getattr(transformer, attr)]

    def count(self, config: dict[str, Any]) -> int:
        """Block count from the denoiser's config.json, without loading it."""
        return sum(int(config.get(key, 0)) for key in self.layer_config_keys)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What the denoising loop reports after each step (diffusers' ``callback_on_step_end``).

    Attributes:
        index: step index, from 0.
        num_steps: steps of the loop.
        timestep: the scheduler timestep of this step.
        latents: the latents after the scheduler step.
        noise_pred: the guided prediction the scheduler consumed.
    """

    index: int
    num_steps: int
    timestep: float
    latents: torch.Tensor
    noise_pred: torch.Tensor


StepCallback = Callable[[StepOutput], None]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a model's adapter declares, and the facts of its checkpoint's denoiser, without weights.

    Attributes:
        family: registry family key.
        adapter: the adapter class.
        supported_features: features that run for this model: the adapter's verified features,
            narrowed by the checkpoint's ``ditserve.json`` (``ModelSpec.features``).
        guidance: guidance kinds the adapter implements.
        cfg_evaluation: how CFG branches run on one process.
        denoisers: denoiser component names (the first is ``adapter.transformer``).
        latent_layout, output, conditioning: the adapter's declarations.
        transformer_class: class name of the first denoiser.
        transformer_config: its config.json.
        num_heads: attention heads (``None`` when the config does not say).
        num_blocks: blocks the caches see (``None``: no ``CacheBlocks`` declared).
        has_cp_plan, has_tp_plan: whether the class has a diffusers ``_cp_plan`` / ``_tp_plan``.
    """

    family: str
    adapter: type
    supported_features: frozenset[Feature]
    guidance: frozenset[Guidance]
    cfg_evaluation: CFGEvaluation
    denoisers: tuple[str, ...]
    latent_layout: LatentLayout
    output: Output
    conditioning: frozenset[Conditioning]
    transformer_class: str
    transformer_config: dict[str, Any]
    num_heads: int | None
    num_blocks: int | None
    has_cp_plan: bool
    has_tp_plan: bool
