"""Stable Audio Open family adapter (stabilityai/stable-audio-open-1.0): text to stereo audio.

As ``StableAudioPipeline``: a T5 encoder, its states projected and masked by the
``StableAudioProjectionModel`` (``encode_prompt``), which also embeds ``seconds_start`` and
``seconds`` (``encode_duration``): the two seconds tokens are appended to the text for the
cross-attention and joined as the global token the DiT prepends to the 1-D latent sequence
(B, C, T) (``LatentLayout.AUDIO``). That per-request conditioning is built in the encode stage
(``request_conditioning``), so the denoiser gets complete kwargs per branch.

Guidance is classic CFG (``guidance_scale > 1``), both branches in one batched call like the
pipeline; without a negative prompt the unconditional branch is zero conditioning (text and
seconds tokens), with one it is the encoded negative prompt (registry: ``cfg_null_uncond``).
The scheduler is an EDM DPM-Solver (the real checkpoint's ``CosineDPMSolverMultistepScheduler``,
or the pipeline's type-hinted ``EDMDPMSolverMultistepScheduler``): the denoiser input is scaled
by the scheduler (``scale_model_input``) and each step gets the pipeline's extra step kwargs (the
request's generator, which seeds the cosine solver's Brownian noise). The decoder is
``AutoencoderOobleck``; the waveform is cut to [seconds_start, seconds) (``Output.AUDIO``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderOobleck, StableAudioDiTModel, StableAudioPipeline
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_audio import StableAudioProjectionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import T5EncoderModel, T5TokenizerFast

from .adapter import DenoiseState, FamilyAdapter, SamplingParams, TextConditioning
from .contract import Audio, CacheBlocks, CFGEvaluation, LatentLayout, Output
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """The first block's normalised input (its blocks have no timestep modulation: the timestep
    enters through the prepended global token). Only a probe; TeaCache is not declared."""
    return block.norm1(kwargs["hidden_states"])


@dataclasses.dataclass
class AudioDenoiseState(DenoiseState):
    """``DenoiseState`` plus the scheduler's extra step kwargs (the pipeline's
    ``prepare_extra_step_kwargs``: the request's generator for the stochastic solvers)."""

    step_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def audio_geometry(info: CheckpointInfo) -> dict[str, Any]:
    """Sample rate, channels and longest clip of a checkpoint, from its configs."""
    vae = info.config("vae")
    hop = int(np.prod(vae.get("downsampling_ratios", [2, 4, 4, 8, 8])))
    rate = int(vae.get("sampling_rate", 44100))
    frames = int(info.config("transformer").get("sample_size", 1024))
    longest = frames * hop / rate
    # the pipeline's default length is the longest clip
    return {"audio_sample_rate": rate, "audio_channels": int(vae.get("audio_channels", 2)),
            "max_audio_seconds": longest, "audio_seconds": longest}


