"""LongCat-Image family adapter (meituan-longcat/LongCat-Image, text-to-image).

Qwen2.5-VL text encoder over the pipeline's system/user template (the prompt's tokens padded to
512, quoted text tokenized character by character, template tokens dropped from the last hidden
states); ``LongCatImageTransformer2DModel`` (a FLUX.1-shaped double-/single-stream MMDiT without
pooled text or a guidance embedding) on 2x2-packed latent tokens with 3-axis position ids (image
ids offset by 512); timestep shift from the image token count, ``timestep / 1000`` as input.
Guidance as ``LongCatImagePipeline``: classic CFG with a negative prompt (``""`` by default) when
``guidance_scale > 1``, the two branches as two serial calls, combined as
``uncond + scale * (cond - uncond)`` and renormalized (the pipeline's default
``enable_cfg_renorm=True, cfg_renorm_min=0``: scaled down to the conditional prediction's norm,
never up).

Not served: the pipeline's prompt rewriting (``enable_prompt_rewrite``, on by default there), which
generates a new prompt with the text encoder's ``generate`` and the ``text_processor``; the runner
equals the pipeline with ``enable_prompt_rewrite=False`` and never loads the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    LongCatImagePipeline,
    LongCatImageTransformer2DModel,
)
from diffusers.hooks.tensor_parallel import PackedRowwiseParallel
from diffusers.models.transformers.transformer_longcat_image import LongCatImageAttention
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

from .adapter import SamplingParams, TextConditioning, count_local_heads
from .flow_match import FlowMatchImageAdapter
from .flux import FluxAdapter, flux_cache_blocks
from .loading import CheckpointInfo
from .registry import Feature, Guidance


class LongCatImageAdapter(FlowMatchImageAdapter):
    family = "longcat-image"
    pipeline_class = LongCatImagePipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKL,
        "text_encoder": Qwen2_5_VLForConditionalGeneration,
        "tokenizer": Qwen2Tokenizer,
        "text_processor": Qwen2VLProcessor,  # prompt rewriting only: no stage loads it (None in the helper pipeline)
        "transformer": LongCatImageTransformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    unbatched_text_kwargs = ("txt_ids",)
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    # Verified in tests/test_family_longcat_image.py: caches (threshold 0 equals uncached,
    # evaluations drop), CFG-parallel, Ulysses, Ring and tensor parallel at degree 2 equal one rank,
    # layerwise offload equals resident, FP8 runs end to end close to the unquantized path. The rest
    # is refused at start-up by check_support; LoRA in particular: LongCatImagePipeline has no LoRA
    # loader to read adapters with.
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL, Feature.SEQUENCE_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("time_embed.*", "x_embedder", "context_embedder", "*.norm1.linear",
                            "*.norm1_context.linear", "*.norm.linear", "norm_out.*", "proj_out")
    # Sequence parallel and tensor parallel: the class has no plans, but its forward and blocks are
    # FLUX.1's (image and text tokens in with their position ids, RoPE from the concatenated ids;
    # the same linears, GELU MLPs), so FLUX.1's plans apply: split both streams and their ids at the
    # input (the text is always 512 tokens), gather ``proj_out``'s output; Q/K/V and the MLPs' first
    # linears column-sharded (whole heads per rank), each block half ending row-sharded, the single
    # blocks' ``proj_out`` over its packed input ``cat([attention (dim), MLP (4 dim)])``.
    cp_plan = FluxTransformer2DModel._cp_plan
    tp_plan = {**FluxTransformer2DModel._tp_plan, "single_transformer_blocks.*.proj_out": PackedRowwiseParallel([1, 4])}
    # TeaCache polynomial: identity (no published fit for LongCat-Image is known to us; the rel-L1
    # distance of the modulated input is used as is; fit one with tools/fit_tea_cache.py). Blocks:
    # the double-stream list, then the single-stream list (which, like FLUX.1's, takes and returns
    # both streams).
    cache_blocks = flux_cache_blocks((1.0, 0.0))

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        super().__init__(components, info, **kwargs)
        count_local_heads(components.get(self.denoisers[0]), LongCatImageAttention, lambda m: m.head_dim)

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, text_ids = self.pipe.encode_prompt(prompt=list(texts), num_images_per_prompt=num_images_per_prompt)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def _latents_and_kwargs(
        self, prepared: tuple[torch.Tensor, torch.Tensor], params: SamplingParams, cond: TextConditioning
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        latents, img_ids = prepared
        return latents, {"img_ids": img_ids}

    def guidance_kwargs(self, params: SamplingParams, batch: int) -> dict[str, Any]:
        return {}  # no guidance embedding: guidance is classic CFG only

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        comb = uncond + scale * (cond - uncond)
        # LongCatImagePipeline's cfg renorm (its defaults): scale the combination down to the
        # conditional prediction's norm per token, never up
        ratio = torch.norm(cond, dim=-1, keepdim=True) / (torch.norm(comb, dim=-1, keepdim=True) + 1e-8)
        return comb * ratio.clamp(min=0.0, max=1.0)

    # FLUX.1's VAE unpacking and scaling: the same code
    decode = FluxAdapter.decode
