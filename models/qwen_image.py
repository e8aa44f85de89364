"""Qwen-Image family adapter (Qwen-Image, Qwen-Image-2512 text-to-image).

Qwen2.5-VL text encoder with the pipeline's prompt template; true CFG with a negative prompt
(``true_cfg_scale``), combined with the pipeline's norm rescaling; 3-D (frame axis) VAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .adapter import SamplingParams, TextConditioning
from .contract import CacheBlocks
from .flow_match import FlowMatchImageAdapter
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first block's timestep-modulated image input."""
    img_mod1 = block.img_mod(kwargs["temb"]).chunk(2, dim=-1)[0]
    modulated, _ = block._modulate(block.img_norm1(kwargs["hidden_states"]), img_mod1, kwargs.get("modulate_index"))
    return modulated


class QwenImageAdapter(FlowMatchImageAdapter):
    family = "qwen-image"
    pipeline_class = QwenImagePipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKLQwenImage,
        "text_encoder": Qwen2_5_VLForConditionalGeneration,
        "tokenizer": Qwen2Tokenizer,
        "transformer": QwenImageTransformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    max_sequence_length = 512  # the pipeline's default
    guidance = frozenset({Guidance.NONE, Guidance.TRUE_CFG})
    # Verified: caches (tests/test_cache.py), SP/TP/CFG-parallel equal one rank (tests/test_parallel.py),
    # exact VAE patch parallel decode (tests/test_vae_parallel.py).
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.SEQUENCE_PARALLEL, Feature.CFG_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.LORA, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("time_text_embed.*", "img_in", "txt_in", "*.img_mod.*", "*.txt_mod.*", "norm_out.*", "proj_out")
    # TeaCache polynomial: vLLM-Omni's published fit for Qwen-Image.
    cache_blocks = CacheBlocks(("transformer_blocks",), _modulated_input, (-450.0, 280.0, -45.0, 3.2, -0.02))

    @classmethod
    def vae_scale_from_config(cls, info: CheckpointInfo) -> int:
        return 2 ** len(info.config("vae")["temperal_downsample"])

    def text_shape_key(self, text: str) -> int:
        # The pipeline pads a batch to its longest prompt; equal token counts mean no padding,
        # so a batch gives each text exactly what it gets alone.
        return len(self.pipe.tokenizer(self.pipe.prompt_template_encode.format(text)).input_ids)

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=list(texts),
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def _latents_and_kwargs(
        self, prepared: torch.Tensor, params: SamplingParams, cond: TextConditioning
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        vsf = self.vae_scale_factor
        img_shapes = [[(1, params.height // vsf // 2, params.width // vsf // 2)]] * cond.batch_size
        return prepared, {"img_shapes": img_shapes, "attention_kwargs": {}}

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        comb = uncond + scale * (cond - uncond)
        # QwenImagePipeline rescales the combined prediction to the norm of the conditional one.
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._require("vae")
        vae = self.components["vae"]
        latents = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        return vae.decode(latents, return_dict=False)[0][:, :, 0]