class StableAudioAdapter(FamilyAdapter):
    family = "stable-audio"
    pipeline_class = StableAudioPipeline
    component_types = {
        # the real checkpoint: CosineDPMSolverMultistepScheduler; the pipeline's type hint: EDMDPMSolver...
        "scheduler": SchedulerMixin,
        "vae": AutoencoderOobleck,
        "text_encoder": T5EncoderModel,
        "tokenizer": T5TokenizerFast,
        "projection_model": StableAudioProjectionModel,
        "transformer": StableAudioDiTModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer", "projection_model"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    latent_layout = LatentLayout.AUDIO
    output = Output.AUDIO
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    cfg_evaluation = CFGEvaluation.BATCHED  # as the pipeline: [cond; uncond] in one call
    # Verified in tests/test_family_stable_audio.py: Cache-DiT (threshold 0 equals uncached,
    # evaluations drop), CFG-parallel, Ulysses and Ring at degree 2 equal one rank, exact VAE patch
    # parallel decode (1-D bands: parallel/vae/plans.py) equals one worker. The rest is refused at
    # start-up: LoRA (StableAudioPipeline has no LoRA loader), TeaCache (no timestep-modulated block
    # input to probe), VAE tiling (no tiled decode for AutoencoderOobleck), TP, offload and FP8 (not
    # verified for this family).
    supported_features = frozenset({Feature.CACHE_DIT, Feature.CFG_PARALLEL, Feature.SEQUENCE_PARALLEL,
                                    Feature.VAE_PATCH_PARALLEL})
    cache_blocks = CacheBlocks(("transformer_blocks",), _modulated_input, (1.0, 0.0), encoder_arg=None)
    # Sequence parallel (the class has no _cp_plan). The DiT prepends the global (seconds + timestep)
    # token to the projected latents inside its forward, so the joined sequence is split at the first
    # block's input (every rank holds a contiguous shard; the global token is on rank 0's), the 1-D
    # RoPE tables (a (cos, sin) tuple over the same positions) at the model's input, and the tokens
    # are gathered after proj_out, before the forward drops the global token. Only the
    # self-attentions (attn1) run sequence-parallel: the cross-attentions (attn2) attend from the
    # local queries to the whole text, which every rank holds, so they need no communication.
    cp_plan = {
        "": {"rotary_embedding": ContextParallelInput(split_dim=0, expected_dims=2, split_output=False)},
        "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3,
                                                                       split_output=False)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    cp_attention = "transformer_blocks.*.attn1"

    def _helper_pipeline(self) -> Any:
        # StableAudioPipeline.__init__ reads the transformer's config (rotary size), which the encode
        # and decode stages do not load: register whatever this stage has, as __init__ would.
        pipe = StableAudioPipeline.__new__(StableAudioPipeline)
        DiffusionPipeline.__init__(pipe)
        pipe.register_modules(**{name: self.components.get(name) for name in self.component_types})
        transformer = self.components.get("transformer")
        if transformer is not None:
            pipe.rotary_embed_dim = transformer.config.attention_head_dim // 2
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- declarations from the configs ----------------------------------------------------------

    @classmethod
    def vae_scale_from_config(cls, info: CheckpointInfo) -> int:
        """The VAE's down-sampling in time: its hop length (samples per latent frame)."""
        return int(np.prod(info.config("vae").get("downsampling_ratios", [2, 4, 4, 8, 8])))

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        return 1  # no image size: length is in seconds

    @classmethod
    def decoded_extent_from_config(cls, info: CheckpointInfo) -> tuple[int, int]:
        """Every latent frame is decoded (the clip is cut afterwards): (samples, 1)."""
        frames = int(info.config("transformer").get("sample_size", 1024))
        return frames * cls.vae_scale_from_config(info), 1

    @classmethod
    def checkpoint_spec_fields(cls, info: CheckpointInfo) -> dict[str, Any]:
        return {**super().checkpoint_spec_fields(info), **audio_geometry(info)}

    @property
    def sample_rate(self) -> int:
        return int(audio_geometry(self.info)["audio_sample_rate"])

    # ---- encode -------------------------------------------------------------------------------

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        # the positive-prompt path of the pipeline (its negative path zeroes padding before the
        # projection and masks after it: the same numbers)
        embeds = self.pipe.encode_prompt(list(texts), self.device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.repeat_interleave(num_images_per_prompt, dim=0)}

    def request_conditioning(self, cond: TextConditioning, params: SamplingParams) -> TextConditioning:
        text = cond.positive["encoder_hidden_states"]
        start, end = self.pipe.encode_duration(params.seconds_start or 0.0, params.seconds, self.device, False,
                                               text.shape[0])

        def with_seconds(states: torch.Tensor) -> dict[str, torch.Tensor | None]:
            return {"encoder_hidden_states": torch.cat([states, start, end], dim=1),
                    "global_hidden_states": torch.cat([start, end], dim=2)}

        positive = with_seconds(text)
        if cond.negative is not None:
            negative = with_seconds(cond.negative["encoder_hidden_states"])
        elif (params.guidance_scale or 0.0) > 1.0:  # CFG without a negative prompt: zero conditioning
            negative = {"encoder_hidden_states": torch.zeros_like(positive["encoder_hidden_states"]),
                        "global_hidden_states": positive["global_hidden_states"]}
        else:
            negative = None
        return TextConditioning(positive, negative, cond.batch_size)

    # ---- prepare ------------------------------------------------------------------------------

    def prepare(self, params: SamplingParams, cond: TextConditioning, generator: torch.Generator | None,
                images: Any = None) -> AudioDenoiseState:
        state = super().prepare(params, cond, generator, images)
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(DenoiseState)}
        return AudioDenoiseState(**fields, step_kwargs=self.pipe.prepare_extra_step_kwargs(generator, 0.0))

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        config = self.transformer.config
        latents = self.pipe.prepare_latents(batch, config.in_channels, int(config.sample_size),
                                            cond.positive["encoder_hidden_states"].dtype, self.device, generator)
        # 1-D RoPE over the global token and the latent frames
        rotary = get_1d_rotary_pos_embed(self.pipe.rotary_embed_dim, latents.shape[2] + 1, use_real=True,
                                         repeat_interleave_real=False)
        return latents, {"rotary_embedding": tuple(r.to(self.device) for r in rotary)}

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        return scheduler.timesteps

    # ---- denoise ------------------------------------------------------------------------------

    def predict_noise(self, state: DenoiseState, cond: TextConditioning, index: int, t: torch.Tensor) -> torch.Tensor:
        # the EDM input scaling, shared by the branches (the scheduler's step index starts here)
        scaled = dataclasses.replace(state, latents=state.scheduler.scale_model_input(state.latents, t))
        return super().predict_noise(scaled, cond, index, t)

    def scheduler_step(self, state: DenoiseState, noise_pred: torch.Tensor, t: torch.Tensor) -> None:
        step_kwargs = getattr(state, "step_kwargs", {})
        state.latents = state.scheduler.step(noise_pred, t, state.latents, **step_kwargs, return_dict=False)[0]

    # ---- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents (B, C, T) -> the whole waveform (B, channels, T x hop length)."""
        self._require("vae")
        vae = self.components["vae"]
        return vae.decode(latents.to(vae.dtype)).sample

    def decode_output(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """The waveform cut to [seconds_start, seconds), as the pipeline cuts it."""
        audio = self.decode(latents, params.height, params.width)
        rate = self.components["vae"].config.sampling_rate
        return audio[:, :, int((params.seconds_start or 0.0) * rate):int(params.seconds * rate)]

    def postprocess(self, audio: torch.Tensor, output_type: str = "pt") -> Any:
        """Waveforms -> float tensors (``"pt"``) or float32 arrays (``"np"``), (B, channels, samples)."""
        if output_type == "pt":
            return audio
        if output_type == "np":
            return audio.cpu().float().numpy()
        raise ValueError(f"output_type={output_type!r}: audio is returned as 'pt' or 'np'")

    def deliverable(self, audio: torch.Tensor) -> Audio:
        """What the Decoder hands on: float32 waveforms with their sample rate."""
        return Audio(self.postprocess(audio, "np"), self.sample_rate)
