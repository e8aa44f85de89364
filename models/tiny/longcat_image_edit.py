"""Tiny LongCat-Image-Edit checkpoint: the tiny LongCat-Image components (``models/tiny/longcat_image.py``:
``LongCatImageTransformer2DModel``, ``AutoencoderKL``, ``Qwen2_5_VLForConditionalGeneration`` with its
vision tower) and a ``text_processor`` the edit pipeline feeds the input image through: a
``Qwen2VLProcessor`` with transformers' PIL image processor at the tiny Qwen-Image-Edit image budget,
built and saved without torchvision as ``models/tiny/qwen_image_edit.py`` does.
"""

from __future__ import annotations

from typing import Any


def longcat_image_edit_pipeline(**kwargs: Any) -> Any:
    """A tiny ``LongCatImageEditPipeline`` (``kwargs``: ``longcat_image_pipeline``'s block and head counts)."""
    from diffusers import LongCatImageEditPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..qwen_image_edit import image_only_processor
    from .longcat_image import longcat_image_pipeline
    from .qwen_image_edit import TINY_MAX_PIXELS, TINY_MIN_PIXELS, save_processor

    base = longcat_image_pipeline(**kwargs)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = image_only_processor(image_processor, base.tokenizer)
    # the pipeline's save_pretrained calls the component's: ours, which needs no video processor
    processor.save_pretrained = lambda folder, **kw: save_processor(processor, folder, **kw)
    return LongCatImageEditPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                                    tokenizer=base.tokenizer, text_processor=processor, transformer=base.transformer)
