"""LongCat-Image-Edit family adapter (``meituan-longcat/LongCat-Image-Edit``: one input image and an
instruction).

Subclasses the LongCat-Image adapter (same DiT, VAE, timesteps and decode) and adds the image path
of ``LongCatImageEditPipeline``: the input image is resized to about ``condition_pixels`` (the
pipeline's 1024*1024 area, sides multiples of 16, aspect kept), which is also the output size (the
pipeline takes no width/height: the registry's ``size_follows_input``); Qwen2.5-VL reads it at half
that size with the prompt (its vision tower, through the pipeline's ``text_processor`` and its
editing template); the VAE encodes it at full size; its packed latents (position ids of modality 2,
on the noise tokens' grid) follow the noise tokens at every denoiser call and the prediction is cut
back to the noise tokens. Guidance is classic CFG with ``""`` as the default negative prompt and,
unlike LongCat-Image, no cfg renorm. All model math through the pipeline's own helpers.

The image-conditioning contract is Qwen-Image-Edit's (``models/qwen_image_edit.py``): the same
processor loading without torchvision, the same vision-feature hook (a repeated image skips the
vision tower), the same input-image resize helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import LongCatImageEditPipeline

from .adapter import ImageConditioning, SamplingParams, TextConditioning
from .contract import Conditioning
from .longcat_image import LongCatImageAdapter
from .qwen_image_edit import QwenImageEditAdapter, _load_processor
from .registry import Feature


class _NoTextProcessor:
    """Stands in for the ``text_processor`` while the helper pipeline is built in a process that does
    not encode (the pipeline's ``__init__`` reads its ``image_processor``); removed right after."""

    image_processor = None


class LongCatImageEditAdapter(LongCatImageAdapter):
    family = "longcat-image-edit"
    pipeline_class = LongCatImageEditPipeline
    stage_components = {**LongCatImageAdapter.stage_components, "encode": ("text_encoder", "tokenizer", "text_processor")}
    conditioning = frozenset({Conditioning.TEXT, Conditioning.IMAGE})
    #: the pixel area input images are resized to (the registry's ``condition_pixels`` sets it per model)
    condition_pixels: int = 1024 * 1024
    #: the PIL mode input images are read in (the pipeline's VAE and vision tower take RGB)
    image_mode: ClassVar[str] = "RGB"
    # Verified in tests/test_family_longcat_image_edit.py: TeaCache and Cache-DiT (threshold 0 equals
    # uncached, evaluations drop), CFG-parallel, Ulysses, Ring and tensor parallel at degree 2 equal one
    # rank. LoRA is refused by the feature table's own rule (LongCatImageEditPipeline has no LoRA
    # loader); the rest is refused below.
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL, Feature.SEQUENCE_PARALLEL, Feature.TENSOR_PARALLEL,
    })
    # not in the seed table's LongCat-Image-Edit row, and not verified with the input image's tokens here
    # (LongCat-Image verifies the first two without them)
    unsupported = {feature: "not in the seed table's row for LongCat-Image-Edit and not verified with its input-image "
                            "tokens" for feature in (Feature.LAYERWISE_OFFLOAD, Feature.FP8, Feature.VAE_PATCH_PARALLEL)}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, loaders: dict | None = None, **kwargs: Any) -> LongCatImageEditAdapter:
        return super().from_pretrained(path, loaders={"text_processor": _load_processor, **(loaders or {})}, **kwargs)

    def _helper_pipeline(self) -> Any:
        if self.components.get("text_processor") is not None:
            return super()._helper_pipeline()
        self.components["text_processor"] = _NoTextProcessor()
        try:
            pipe = super()._helper_pipeline()
        finally:
            self.components["text_processor"] = None
        pipe.text_processor = None
        return pipe

    # Qwen-Image-Edit's input-image helpers: the same contract (the pipeline module's
    # calculate_dimensions, the vision tower hook of Qwen2.5-VL)
    condition_size = QwenImageEditAdapter.__dict__["condition_size"]
    _pipeline_module = QwenImageEditAdapter.__dict__["_pipeline_module"]
    _pil = QwenImageEditAdapter._pil
    _vision_hook = QwenImageEditAdapter._vision_hook

    _resized = QwenImageEditAdapter._resized
    encode_images = QwenImageEditAdapter.encode_images  # through this class's _vae_pixels

    def _vae_pixels(self, image: Any) -> tuple[torch.Tensor, int, int]:
        """An input image as the (2-D) VAE's input (B, C, H, W) in [-1, 1], as the pipeline prepares it."""
        resized, height, width = self._resized(image)
        return self.pipe.image_processor.preprocess(resized, height, width), height, width

    def encode_image_prompt(
        self, texts: Sequence[str], images: Sequence[Any], num_images_per_prompt: int,
        vision_features: Any = None,
    ) -> tuple[dict[str, torch.Tensor | None], Any]:
        self._require(*self.stage_components["encode"])
        resized, height, width = self._resized(images[0])
        # the pipeline's prompt image: the resized input at half its size
        prompt_image = self.pipe.image_processor.resize(resized, height // 2, width // 2)
        hook = self._vision_hook()
        hook.cached = None if vision_features is None else vision_features.to(self.device)
        try:
            embeds = []
            for text in texts:  # the pipeline's template reads one prompt per call
                one, text_ids = self.pipe.encode_prompt(prompt=[text], image=prompt_image,
                                                        num_images_per_prompt=num_images_per_prompt)
                embeds.append(one)
                if hook.cached is None and hook.computed is not None:
                    hook.cached = hook.computed  # the same image for the next text
            features = vision_features if vision_features is not None else hook.computed.cpu()
        finally:
            hook.cached = hook.computed = None
        return {"encoder_hidden_states": torch.cat(embeds), "txt_ids": text_ids}, features

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None,
        images: ImageConditioning | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if images is None:
            raise ValueError(f"{self.family} edits an input image; the request has none")
        embeds = cond.positive["encoder_hidden_states"]
        text_len = embeds.shape[1]
        # the noise and its ids by the pipeline's prepare_latents without an image (the denoiser's
        # process has no VAE, which the pipeline's image path asks for its channel count) ...
        latents, _, latent_ids, _ = self.pipe.prepare_latents(
            None, batch, self.latent_channels, params.height, params.width, embeds.dtype, text_len, self.device,
            generator,
        )
        # ... and the image's tokens as its image path packs them: repeated per sample, 2x2-packed,
        # ids of modality 2 on the same grid after the text
        image = images.latents[0].to(self.device, embeds.dtype)
        image = image.repeat(batch // image.shape[0], 1, 1, 1)
        _, channels, h, w = image.shape
        packed = self.pipe._pack_latents(image, batch, channels, h, w)
        image_ids = self._pipeline_module().prepare_pos_ids(
            modality_id=2, type="image", start=(text_len, text_len), height=h // 2, width=w // 2,
        ).to(self.device, dtype=torch.float64)
        return latents, {"img_ids": torch.cat([latent_ids, image_ids], dim=0), "image_latents": packed}

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        # the input image's tokens follow the noise tokens; the prediction is the noise tokens' part
        kwargs = dict(kwargs)
        image_latents = kwargs.pop("image_latents")
        hidden = torch.cat([latents, image_latents], dim=1)
        out = module(hidden_states=hidden, timestep=timestep, **kwargs, return_dict=False)[0]
        return out[:, : latents.shape[1]]

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return uncond + scale * (cond - uncond)  # LongCatImageEditPipeline: no cfg renorm

