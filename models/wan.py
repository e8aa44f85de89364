"""Wan2.2 family adapter: T2V-A14B (two experts), TI2V-5B (one expert, ``expand_timesteps``).

UMT5 text encoder (``WanPipeline.encode_prompt``, padded to 512 tokens, so every prompt batches),
``AutoencoderKLWan`` (latents normalized by its per-channel mean/std), 5-D latents
(B, C, frames, H, W) that the transformer patchifies itself, flow-matching UniPC scheduler.

**Two experts** (A14B): ``transformer`` denoises the high-noise steps and ``transformer_2`` the
steps whose timestep is below ``boundary_ratio x num_train_timesteps`` (``boundary_ratio`` from
model_index.json), each with its own CFG scale (``guidance_scale``, ``guidance_scale_2``; the second
defaults to the first, as in the pipeline). Both are loaded by the DiT stage; ``denoiser_for``
picks one per step. A checkpoint without ``transformer_2`` (TI2V-5B) has one expert.

**expand_timesteps** (TI2V-5B): the transformer takes one timestep per latent token (the first
frame's tokens keep t=0 when an image conditions them; text-to-video gives every token ``t``).

**An input image** (``WanImageToVideoPipeline``'s path; the VAE stage's ``encode_request_images``,
at the request's size, as the pipeline's ``video_processor.preprocess``; the posterior's mode,
normalized by the VAE's mean/std):

- I2V-A14B (``WanI2VAdapter``, family ``wan2.2-i2v``, image required): the image is encoded as the
  first frame of ``num_frames`` frames of zeros; each expert reads the noise, a first-frame mask
  (one channel per frame of a latent frame: ones on the first latent frame) and those latents,
  concatenated on channels. Wan2.2's layout has no CLIP image encoder (``image_encoder`` null,
  the transformer's ``image_dim`` None), so no ``encoder_hidden_states_image``; a Wan2.1 layout
  with one is refused at load.
- TI2V-5B with an image (``expand_timesteps``; image optional): the image alone is encoded into
  one latent frame that replaces the first latent frame of the denoiser's input at every step,
  whose tokens get timestep 0; the final latents' first frame is that image latent.

The prompt is read alone either way (no vision-language encoder: ``encode_image_prompt`` is the text's).

Classic CFG with the negative prompt ("" when none is given, as the pipeline), the two branches
in two calls per step (as the pipeline; ``CFGEvaluation.SERIAL``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import numpy as np
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import T5TokenizerFast, UMT5EncoderModel

from .adapter import DenoiseState, FamilyAdapter, ImageConditioning, SamplingParams, TextConditioning
from .contract import CacheBlocks, CFGEvaluation, Conditioning, LatentLayout, Output
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first block's timestep-modulated self-attention input (its ``norm1``
    output scaled and shifted by the block's table plus ``temb``: one vector per sample, or one per
    token with ``expand_timesteps``)."""
    hidden, temb = kwargs["hidden_states"], kwargs["temb"]
    if temb.ndim == 4:  # (B, tokens, 6, dim)
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:  # (B, 6, dim)
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden.float()) * (1 + scale) + shift


def pipeline_config(info: CheckpointInfo) -> dict[str, Any]:
    """``boundary_ratio`` and ``expand_timesteps`` of the checkpoint's model_index.json."""
    index = json.loads((info.path / "model_index.json").read_text())
    return {"boundary_ratio": index.get("boundary_ratio"), "expand_timesteps": bool(index.get("expand_timesteps", False))}


