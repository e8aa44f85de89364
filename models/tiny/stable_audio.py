"""Tiny Stable-Audio-Open checkpoint: the real classes (``StableAudioDiTModel``,
``StableAudioProjectionModel``, ``T5EncoderModel``, ``AutoencoderOobleck``) at toy sizes, a locally
built T5 tokenizer (padded to 32 tokens; the real one pads to 128).

Audio geometry: 128 samples per second, a VAE hop of 4 samples and 32 latent frames, so the
longest clip is 1 s (128 stereo samples); the real model has 44.1 kHz, a hop of 2048 and 1024
latent frames (47.55 s).

Scheduler: the real checkpoint ships ``CosineDPMSolverMultistepScheduler``, an SDE solver whose
Brownian noise needs ``torchsde`` (not a dependency of ditserve or diffusers); by default the tiny
checkpoint takes the pipeline's type-hinted ``EDMDPMSolverMultistepScheduler`` with the real
sigma range, v-prediction and the deterministic ``dpmsolver++`` (the code path is the same:
EDM input scaling, multistep DPM-Solver); ``scheduler="cosine"`` builds the real one.
"""

from __future__ import annotations

# the tiny audio geometry (builtin.py's registry entry states the same numbers)
SAMPLE_RATE = 128
HOP_LENGTH = 4  # prod(downsampling_ratios)
SAMPLE_SIZE = 32  # latent frames of the longest clip
AUDIO_CHANNELS = 2
MAX_SECONDS = SAMPLE_SIZE * HOP_LENGTH / SAMPLE_RATE  # 1.0
TOKENIZER_LENGTH = 32

# the real checkpoint's scheduler config (stabilityai/stable-audio-open-1.0, scheduler_config.json)
_SIGMAS = dict(sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", solver_order=2,
               prediction_type="v_prediction", final_sigmas_type="zero")


def stable_audio_pipeline(*, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, scheduler: str = "edm"):
    """A tiny ``StableAudioPipeline``.

    Args:
        n_layers: DiT blocks.
        n_heads, n_kv_heads: attention heads (head dim 8) and the cross-attention's key/value heads.
        scheduler: ``"edm"`` (deterministic EDM DPM-Solver++) or ``"cosine"`` (the real checkpoint's
            SDE solver; needs ``torchsde`` to run).
    """
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        EDMDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    from .parts import tiny_t5
    from .tokenizer_builders import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    tokenizer.model_max_length = TOKENIZER_LENGTH
    text_dim, cond_dim = 32, 24  # unequal: the projection's text linear is exercised (the real one is identity)
    text_encoder = tiny_t5(len(tokenizer), text_dim, 8)
    projection = StableAudioProjectionModel(text_encoder_dim=text_dim, conditioning_dim=cond_dim, min_value=0,
                                            max_value=512)
    latent_channels = 4
    transformer = StableAudioDiTModel(
        sample_size=SAMPLE_SIZE,
        in_channels=latent_channels,
        num_layers=n_layers,
        attention_head_dim=8,
        num_attention_heads=n_heads,
        num_key_value_attention_heads=n_kv_heads,
        out_channels=latent_channels,
        cross_attention_dim=16,
        time_proj_dim=16,
        global_states_input_dim=2 * cond_dim,
        cross_attention_input_dim=cond_dim,
    )
    vae = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 2], channel_multiples=[1, 2],
                             decoder_channels=8, decoder_input_channels=latent_channels,
                             audio_channels=AUDIO_CHANNELS, sampling_rate=SAMPLE_RATE)
    if scheduler == "cosine":
        sched = CosineDPMSolverMultistepScheduler(**_SIGMAS)
    elif scheduler == "edm":
        sched = EDMDPMSolverMultistepScheduler(**_SIGMAS, algorithm_type="dpmsolver++")
    else:
        raise ValueError(f"scheduler={scheduler!r}: choose 'edm' or 'cosine'")
    return StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection, tokenizer=tokenizer,
                               transformer=transformer, scheduler=sched)
