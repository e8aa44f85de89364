"""GLM-Image family adapter (THUDM/glm-4-vision in the seed table; the diffusers checkpoint
zai-org/GLM-Image).

Two models, two stages before the DiT: an autoregressive prior (``GlmImageForConditionalGeneration``
over ``GlmImageProcessor``'s chat template) samples the image's tokens with ``generate`` (a
preview grid, then the target grid at 1/32 of the image size; the target tokens are upsampled 2x to
the DiT's patch grid), and a ByT5 glyph encoder (``T5EncoderModel``) encodes the quoted text of the
prompt. ``GlmImageTransformer2DModel`` denoises spatial latents (it patchifies itself), adding the
prior tokens' embedding to every image patch; ``AutoencoderKL`` decodes with per-channel
``latents_mean``/``latents_std``. Timesteps as ``GlmImagePipeline``: ``linspace(1000, 1)`` with the
CogView4 shift from the patch count, ``t - 1`` as input. Guidance: classic CFG at
``guidance_scale > 1`` (1.5 by default), the negative branch the glyph encoding of ``""`` with the
prior's tokens dropped (``prior_token_drop``), two serial calls (the two texts differ in length).

The prior is its own stage (``"prior"``): ``prior_tokens`` runs it, seeded by the request, and
``with_prior`` hands its tokens to the DiT's branches as denoiser kwargs.
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_processor import Attention
from transformers import ByT5Tokenizer, GlmImageForConditionalGeneration, GlmImageProcessor, T5EncoderModel

from .adapter import FamilyAdapter, SamplingParams, TextConditioning, count_local_heads
from .contract import CacheBlocks, CFGEvaluation, Conditioning, LatentLayout
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first block's timestep-modulated image input, as its ``norm1``
    computes it before attention."""
    return block.norm1(kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["temb"])[0]