class WanAdapter(FamilyAdapter):
    family = "wan2.2"
    pipeline_class = WanPipeline
    component_types = {
        "tokenizer": T5TokenizerFast,
        "text_encoder": UMT5EncoderModel,
        "transformer": WanTransformer3DModel,
        "transformer_2": WanTransformer3DModel,
        "vae": AutoencoderKLWan,
        "scheduler": UniPCMultistepScheduler,
    }
    stage_components = {
        "encode": ("tokenizer", "text_encoder"),
        "denoise": ("transformer", "transformer_2", "scheduler"),
        "decode": ("vae",),
    }
    optional_components = frozenset({"transformer_2"})
    denoisers = ("transformer", "transformer_2")
    latent_layout = LatentLayout.VIDEO
    output = Output.VIDEO
    # an input image only with expand_timesteps (TI2V-5B; optional there, ModelSpec.min_input_images 0);
    # the T2V-A14B entry takes none (max_input_images 0)
    conditioning = frozenset({Conditioning.TEXT, Conditioning.IMAGE})
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    cfg_evaluation = CFGEvaluation.SERIAL  # as the pipeline: one call per branch
    max_sequence_length = 512  # the pipeline's __call__ default
    # Verified in tests/test_family_wan.py: caches on both experts (threshold 0 equals uncached,
    # evaluations drop); CFG-parallel, Ulysses and Ring equal one rank; exact VAE patch parallel
    # (both Wan VAEs) equals one worker.
    supported_features = frozenset({Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL,
                                    Feature.SEQUENCE_PARALLEL, Feature.VAE_PATCH_PARALLEL})
    unsupported = {
        Feature.TENSOR_PARALLEL: "Wan's q/k RMS norm runs across all heads (qk_norm='rms_norm_across_heads'): "
        "column-sharded heads would need an all-reduce inside the norm; use ulysses_degree or ring_degree",
        Feature.LORA: "LoRA per expert is not implemented yet (the adapter store hooks one denoiser)",
        Feature.LAYERWISE_OFFLOAD: "not verified for two experts yet; use enable_cpu_offload",
        Feature.FP8: "not verified for Wan2.2 yet",
    }
    # Sequence parallel: diffusers' _cp_plan (the video tokens, their rotary tables and, with
    # expand_timesteps, their timesteps are split; the text is not); only the self-attention runs
    # over all ranks' tokens, the cross-attention takes each rank's queries against the whole text.
    cp_attention = "blocks.*.attn1"
    # Blocks are called positionally and return the video stream only (the text is cross-attention
    # context). TeaCache polynomial: the identity (no fit for Wan2.2 is known to us; the raw relative
    # L1 change of the probe; fit one per checkpoint with tools/fit_tea_cache.py).
    cache_blocks = CacheBlocks(("blocks",), _modulated_input, (0.0, 0.0, 0.0, 1.0, 0.0),
                               positional_args=("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"),
                               encoder_arg=None)

    #: the checkpoint animates an input image and needs one (I2V-A14B)
    requires_image: bool = False

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        self.pipeline_config = pipeline_config(info)
        super().__init__(components, info, **kwargs)

    def _helper_pipeline(self) -> Any:
        pipe = self.pipeline_class(**{name: self.components.get(name) for name in self.component_types},
                                   **self.pipeline_config)
        pipe.set_progress_bar_config(disable=True)
        # without its VAE the pipeline assumes Wan2.1's factors: take the checkpoint's
        vae = self.info.config("vae")
        pipe.vae_scale_factor_temporal = vae.get("scale_factor_temporal", 4)
        pipe.vae_scale_factor_spatial = vae.get("scale_factor_spatial", 8)
        pipe.video_processor = type(pipe.video_processor)(vae_scale_factor=pipe.vae_scale_factor_spatial)
        return pipe

    @classmethod
    def vae_scale_from_config(cls, info: CheckpointInfo) -> int:
        return int(info.config("vae").get("scale_factor_spatial", 8))

    @classmethod
    def temporal_scale_from_config(cls, info: CheckpointInfo) -> int:
        """Frames per latent frame (after the first): ``num_frames`` must be ``k x this + 1``."""
        return int(info.config("vae").get("scale_factor_temporal", 4))

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        """The VAE's spatial scale times the transformer's spatial patch."""
        patch = info.config("transformer").get("patch_size", (1, 2, 2))
        return cls.vae_scale_from_config(info) * int(patch[1])

    @classmethod
    def checkpoint_spec_fields(cls, info: CheckpointInfo) -> dict[str, Any]:
        return {**super().checkpoint_spec_fields(info), "boundary_ratio": pipeline_config(info)["boundary_ratio"],
                "frame_multiple": cls.temporal_scale_from_config(info)}

    def loaded_denoisers(self) -> tuple[str, ...]:
        return tuple(name for name in self.denoisers if self.components.get(name) is not None)

    # ---- encode -------------------------------------------------------------------------------

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(texts), negative_prompt=None, do_classifier_free_guidance=False,
            num_videos_per_prompt=num_images_per_prompt, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"encoder_hidden_states": embeds}

    def encode_image_prompt(
        self, texts: Sequence[str], images: Sequence[Any], num_images_per_prompt: int,
        vision_features: Any = None,
    ) -> tuple[dict[str, torch.Tensor | None], Any]:
        # Wan2.2 reads the prompt alone: the image reaches the experts through the VAE only
        return self.encode_text_kwargs(texts, num_images_per_prompt), None

    def image_encode_key(self, params: SamplingParams) -> str:
        """The image latents depend on the output size (the image is resized to it) and, for I2V, on
        the frame count (the image is encoded as the first of ``num_frames`` frames)."""
        frames = 1 if self.pipeline_config["expand_timesteps"] else params.num_frames
        return f"{params.width}x{params.height}x{frames}"

    @torch.inference_mode()
    def encode_request_images(self, images: Sequence[Any], params: SamplingParams) -> ImageConditioning:
        """The input image -> its normalized VAE latents at the request's size (as the pipeline's
        ``prepare_latents``): (1, z, latent frames, h, w) for I2V, one latent frame with ``expand_timesteps``."""
        self._require("vae")
        if not self.takes_image:
            raise ValueError(f"{self.info.path.name}: a two-expert text-to-video checkpoint takes no input image")
        vae = self.components["vae"]
        image = images[0]
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pixels = self.pipe.video_processor.preprocess(pil.convert("RGB"), height=params.height, width=params.width)
        video = pixels.to(self.device, torch.float32).unsqueeze(2)  # (1, 3, 1, H, W) in [-1, 1]
        if not self.pipeline_config["expand_timesteps"]:  # the first frame of a video of zeros
            zeros = video.new_zeros(1, 3, params.num_frames - 1, params.height, params.width)
            video = torch.cat([video, zeros], dim=2)
        latents = retrieve_latents(vae.encode(video.to(vae.dtype)), sample_mode="argmax").to(torch.float32)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return ImageConditioning([(latents - mean) * inv_std], [(params.height, params.width)])

    # ---- prepare ------------------------------------------------------------------------------

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None,
        images: ImageConditioning | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if images is None:
            if self.requires_image:
                raise ValueError(f"{self.family} animates an input image; the request has none")
            latents = self.pipe.prepare_latents(
                batch, self.transformer.config.in_channels, params.height, params.width, params.num_frames,
                torch.float32, self.device, generator,
            )
            return latents, {}
        if not self.takes_image:
            raise ValueError(f"{self.info.path.name}: a two-expert text-to-video checkpoint takes no input image")
        # the noise as both pipelines draw it (float32, the generator's device: the CPU)
        z_dim = int(self.info.config("vae")["z_dim"])
        vae = self.info.config("vae")
        spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
        frames = (params.num_frames - 1) // temporal + 1
        shape = (batch, z_dim, frames, params.height // spatial, params.width // spatial)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        condition = images.latents[0].to(self.device, torch.float32).repeat(batch, 1, 1, 1, 1)
        if self.pipeline_config["expand_timesteps"]:
            # the first latent frame is the image's, at timestep 0 (mask 0 there, 1 elsewhere)
            mask = torch.ones(1, 1, *shape[2:], dtype=torch.float32, device=self.device)
            mask[:, :, 0] = 0
            return latents, {"image_condition": condition, "first_frame_mask": mask}
        # one mask channel per frame of a latent frame: the first latent frame (the image's) is known
        mask = torch.zeros(batch, temporal, *shape[2:], dtype=torch.float32, device=self.device)
        mask[:, :, 0] = 1
        return latents, {"image_condition": torch.cat([mask, condition], dim=1)}

    @property
    def takes_image(self) -> bool:
        """Whether this checkpoint conditions on an input image: an I2V one, or one with ``expand_timesteps``."""
        return self.requires_image or self.pipeline_config["expand_timesteps"]

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    @property
    def boundary_timestep(self) -> float | None:
        """Steps at or above this timestep run the high-noise expert (``None``: one expert)."""
        ratio = self.pipeline_config["boundary_ratio"]
        return None if ratio is None else ratio * self.components["scheduler"].config.num_train_timesteps

    def _low_noise(self, state: DenoiseState, t: torch.Tensor) -> bool:
        boundary = self.boundary_timestep
        return boundary is not None and float(t) < boundary

    def denoiser_for(self, state: DenoiseState, index: int, t: torch.Tensor) -> str:
        return "transformer_2" if self._low_noise(state, t) else "transformer"

    def step_cfg_scale(self, state: DenoiseState, index: int, t: torch.Tensor) -> float | None:
        """``guidance_scale_2`` on the low-noise expert's steps (default: ``guidance_scale``)."""
        if state.cfg_scale is None:
            return None
        scale_2 = state.params.guidance_scale_2
        return scale_2 if self._low_noise(state, t) and scale_2 is not None else state.params.guidance_scale

    def timestep_input(self, t: torch.Tensor, state: DenoiseState, batch: int) -> torch.Tensor:
        if not self.pipeline_config["expand_timesteps"]:
            return t.expand(batch)
        patch = self.transformer.config.patch_size
        mask = state.branch_kwargs.get("first_frame_mask")
        if mask is not None:  # an input image: its (first-frame) tokens at timestep 0
            return (mask[0, 0][:, :: patch[1], :: patch[2]] * t).flatten().unsqueeze(0).expand(batch, -1)
        # one timestep per latent token of the (1, 2, 2)-patched grid: all ``t`` for text-to-video
        _, _, frames, height, width = state.latents.shape
        tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
        return t.to(torch.float32).expand(batch, tokens)

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        kwargs = dict(kwargs)
        condition, mask = kwargs.pop("image_condition", None), kwargs.pop("first_frame_mask", None)
        if mask is not None:  # TI2V: the image's latent frame replaces the first one
            latents = (1 - mask) * condition + mask * latents
        elif condition is not None:  # I2V: mask and image latents follow the noise on channels
            latents = torch.cat([latents, condition], dim=1)
        return module(hidden_states=latents.to(module.dtype), timestep=timestep, **kwargs, return_dict=False)[0]

    @torch.inference_mode()
    def denoise(self, state: DenoiseState, cond: TextConditioning, callback: Any = None) -> torch.Tensor:
        latents = super().denoise(state, cond, callback)
        mask = state.branch_kwargs.get("first_frame_mask")
        if mask is None:
            return latents
        # TI2V with an image: the result's first latent frame is the image's (as the pipeline)
        return (1 - mask) * state.branch_kwargs["image_condition"] + mask * latents

    # ---- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents -> video (B, 3, frames, H, W) in [-1, 1]."""
        self._require("vae")
        vae = self.components["vae"]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return vae.decode(latents / inv_std + mean, return_dict=False)[0]  # the pipeline's arithmetic

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        """Video in [-1, 1] -> per sample a list of PIL frames (``"pil"``), float arrays (B, frames,
        H, W, 3) (``"np"``) or tensors (``"pt"``)."""
        return self.pipe.video_processor.postprocess_video(images, output_type=output_type)


class WanI2VAdapter(WanAdapter):
    """Wan2.2 I2V-A14B (``WanImageToVideoPipeline``): two experts as T2V-A14B, an input image required.

    Wan2.2's layout only: no CLIP image encoder (the Wan2.1 I2V checkpoints' ``image_encoder`` and
    the transformer's ``image_dim`` feed ``encoder_hidden_states_image``; refused at load)."""

    family = "wan2.2-i2v"
    pipeline_class = WanImageToVideoPipeline
    requires_image = True
    # Verified in tests/test_family_wan.py (I2V): CFG-parallel and Ring at degree 2 equal one rank;
    # TeaCache at threshold 0 equals uncached; exact VAE patch parallel (decode) as T2V's VAE.
    supported_features = frozenset({Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL,
                                    Feature.SEQUENCE_PARALLEL, Feature.VAE_PATCH_PARALLEL})

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        image_dim = info.config("transformer").get("image_dim")
        if "image_encoder" in info.components or image_dim is not None:
            raise ValueError(
                f"{info.path}: a Wan2.1 image-to-video layout (CLIP image_encoder, transformer image_dim="
                f"{image_dim}) is not supported; Wan2.2 I2V conditions on the image's VAE latents only")
        super().__init__(components, info, **kwargs)
        # the prompt through WanPipeline's encode_prompt: WanImageToVideoPipeline's prompt cleaning
        # calls ftfy without checking it is installed (WanPipeline checks); the same text otherwise
        self.text_pipe = WanPipeline(tokenizer=components.get("tokenizer"), text_encoder=components.get("text_encoder"),
                                     vae=None, scheduler=None)

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, _ = self.text_pipe.encode_prompt(
            prompt=list(texts), negative_prompt=None, do_classifier_free_guidance=False,
            num_videos_per_prompt=num_images_per_prompt, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"encoder_hidden_states": embeds}
