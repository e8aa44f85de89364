"""FLUX.2-klein family adapter (FLUX.2-klein-4B, and the undistilled klein-base checkpoints).

Qwen3 text encoder (hidden states of layers 9, 18 and 27 stacked per token, chat-templated prompt
padded to 512 tokens); ``Flux2Transformer2DModel`` on 2x2-patchified latents packed as tokens with
4-axis position ids; timestep shift from the pipeline's empirical ``mu`` (a function of the image
token count and the step count); the ``AutoencoderKLFlux2`` latents are batch-normalised, so
decoding first undoes the VAE's ``bn`` running statistics, as ``Flux2KleinPipeline`` does.

Guidance as ``Flux2KleinPipeline`` decides it: no guidance embedding ever enters the transformer
(``guidance=None``); classic CFG with ``guidance_scale`` runs only for an undistilled checkpoint
(``model_index.json``: ``is_distilled`` false) and ``guidance_scale > 1``, with the negative prompt
(the pipeline encodes ``""``) as a second, serial call. A step-distilled checkpoint (klein-4B)
ignores ``guidance_scale``: one call per step.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation
from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

from .adapter import SamplingParams, TextConditioning
from .contract import CacheBlocks
from .flow_match import FlowMatchImageAdapter
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first (double-stream) block's timestep-modulated image input."""
    (shift, scale, _), _ = Flux2Modulation.split(kwargs["temb_mod_img"], 2)
    return (1 + scale) * block.norm1(kwargs["hidden_states"]) + shift


def is_distilled(info: CheckpointInfo) -> bool:
    """Whether the checkpoint is step-distilled (``model_index.json``'s ``is_distilled``)."""
    index = json.loads((info.path / "model_index.json").read_text())
    return bool(index.get("is_distilled", False))


class Flux2KleinAdapter(FlowMatchImageAdapter):
    family = "flux2-klein"
    pipeline_class = Flux2KleinPipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKLFlux2,
        "text_encoder": Qwen3ForCausalLM,
        "tokenizer": Qwen2TokenizerFast,
        "transformer": Flux2Transformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    max_sequence_length = 512  # the pipeline's default
    text_encoder_out_layers = (9, 18, 27)  # the pipeline's default
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    # Verified in tests/test_family_flux2_klein.py (SP and TP from the class's diffusers
    # _cp_plan / _tp_plan; CFG-parallel for undistilled checkpoints running CFG; exact VAE patch parallel).
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.SEQUENCE_PARALLEL, Feature.CFG_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.LORA, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("time_guidance_embed.*", "*_modulation*", "x_embedder", "context_embedder", "norm_out.*",
                            "proj_out")
    # TeaCache polynomial: identity (no published fit for FLUX.2 is known; the rel-L1 distance of the
    # modulated input is used as is). Blocks: the double-stream list, then the single-stream list,
    # which runs on the joined [text; image] sequence (the cache hooks split it at the text length).
    cache_blocks = CacheBlocks(
        ("transformer_blocks", "single_transformer_blocks"), _modulated_input,
        (1.0, 0.0), layer_config_keys=("num_layers", "num_single_layers"),
    )

    def _helper_pipeline(self) -> Any:
        pipe = self.pipeline_class(
            **{name: self.components.get(name) for name in self.component_types}, is_distilled=self.distilled
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.image_processor = type(pipe.image_processor)(vae_scale_factor=self.vae_scale_factor * self.latent_patch)
        return pipe

    @property
    def distilled(self) -> bool:
        return is_distilled(self.info)

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, text_ids = self.pipe.encode_prompt(
            prompt=list(texts),
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def _latents_and_kwargs(
        self, prepared: tuple[torch.Tensor, torch.Tensor], params: SamplingParams, cond: TextConditioning
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        latents, latent_ids = prepared
        return latents, {"img_ids": latent_ids, "joint_attention_kwargs": None}

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        """Timesteps shifted by the pipeline's ``compute_empirical_mu`` (image tokens, step count)."""
        module = importlib.import_module(self.pipeline_class.__module__)
        num_steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = module.compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=num_steps)
        timesteps, _ = module.retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def guidance_kwargs(self, params: SamplingParams, batch: int) -> dict[str, Any]:
        return {"guidance": None}  # the pipeline never passes a guidance embedding

    def cfg_scale(self, params: SamplingParams, cond: TextConditioning) -> float | None:
        """Classic CFG as the pipeline's ``do_classifier_free_guidance``: ``guidance_scale > 1`` and
        an undistilled checkpoint."""
        if self.distilled:
            return None
        return super().cfg_scale(params, cond)

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        out = module(hidden_states=latents.to(module.dtype), timestep=timestep, **kwargs, return_dict=False)[0]
        return out[:, : latents.size(1)]

    def final_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed tokens -> the VAE's latents (B, C, H/8, W/8): unpacked by position ids,
        batch-norm statistics undone, 2x2 patches unfolded (the pipeline's ``output_type="latent"``)."""
        vae = self.components["vae"]
        pipe = self.pipe
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        ids = pipe._prepare_latent_ids(latents.new_empty(latents.shape[0], 0, latent_h // 2, latent_w // 2))
        latents = pipe._unpack_latents_with_ids(latents, ids.to(latents.device), latent_h // 2, latent_w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
        return pipe._unpatchify_latents(latents * std + mean)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._require("vae")
        vae = self.components["vae"]
        latents = self.final_latents(latents, height, width)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
