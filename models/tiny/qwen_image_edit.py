"""Tiny Qwen-Image-Edit checkpoint: the tiny Qwen-Image components (``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage``, ``Qwen2_5_VLForConditionalGeneration`` with its vision tower) and a
``Qwen2VLProcessor`` whose image processor is transformers' PIL one (``Qwen2VLImageProcessorPil``).

Why the processor is built by hand: ``Qwen2VLProcessor(...)`` checks its video processor's class,
which needs torchvision (absent here), and the edit pipelines never read videos;
``models.qwen_image_edit.image_only_processor`` builds it without one. The saved folder also
carries a ``video_preprocessor_config.json`` with the same sizes, so ``Qwen2VLProcessor.from_pretrained``
works where torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Small image budget for the vision tower: at most 112x112 pixels (16 merged image tokens).
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 112 * 112
_VIDEO_PROCESSOR = "Qwen2VLVideoProcessor"
#: ``condition_pixels`` of the tiny checkpoint (ditserve.json, from the tiny registry entry)
from ..builtin import TINY_CONDITION_PIXELS  # noqa: E402


def save_processor(processor: Any, folder: str | Path, **_: Any) -> None:
    """Save ``processor`` as ``Qwen2VLProcessor.save_pretrained`` lays it out, plus a video
    processor config with the image processor's sizes (read only where torchvision exists)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    config = {**processor.image_processor.to_dict(), "image_processor_type": "Qwen2VLImageProcessor",
              "processor_class": "Qwen2VLProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    video = {**config, "video_processor_type": _VIDEO_PROCESSOR}
    video.pop("image_processor_type")
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")


def qwen_image_edit_pipeline(pipeline_class: Any = None) -> Any:
    """A tiny ``QwenImageEditPipeline`` (or ``pipeline_class``: the Edit-Plus and Layered pipelines take
    the same components) on the tiny Qwen-Image components."""
    from diffusers import QwenImageEditPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..qwen_image_edit import image_only_processor
    from . import _qwen_image_pipeline

    base = _qwen_image_pipeline()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = image_only_processor(image_processor, base.tokenizer)
    # the pipeline's save_pretrained calls the component's save_pretrained: ours, which needs no
    # video processor
    processor.save_pretrained = lambda folder, **kw: save_processor(processor, folder, **kw)
    cls = QwenImageEditPipeline if pipeline_class is None else pipeline_class
    return cls(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
               processor=processor, transformer=base.transformer)


def qwen_image_layered_pipeline() -> Any:
    """A tiny ``QwenImageLayeredPipeline``: the edit components with an RGBA VAE (4 input channels)
    and a transformer with the layered model's 3-D layer RoPE and its RGB/RGBA timestep condition."""
    from diffusers import AutoencoderKLQwenImage, QwenImageLayeredPipeline, QwenImageTransformer2DModel

    base = qwen_image_edit_pipeline(QwenImageLayeredPipeline)
    # z_dim 8, not the edit model's 4: the pipeline takes an input with z_dim channels for latents
    # already encoded, and an RGBA image has 4
    z_dim = 8
    vae = AutoencoderKLQwenImage(**{**base.vae.config, "input_channels": 4, "z_dim": z_dim,
                                    "latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim})
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    transformer = QwenImageTransformer2DModel(**{**config, "in_channels": z_dim * 4, "out_channels": z_dim,
                                                 "use_additional_t_cond": True, "use_layer3d_rope": True})
    return QwenImageLayeredPipeline(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder,
                                    tokenizer=base.tokenizer, processor=base.processor, transformer=transformer)
