"""FLUX.1 family adapter (FLUX.1-dev).

CLIP (pooled) + T5 (sequence) text encoders; guidance-distilled: ``guidance_scale`` enters the
transformer as an embedding, one call per step. Like ``FluxPipeline``, true CFG with a negative
prompt is also available (``true_cfg_scale > 1``), at the cost of a second call per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .adapter import SamplingParams, TextConditioning
from .contract import CacheBlocks
from .flow_match import FlowMatchImageAdapter
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first block's timestep-modulated image input."""
    return block.norm1(kwargs["hidden_states"], emb=kwargs["temb"])[0]


def flux_cache_blocks(coefficients: tuple[float, ...]) -> CacheBlocks:
    """The cache's view of a FLUX.1-shaped transformer (also Ovis-Image's and LongCat-Image's): the
    double-stream list, then the single-stream list (which takes and returns both streams), probed
    by the first block's modulated input; ``coefficients``: the TeaCache polynomial."""
    return CacheBlocks(("transformer_blocks", "single_transformer_blocks"), _modulated_input, coefficients,
                       layer_config_keys=("num_layers", "num_single_layers"))


class FluxAdapter(FlowMatchImageAdapter):
    family = "flux"
    pipeline_class = FluxPipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "text_encoder_2": T5EncoderModel,
        "tokenizer_2": T5TokenizerFast,
        "transformer": FluxTransformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    max_sequence_length = 512  # the pipeline's default
    unbatched_text_kwargs = ("txt_ids",)
    default_guidance_scale = 3.5  # FluxPipeline's
    guidance = frozenset({Guidance.DISTILLED, Guidance.TRUE_CFG})
    # Verified: caches (tests/test_cache.py), SP/TP/CFG-parallel equal one rank (tests/test_parallel.py),
    # exact VAE patch parallel decode (tests/test_vae_parallel.py).
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.SEQUENCE_PARALLEL, Feature.CFG_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.LORA, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("time_text_embed.*", "x_embedder", "context_embedder", "*.norm1.linear", "*.norm1_context.linear",
                            "*.norm.linear", "norm_out.*", "proj_out")
    # TeaCache polynomial: TeaCache's published fit for FLUX.1-dev.
    cache_blocks = flux_cache_blocks((498.65, -283.78, 55.86, -3.82, 0.264))

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(texts),
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def _latents_and_kwargs(
        self, prepared: tuple[torch.Tensor, torch.Tensor], params: SamplingParams, cond: TextConditioning
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        latents, img_ids = prepared
        return latents, {"img_ids": img_ids, "joint_attention_kwargs": {}}

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._require("vae")
        vae = self.components["vae"]
        latents = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
