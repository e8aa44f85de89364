"""Stable Diffusion 3.5 family adapter (SD3.5 Large, Large Turbo, Medium).

Three text encoders (CLIP-L and CLIP-G with projection: pooled and sequence embeddings; T5:
sequence), encoded by ``StableDiffusion3Pipeline.encode_prompt``; classic CFG with
``guidance_scale`` and a negative prompt ("" when none is given, as the pipeline does), both
branches batched into one transformer call per step like the pipeline. Latents stay unpacked,
(B, C, H, W): the transformer patches them itself. Timesteps follow the scheduler's static
``shift`` (a resolution-dependent ``mu`` only when its config sets ``use_dynamic_shifting``), and the
transformer takes the scheduler timestep as is (no ``/ 1000``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .adapter import FamilyAdapter, SamplingParams, TextConditioning, count_local_heads
from .contract import CacheBlocks, CFGEvaluation, LatentLayout
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first block's timestep-modulated image input (``norm1``'s first output,
    for the plain and the SD3.5-Medium dual-attention blocks alike)."""
    return block.norm1(kwargs["hidden_states"], emb=kwargs["temb"])[0]


class SD3Adapter(FamilyAdapter):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer_2": CLIPTokenizer,
        "text_encoder_3": T5EncoderModel,
        "tokenizer_3": T5TokenizerFast,
        "transformer": SD3Transformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    latent_layout = LatentLayout.SPATIAL
    max_sequence_length = 256  # the pipeline's default
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    cfg_evaluation = CFGEvaluation.BATCHED  # as the pipeline: both branches in one call (equal text lengths)
    # Verified in tests/test_family_sd3.py: caches (threshold 0 equals uncached, evaluations drop);
    # Ulysses/Ring/CFG/TP layouts equal one rank; exact VAE patch parallel decode equals one worker.
    # Layerwise offload equals resident (tests/test_offload.py). Not declared: LoRA (not implemented yet), FP8.
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.SEQUENCE_PARALLEL, Feature.CFG_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.LORA, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("time_text_embed.*", "context_embedder", "*.norm1.linear", "*.norm1_context.linear", "norm_out.*",
                            "proj_out")
    # TeaCache polynomial: none is published for SD3, so the identity (the raw relative L1 distance of
    # the modulated input, as FBCache uses it); fit one with tools/fit_tea_cache.py for a checkpoint.
    cache_blocks = CacheBlocks(("transformer_blocks",), _modulated_input, (0.0, 0.0, 0.0, 1.0, 0.0))
    # SD3Transformer2DModel has no diffusers _cp_plan. The latents enter as (B, C, H, W) and become
    # tokens in pos_embed (patching + positions of the whole image), so the image tokens are split at
    # pos_embed's output and the text at context_embedder's; every block then sees its shards (joint
    # attention over the union of all ranks' tokens, and SD3.5-Medium's image-only attn2), and the
    # image tokens are gathered after proj_out, before the transformer unpatchifies them.
    cp_plan = {
        "pos_embed": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    # Nor a _tp_plan: Q/K/V (image and text, and attn2's) and the MLPs' first linears column-sharded
    # (whole heads per rank), each half-block's last linear row-sharded; the AdaLN modulations and
    # the q/k RMS norms (over head_dim) stay whole. The last block has no text output projection
    # and no text MLP (context_pre_only): the patterns simply match nothing there.
    tp_plan = {
        **{f"transformer_blocks.*.{attn}.to_{x}": "colwise" for attn in ("attn", "attn2") for x in "qkv"},
        **{f"transformer_blocks.*.{attn}.to_out.0": "rowwise" for attn in ("attn", "attn2")},
        **{f"transformer_blocks.*.attn.add_{x}_proj": "colwise" for x in "qkv"},
        "transformer_blocks.*.attn.to_add_out": "rowwise",
        **{f"transformer_blocks.*.{ff}.net.0.proj": "colwise" for ff in ("ff", "ff_context")},
        **{f"transformer_blocks.*.{ff}.net.2": "rowwise" for ff in ("ff", "ff_context")},
    }

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        super().__init__(components, info, **kwargs)
        count_local_heads(components.get("transformer"), Attention, lambda m: m.inner_dim // m.heads)

    def _helper_pipeline(self) -> Any:
        pipe = super()._helper_pipeline()
        # Without its VAE loaded the pipeline falls back to a scale factor of 8: take the real one
        # from the VAE's config, so every stage agrees on the latent geometry.
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.image_processor = type(pipe.image_processor)(vae_scale_factor=self.vae_scale_factor)
        return pipe

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        """The VAE scale times the transformer's patch size (its patch grid must be whole)."""
        return cls.vae_scale_from_config(info) * int(info.config("transformer").get("patch_size", 2))

    # ---- encode -------------------------------------------------------------------------------

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        # prompt_2 / prompt_3 default to the prompt, as in the pipeline
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(texts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ---- prepare ------------------------------------------------------------------------------

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        latents = self.pipe.prepare_latents(
            batch,
            self.transformer.config.in_channels,
            params.height,
            params.width,
            cond.positive["encoder_hidden_states"].dtype,
            self.device,
            generator,
        )
        return latents, {}

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's timesteps: the scheduler's static shift, or ``mu`` from the latent size
        when the scheduler config asks for dynamic shifting."""
        module = importlib.import_module(self.pipeline_class.__module__)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            _, _, height, width = latents.shape
            kwargs["mu"] = module.calculate_shift(
                (height // patch) * (width // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = module.retrieve_timesteps(scheduler, params.num_inference_steps, self.device, **kwargs)
        scheduler.set_begin_index(0)
        return timesteps

    # ---- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._require("vae")
        vae = self.components["vae"]
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        """Images in [-1, 1] -> PIL images (``"pil"``), float arrays (``"np"``) or tensors (``"pt"``)."""
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
