"""What diffusers' flow-matching text-to-image pipelines with packed 2x2 latents share (Qwen-Image,
FLUX.1): latents drawn by the pipeline's own ``prepare_latents`` as (B, seq, C) tokens, timesteps
with a resolution-dependent shift, ``timestep / 1000`` as the transformer's input, the distilled
guidance embedding for transformers that have one, and the pipeline's image post-processing.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import numpy as np
import torch

from .adapter import FamilyAdapter, SamplingParams, TextConditioning
from .contract import LatentLayout
from .loading import CheckpointInfo


class FlowMatchImageAdapter(FamilyAdapter):
    """Base of flow-matching image families whose pipeline packs 2x2 latent patches into tokens."""

    latent_layout = LatentLayout.PACKED_TOKENS
    #: latent patch edge the pipeline packs into one token
    latent_patch: ClassVar[int] = 2

    def _helper_pipeline(self) -> Any:
        pipe = super()._helper_pipeline()
        # Without its VAE loaded, a diffusers pipeline falls back to a scale factor of 8; take the
        # real one from the VAE's config instead, so every stage agrees on the latent geometry.
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.image_processor = type(pipe.image_processor)(vae_scale_factor=self.vae_scale_factor * self.latent_patch)
        return pipe

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        return cls.vae_scale_from_config(info) * cls.latent_patch

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latents (the transformer's token width / patch area)."""
        return self.transformer.config.in_channels // self.latent_patch**2

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        # drawn by the pipeline's own prepare_latents, exactly as diffusers draws them
        prepared = self.pipe.prepare_latents(
            batch,
            self.latent_channels,
            params.height,
            params.width,
            cond.positive["encoder_hidden_states"].dtype,
            self.device,
            generator,
        )
        return self._latents_and_kwargs(prepared, params, cond)

    def _latents_and_kwargs(
        self, prepared: Any, params: SamplingParams, cond: TextConditioning
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Split what the pipeline's ``prepare_latents`` returned into the latents and the extra
        transformer kwargs of the family (positions, shapes, attention kwargs)."""
        raise NotImplementedError

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        """Timesteps with resolution-dependent shift (``mu``), computed with the pipeline module's
        own ``calculate_shift`` and ``retrieve_timesteps``."""
        module = importlib.import_module(self.pipeline_class.__module__)
        num_steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = module.calculate_shift(
            latents.shape[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = module.retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def timestep_input(self, t: torch.Tensor, state: Any, batch: int) -> torch.Tensor:
        return t.expand(batch).to(state.latents.dtype) / 1000

    def guidance_kwargs(self, params: SamplingParams, batch: int) -> dict[str, Any]:
        """The distilled-guidance embedding input (``None`` for transformers without one)."""
        if not self.transformer.config.guidance_embeds:
            return {"guidance": None}
        scale = self.default_guidance_scale if params.guidance_scale is None else params.guidance_scale
        if scale is None:
            raise ValueError(f"guidance_scale is required for a guidance-distilled {self.family} transformer")
        return {"guidance": torch.full([batch], scale, device=self.device, dtype=torch.float32)}

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        """Images in [-1, 1] -> PIL images (``"pil"``), float arrays (``"np"``) or tensors (``"pt"``)."""
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