class GlmImageAdapter(FamilyAdapter):
    family = "glm-image"
    pipeline_class = GlmImagePipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKL,
        "text_encoder": T5EncoderModel,
        "tokenizer": ByT5Tokenizer,
        "transformer": GlmImageTransformer2DModel,
        "vision_language_encoder": GlmImageForConditionalGeneration,
        "processor": GlmImageProcessor,
    }
    stage_components = {
        "prior": ("vision_language_encoder", "processor"),
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    latent_layout = LatentLayout.SPATIAL
    conditioning = frozenset({Conditioning.TEXT, Conditioning.PRIOR_TOKENS})
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    cfg_evaluation = CFGEvaluation.SERIAL  # the two branches' glyph sequences differ in length
    max_sequence_length = 2048  # the pipeline's default (glyph tokens)
    # Verified in tests/test_family_glm_image.py: caches (threshold 0 equals uncached, evaluations
    # drop); CFG-parallel, Ulysses, Ring and tensor parallel at degree 2 equal one rank; exact VAE
    # patch parallel decode (AutoencoderKL's plan) over 2 workers equals one; layerwise offload (and
    # model-level offload of the prior) equals resident; FP8 runs close to the unquantized path. The
    # rest is refused at start-up by check_support; LoRA in particular: GlmImagePipeline has no LoRA
    # loader (``lora_state_dict``) to read adapters with.
    supported_features = frozenset({Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL,
                                    Feature.SEQUENCE_PARALLEL, Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL,
                                    Feature.LAYERWISE_OFFLOAD, Feature.FP8})
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why): the timestep
    # and size embedders, the patch/glyph/prior projections, each block's adaLN modulation and the
    # output norm and projection
    quant_ignored_layers = ("time_condition_embed.*", "image_projector.*", "glyph_projector.*", "prior_projector.*",
                            "*.norm1.linear", "norm_out.*", "proj_out")
    # Sequence parallel (the class has no _cp_plan): the model builds its token streams inside
    # forward from a 4-D latent, so the plan splits where they appear: the patch projection, the
    # prior tokens' projection (after ``prior_token_drop`` zeroed the dropped ones; both added
    # token by token), the glyph projection (text tokens: always an even count, >= 2) and the
    # image RoPE (cos, sin per image token); ``proj_out`` is gathered before the unpatchify. Each
    # attention joins its rank's [text; image] shards, so every rank's sequence is a contiguous
    # share of each stream and RoPE stays with its tokens.
    cp_plan = {
        "image_projector": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "prior_projector": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "glyph_projector": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
                 1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    # Tensor parallel (the class has no _tp_plan): Q/K/V column-sharded (whole heads per rank: the
    # QK layer norms are per head), the output projection row-sharded; the GELU MLP (shared by both
    # streams) column- then row-sharded. Modulation, embedders and the output layers stay
    # replicated. Degrees must divide the head count (checked at start-up).
    tp_plan = {
        "transformer_blocks.*.attn1.to_q": "colwise",
        "transformer_blocks.*.attn1.to_k": "colwise",
        "transformer_blocks.*.attn1.to_v": "colwise",
        "transformer_blocks.*.attn1.to_out.0": "rowwise",
        "transformer_blocks.*.ff.net.0.proj": "colwise",
        "transformer_blocks.*.ff.net.2": "rowwise",
    }
    # Blocks: one dual-stream list, called positionally (the model passes hidden_states,
    # encoder_hidden_states, temb, image_rotary_emb, attention_mask, attention_kwargs in order, the
    # kv_cache by keyword) and returning (hidden_states, encoder_hidden_states). TeaCache
    # polynomial: identity (no published fit for GLM-Image is known to us; the rel-L1 distance of
    # the modulated input is used as is; fit one with tools/fit_tea_cache.py).
    cache_blocks = CacheBlocks(
        ("transformer_blocks",), _modulated_input, (1.0, 0.0),
        positional_args=("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "attention_mask",
                         "attention_kwargs"),
        hidden_first=True,
    )

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        super().__init__(components, info, **kwargs)
        count_local_heads(components.get(self.denoisers[0]), Attention, lambda m: m.norm_q.normalized_shape[0])

    def _helper_pipeline(self) -> Any:
        pipe = super()._helper_pipeline()
        # without its VAE loaded the pipeline falls back to a scale of 8: take the checkpoint's
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.image_processor = type(pipe.image_processor)(vae_scale_factor=self.vae_scale_factor)
        return pipe

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        # the pipeline's check: multiples of VAE scale x patch x 2 (32: the prior's token grid)
        return cls.vae_scale_from_config(info) * info.config("transformer").get("patch_size", 2) * 2

    # ---- prior --------------------------------------------------------------------------------

    @torch.inference_mode()
    def prior_tokens(self, prompt: str, height: int, width: int, seed: int) -> torch.Tensor:
        """The prior's tokens for one prompt, (1, tokens) on the patch grid of the DiT, sampled
        with the request's seed (the pipeline seeds torch's global generator from it; it is
        restored afterwards, so the process's other random streams are untouched)."""
        self._require(*self.stage_components["prior"])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            generator = torch.Generator("cpu").manual_seed(seed)
            tokens, _, _ = self.pipe.generate_prior_tokens(
                prompt=prompt, height=height, width=width, image=None, device=self.device, generator=generator
            )
        return tokens.cpu()

    def with_prior(self, cond: TextConditioning, tokens: torch.Tensor) -> TextConditioning:
        """``cond`` with the prior's tokens as the DiT's ``prior_token_id`` in every branch: kept
        in the prompt branch, dropped (``prior_token_drop``) in the negative one."""
        batch = cond.positive["encoder_hidden_states"].shape[0]
        ids = tokens.to(self.device).repeat_interleave(batch // tokens.shape[0], dim=0)
        positive = {**cond.positive, "prior_token_id": ids, "prior_token_drop": torch.zeros_like(ids, dtype=torch.bool)}
        negative = None if cond.negative is None else {
            **cond.negative, "prior_token_id": ids, "prior_token_drop": torch.ones_like(ids, dtype=torch.bool)}
        return TextConditioning(positive, negative, cond.batch_size)

    # ---- encode -------------------------------------------------------------------------------

    def text_shape_key(self, text: str) -> Hashable:
        return text  # the glyph sequence's length depends on the text: each encoded alone

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds = self.pipe._get_glyph_embeds(list(texts), self.max_sequence_length, self.device, self.dtype)
        return {"encoder_hidden_states": embeds.repeat_interleave(num_images_per_prompt, dim=0)}

    # ---- denoise ------------------------------------------------------------------------------

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        dtype = cond.positive["encoder_hidden_states"].dtype
        latents = self.pipe.prepare_latents(batch, self.transformer.config.in_channels, params.height, params.width,
                                            dtype, self.device, generator)
        size = torch.tensor([[params.height, params.width]], dtype=dtype, device=self.device).repeat(batch, 1)
        crop = torch.zeros((batch, 2), dtype=dtype, device=self.device)  # crops_coords_top_left (0, 0)
        return latents, {"target_size": size, "crop_coords": crop}

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        module = importlib.import_module(self.pipeline_class.__module__)
        patch = self.transformer.config.patch_size
        seq_len = (params.height // self.vae_scale_factor) * (params.width // self.vae_scale_factor) // patch**2
        train = scheduler.config.num_train_timesteps
        timesteps = np.linspace(train, 1.0, params.num_inference_steps + 1)[:-1].astype(np.int64).astype(np.float32)
        mu = module.calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                                    scheduler.config.get("base_shift", 0.25), scheduler.config.get("max_shift", 0.75))
        timesteps, _ = module.retrieve_timesteps(scheduler, params.num_inference_steps, self.device, timesteps,
                                                 timesteps / train, mu=mu)
        return timesteps

    def timestep_input(self, t: torch.Tensor, state: Any, batch: int) -> torch.Tensor:
        return t.expand(batch) - 1

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        return module(hidden_states=latents, timestep=timestep, **kwargs, return_dict=False)[0].float()

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._require("vae")
        vae = self.components["vae"]
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
