"""Tiny random-weight checkpoints of the real architectures, in diffusers format.

``make_tiny(family, out)`` builds every component with its real class at toy sizes, tokenizers
built locally (no hub), and saves them with the diffusers pipeline's own ``save_pretrained``
(safetensors). Small enough that 4 steps at 64x64 take well under a second each on one core,
while keeping head counts and token counts divisible by 2 and 4 for the parallel tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FAMILIES = ("qwen-image", "flux", "sd3", "z-image", "flux2-klein", "ovis-image", "longcat-image", "glm-image", "wan",
            "wan-ti2v", "wan-i2v", "stable-audio", "qwen-image-edit", "qwen-image-edit-plus", "qwen-image-layered",
            "longcat-image-edit")
BUILTIN_FAMILY = {"ditserve/tiny-qwen-image": "qwen-image", "ditserve/tiny-flux": "flux", "ditserve/tiny-sd3": "sd3",
                  "ditserve/tiny-z-image": "z-image", "ditserve/tiny-flux2-klein": "flux2-klein",
                  "ditserve/tiny-ovis-image": "ovis-image", "ditserve/tiny-longcat-image": "longcat-image",
                  "ditserve/tiny-glm-image": "glm-image", "ditserve/tiny-wan": "wan", "ditserve/tiny-wan-ti2v": "wan-ti2v",
                  "ditserve/tiny-wan-i2v": "wan-i2v",
                  "ditserve/tiny-stable-audio": "stable-audio", "ditserve/tiny-qwen-image-edit": "qwen-image-edit",
                  "ditserve/tiny-qwen-image-edit-2509": "qwen-image-edit-plus",
                  "ditserve/tiny-qwen-image-layered": "qwen-image-layered",
                  "ditserve/tiny-longcat-image-edit": "longcat-image-edit"}
_COMPLETE_MARKER = ".ditserve-complete"

# Scheduler configs of the real checkpoints (Qwen/Qwen-Image, black-forest-labs/FLUX.1-dev).
_QWEN_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


def _qwen_image_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from .parts import tiny_qwen2_5_vl

    text_hidden = 32
    text_encoder, tokenizer = tiny_qwen2_5_vl(text_hidden)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three spatial downsamples: scale 8, as the real VAE
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=z_dim * 4,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=text_hidden,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_QWEN_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tokenizer_builders import build_clip_tokenizer, build_t5_tokenizer, clip_special_token_ids
    from .parts import FLUX_SCHEDULER, tiny_kl_vae, tiny_t5

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
            vocab_size=len(clip_tok),
            max_position_embeddings=77,
            **clip_special_token_ids(clip_tok),
        )
    )
    t5 = tiny_t5(len(t5_tok), 32, 8)
    latent_channels = 4
    vae = tiny_kl_vae(AutoencoderKL, latent_channels, scaling_factor=0.3611, shift_factor=0.1159,  # FLUX's
                      use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _sd3_pipeline():
    from .sd3 import sd3_pipeline

    return sd3_pipeline()


def _z_image_pipeline():
    from .z_image import z_image_pipeline

    return z_image_pipeline()


def _flux2_klein_pipeline():
    from .flux2_klein import flux2_klein_pipeline

    return flux2_klein_pipeline()


def _ovis_image_pipeline():
    from .ovis_image import ovis_image_pipeline

    return ovis_image_pipeline()


def _longcat_image_pipeline():
    from .longcat_image import longcat_image_pipeline

    return longcat_image_pipeline()


def _glm_image_pipeline():
    from .glm_image import glm_image_pipeline

    return glm_image_pipeline()


def _wan_pipeline(ti2v: bool = False, i2v: bool = False):
    from .wan import wan_pipeline

    return wan_pipeline(ti2v=ti2v, i2v=i2v)


def _stable_audio_pipeline():
    from .stable_audio import stable_audio_pipeline

    return stable_audio_pipeline()
def _qwen_image_edit_pipeline():
    from .qwen_image_edit import qwen_image_edit_pipeline

    return qwen_image_edit_pipeline()


def _qwen_image_edit_plus_pipeline():
    from diffusers import QwenImageEditPlusPipeline

    from .qwen_image_edit import qwen_image_edit_pipeline

    return qwen_image_edit_pipeline(QwenImageEditPlusPipeline)


def _qwen_image_layered_pipeline():
    from .qwen_image_edit import qwen_image_layered_pipeline

    return qwen_image_layered_pipeline()


def _longcat_image_edit_pipeline():
    from .longcat_image_edit import longcat_image_edit_pipeline

    return longcat_image_edit_pipeline()


_BUILDERS = {"qwen-image": _qwen_image_pipeline, "flux": _flux_pipeline, "sd3": _sd3_pipeline,
             "z-image": _z_image_pipeline, "flux2-klein": _flux2_klein_pipeline,
             "ovis-image": _ovis_image_pipeline, "longcat-image": _longcat_image_pipeline,
             "glm-image": _glm_image_pipeline, "wan": _wan_pipeline, "wan-ti2v": lambda: _wan_pipeline(ti2v=True),
             "wan-i2v": lambda: _wan_pipeline(i2v=True),
             "stable-audio": _stable_audio_pipeline, "qwen-image-edit": _qwen_image_edit_pipeline,
             "qwen-image-edit-plus": _qwen_image_edit_plus_pipeline, "qwen-image-layered": _qwen_image_layered_pipeline,
             "longcat-image-edit": _longcat_image_edit_pipeline}


def make_tiny(family: str, out: str | os.PathLike, *, seed: int = 0, spec_overrides: dict | None = None) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` to ``out`` (diffusers format).

    Args:
        family: one of ``FAMILIES``.
        out: target folder (created; existing files of the same names are overwritten).
        seed: weights are drawn with ``torch.manual_seed(seed)``; same seed, same bytes.
        spec_overrides: registry fields to record in ``ditserve.json`` (e.g. default size).
    """
    if family not in _BUILDERS:
        raise ValueError(f"--family {family!r} has no tiny checkpoint; choose from {', '.join(FAMILIES)}")
    out = Path(out)
    torch.manual_seed(seed)
    pipe = _BUILDERS[family]()
    pipe.save_pretrained(out, safe_serialization=True)
    from ..builtin import _TINY_DEFAULTS, _TINY_FAMILY_DEFAULTS

    overrides = {k: v for k, v in {**_TINY_DEFAULTS, **_TINY_FAMILY_DEFAULTS.get(family, {})}.items() if k != "builtin"}
    overrides.update(spec_overrides or {})
    (out / "ditserve.json").write_text(json.dumps(overrides, indent=2) + "\n")
    logger.info("wrote tiny %s checkpoint to %s", family, out)
    return out


def ensure_builtin(model_id: str, path: Path) -> Path:
    """Build the built-in model ``model_id`` at ``path`` unless it is already complete there.

    Built in a temporary folder and renamed into place, so concurrent first uses (several
    replicas starting at once) never see a half-written checkpoint.
    """
    if (path / _COMPLETE_MARKER).is_file():
        return path
    family = BUILTIN_FAMILY[model_id]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=path.parent))
    try:
        make_tiny(family, tmp)
        (tmp / _COMPLETE_MARKER).write_text(model_id + "\n")
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            if not (path / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
