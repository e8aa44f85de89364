"""Qwen-Image-Edit family adapter (``Qwen/Qwen-Image-Edit``: one input image and an instruction).

Subclasses the Qwen-Image adapter (same DiT, VAE, true CFG and decode) and adds the image path of
``QwenImageEditPipeline``: the input image is resized to about ``condition_pixels`` (the pipeline's
1024*1024 area, sides multiples of 32, aspect kept); Qwen2.5-VL reads it with the prompt (its vision
tower, through the pipeline's ``Qwen2VLProcessor`` and prompt template); the VAE encodes it; its
packed latents are appended to the noise tokens at every denoiser call and the prediction is cut
back to the noise tokens. All of it through the pipeline's own helpers.

The processor: ``Qwen2VLProcessor`` checks its video processor's class, which needs torchvision;
``load_processor`` uses transformers' loader where that works and otherwise builds the processor
from the PIL image processor (``Qwen2VLImageProcessorPil``) and the tokenizer, without a video
processor (the edit pipelines never read videos).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageLayeredPipeline
from diffusers.hooks import HookRegistry, ModelHook
from PIL import Image
from transformers import Qwen2VLProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .adapter import ImageConditioning, SamplingParams, TextConditioning
from .contract import Conditioning, Output
from .qwen_image import QwenImageAdapter
from .registry import Feature


def image_only_processor(image_processor: Any, tokenizer: Any) -> Qwen2VLProcessor:
    """A ``Qwen2VLProcessor`` over ``image_processor`` and ``tokenizer`` with no video processor
    (built without ``ProcessorMixin``'s class check, which imports the torchvision video classes)."""
    from transformers.processing_utils import ProcessorMixin

    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self: Any, name: str, arg: Any) -> Any:  # the video processor is None: nothing to check
        return None if arg is None else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        Qwen2VLProcessor.__init__(processor, image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    return processor


def load_processor(folder: str | Path) -> Qwen2VLProcessor:
    """A checkpoint's ``processor/`` folder as a ``Qwen2VLProcessor``: transformers' own loader where
    it works (torchvision installed), else the PIL image processor and the tokenizer."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    try:
        return Qwen2VLProcessor.from_pretrained(folder, local_files_only=True)
    except (ImportError, AttributeError, ValueError, OSError, TypeError):
        pass
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
    return image_only_processor(image_processor, Qwen2Tokenizer.from_pretrained(folder, local_files_only=True))


def _load_processor(cls: type, folder: Path, dtype: torch.dtype) -> Qwen2VLProcessor:
    return load_processor(folder)


class _VisionFeatures(ModelHook):
    """Around Qwen2.5-VL's vision tower: answers with ``cached`` features when the encoder set them
    (an input image seen before: the tower does not run), else runs the tower and keeps its output
    in ``computed`` for the caller to store. The text model is unchanged either way."""

    name = "ditserve_vision_features"

    def __init__(self) -> None:
        super().__init__()
        self.cached: torch.Tensor | None = None
        self.computed: torch.Tensor | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.cached is not None:
            # get_image_features reads pooler_output (the merged patch features) only
            return BaseModelOutputWithPooling(pooler_output=self.cached)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.computed = out.pooler_output
        return out


class QwenImageEditAdapter(QwenImageAdapter):
    family = "qwen-image-edit"
    pipeline_class = QwenImageEditPipeline
    component_types = {**QwenImageAdapter.component_types, "processor": Qwen2VLProcessor}
    stage_components = {**QwenImageAdapter.stage_components, "encode": ("text_encoder", "tokenizer", "processor")}
    conditioning = frozenset({Conditioning.TEXT, Conditioning.IMAGE})
    max_sequence_length = 1024  # the pipeline's default
    #: the pixel area input images are resized to (the registry's ``condition_pixels`` sets it per model)
    condition_pixels: int = 1024 * 1024
    #: the PIL mode input images are read in (the pipeline's VAE and vision tower take RGB)
    image_mode: ClassVar[str] = "RGB"
    # Verified (tests/test_family_qwen_image_edit.py): CFG-parallel, Ulysses, Ring and TP at degree 2 equal one
    # rank; TeaCache and Cache-DiT at threshold 0 equal uncached and skip blocks above it; layerwise
    # offload equals resident; VAE patch parallel splits decode (exact) while the first worker encodes the
    # input image whole; a LoRA per request equals the pipeline's load_lora_weights; FP8 runs close to
    # unquantized (Qwen-Image's high-precision layers).
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.SEQUENCE_PARALLEL, Feature.CFG_PARALLEL, Feature.TENSOR_PARALLEL,
        Feature.LAYERWISE_OFFLOAD, Feature.VAE_PATCH_PARALLEL, Feature.LORA, Feature.FP8,
    })

    @classmethod
    def from_pretrained(cls, path: str | Path, *, loaders: dict | None = None, **kwargs: Any) -> QwenImageEditAdapter:
        return super().from_pretrained(path, loaders={"processor": _load_processor, **(loaders or {})}, **kwargs)

    def _helper_pipeline(self) -> Any:
        pipe = super()._helper_pipeline()
        # without its VAE the pipeline assumes 16 latent channels; take the checkpoint's
        pipe.latent_channels = self.info.config("vae")["z_dim"]
        return pipe

    @classmethod
    def condition_size(cls, width: int, height: int, area: int) -> tuple[int, int]:
        """(width, height) an input image of ``width`` x ``height`` is resized to (the pipeline's
        ``calculate_dimensions``): about ``area`` pixels, aspect kept, sides multiples of 32."""
        w, h = cls._pipeline_module().calculate_dimensions(area, width / height)[:2]
        return int(w), int(h)

    @classmethod
    def _pipeline_module(cls) -> Any:
        return importlib.import_module(cls.pipeline_class.__module__)

    def _pil(self, image: Any) -> Image.Image:
        """An input image (uint8 array or PIL) in ``image_mode``."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        return pil if pil.mode == self.image_mode else pil.convert(self.image_mode)

    def _resized(self, image: Any) -> tuple[Image.Image, int, int]:
        """An input image resized as the pipeline resizes it (about ``condition_pixels``)."""
        pil = self._pil(image)
        width, height = self.condition_size(pil.width, pil.height, self.condition_pixels)
        return self.pipe.image_processor.resize(pil, height, width), height, width

    def _vae_pixels(self, image: Any) -> tuple[torch.Tensor, int, int]:
        """An input image as the VAE's input (B, C, 1, H, W) in [-1, 1], as the pipeline prepares it."""
        resized, height, width = self._resized(image)
        return self.pipe.image_processor.preprocess(resized, height, width).unsqueeze(2), height, width

    def _pipeline_images(self, images: ImageConditioning, dtype: torch.dtype) -> Any:
        """The input images' latents as the pipeline's ``prepare_latents`` takes them (one tensor)."""
        return images.latents[0].to(self.device, dtype)

    def _vision_hook(self) -> _VisionFeatures:
        visual = self.components["text_encoder"].model.visual
        registry = HookRegistry.check_if_exists_or_initialize(visual)
        hook = registry.get_hook(_VisionFeatures.name)
        if hook is None:
            hook = _VisionFeatures()
            registry.register_hook(hook, _VisionFeatures.name)
        return hook

    def prompt_images(self, images: Sequence[Any]) -> Any:
        """What the pipeline's ``encode_prompt`` gets as ``image``: the resized input image."""
        return self._resized(images[0])[0]

    def encode_image_prompt(
        self, texts: Sequence[str], images: Sequence[Any], num_images_per_prompt: int,
        vision_features: Any = None,
    ) -> tuple[dict[str, torch.Tensor | None], Any]:
        self._require(*self.stage_components["encode"])
        hook = self._vision_hook()
        hook.cached = None if vision_features is None else vision_features.to(self.device)
        try:
            embeds, mask = self.pipe.encode_prompt(
                prompt=list(texts), image=self.prompt_images(images), device=self.device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=self.max_sequence_length,
            )
            features = vision_features if vision_features is not None else hook.computed.cpu()
        finally:
            hook.cached = hook.computed = None
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}, features

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> ImageConditioning:
        self._require("vae")
        vae = self.components["vae"]
        latents, sizes = [], []
        for image in images:
            pixels, height, width = self._vae_pixels(image)
            latents.append(self.pipe._encode_vae_image(pixels.to(self.device, vae.dtype), generator=None))
            sizes.append((height, width))
        return ImageConditioning(latents, sizes)

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None,
        images: ImageConditioning | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if images is None:
            raise ValueError(f"{self.family} edits an input image; the request has none")
        dtype = cond.positive["encoder_hidden_states"].dtype
        latents, image_latents = self.pipe.prepare_latents(
            self._pipeline_images(images, dtype), batch, self.latent_channels, params.height, params.width, dtype,
            self.device, generator,
        )
        vsf = self.vae_scale_factor
        shapes = [(1, params.height // vsf // 2, params.width // vsf // 2)]
        shapes += [(1, h // vsf // 2, w // vsf // 2) for h, w in images.sizes]
        kwargs = {"img_shapes": [shapes] * cond.batch_size, "attention_kwargs": {}, "image_latents": image_latents}
        return latents, kwargs

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        # the input image's tokens follow the noise tokens; the prediction is the noise tokens' part
        kwargs = dict(kwargs)
        image_latents = kwargs.pop("image_latents")
        hidden = torch.cat([latents, image_latents], dim=1)
        out = module(hidden_states=hidden, timestep=timestep, **kwargs, return_dict=False)[0]
        return out[:, : latents.shape[1]]


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``): one to three input images. Each is read by
    Qwen2.5-VL at about ``vision_pixels`` (the pipeline's ``CONDITION_IMAGE_SIZE``, behind a "Picture
    n:" prefix the pipeline writes) and encoded by the VAE at about ``condition_pixels`` (its
    ``VAE_IMAGE_SIZE``); all images' packed latents follow the noise tokens, in order; the output
    size follows the last image."""

    family = "qwen-image-edit-plus"
    pipeline_class = QwenImageEditPlusPipeline
    # Verified with two input images (tests/test_family_qwen_image_edit.py): CFG-parallel and Ulysses at
    # degree 2 equal one rank; ring 2 and TP 2, each with layerwise offload, a LoRA and two VAE workers
    # (decode split, encode on the first), equal one rank; TeaCache and Cache-DiT at threshold 0 equal
    # uncached and skip above it; a LoRA changes the result; FP8 runs close to unquantized: Qwen-Image-Edit's
    # list, inherited.

    @property
    def vision_pixels(self) -> int:
        return self._pipeline_module().CONDITION_IMAGE_SIZE

    def prompt_images(self, images: Sequence[Any]) -> Any:
        out = []
        for image in images:
            pil = self._pil(image)
            width, height = self.condition_size(pil.width, pil.height, self.vision_pixels)
            out.append(self.pipe.image_processor.resize(pil, height, width))
        return out

    def _vae_pixels(self, image: Any) -> tuple[torch.Tensor, int, int]:
        pil = self._pil(image)
        width, height = self.condition_size(pil.width, pil.height, self.condition_pixels)
        return self.pipe.image_processor.preprocess(pil, height, width).unsqueeze(2), height, width

    def _pipeline_images(self, images: ImageConditioning, dtype: torch.dtype) -> Any:
        return [t.to(self.device, dtype) for t in images.latents]


class QwenImageLayeredAdapter(QwenImageEditAdapter):
    """Qwen-Image-Layered (``QwenImageLayeredPipeline``): decomposes an RGBA input image into ``layers``
    RGBA layers. The prompt is read as text alone (the pipeline's template; an empty prompt, which
    the pipeline would caption with Qwen2.5-VL's ``generate``, is refused by the request schema); the
    VAE encodes the RGBA image at the resolution bucket (``condition_pixels``, 640*640 by default);
    the noise holds ``layers + 1`` frames (the first is the composite, dropped at decode); timesteps
    use the pipeline's own sigmas and shift; the transformer gets ``additional_t_cond`` (RGB flag 0);
    true CFG without norm rescaling (the pipeline's ``cfg_normalize=False`` default)."""

    family = "qwen-image-layered"
    pipeline_class = QwenImageLayeredPipeline
    output = Output.LAYERED_IMAGE
    image_mode: ClassVar[str] = "RGBA"
    max_sequence_length = 512  # the pipeline's default
    condition_pixels: int = 640 * 640
    # Verified (tests/test_family_qwen_image_edit.py), with layers=2: CFG-parallel 2, ring 2 (Ulysses
    # runs the same split plan) and TP 2, each with layerwise offload, a LoRA and two VAE workers (decode
    # split over the layers' frames, encode on the first), equal one rank; TeaCache and Cache-DiT at
    # threshold 0 equal uncached and skip above it; a LoRA changes the result; FP8 runs close to
    # unquantized: Qwen-Image-Edit's list, inherited.

    def text_shape_key(self, text: str) -> int:
        return len(self.pipe.tokenizer(self.pipe.prompt_template_encode.format(text)).input_ids)

    def encode_image_prompt(
        self, texts: Sequence[str], images: Sequence[Any], num_images_per_prompt: int,
        vision_features: Any = None,
    ) -> tuple[dict[str, torch.Tensor | None], Any]:
        # the layered pipeline conditions on the text alone: no vision features to keep
        return self.encode_text_kwargs(texts, num_images_per_prompt), None

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None,
        images: ImageConditioning | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if images is None:
            raise ValueError(f"{self.family} decomposes an input image; the request has none")
        dtype = cond.positive["encoder_hidden_states"].dtype
        layers = params.layers
        latents, image_latents = self.pipe.prepare_latents(
            images.latents[0].to(self.device, dtype), batch, self.latent_channels, params.height, params.width,
            layers, dtype, self.device, generator,
        )
        vsf = self.vae_scale_factor
        (ch, cw), = images.sizes
        shapes = [(1, params.height // vsf // 2, params.width // vsf // 2)] * (layers + 1)
        shapes.append((1, ch // vsf // 2, cw // vsf // 2))
        is_rgb = torch.zeros(cond.batch_size, dtype=torch.long, device=self.device)
        kwargs = {"img_shapes": [shapes] * cond.batch_size, "attention_kwargs": {}, "image_latents": image_latents,
                  "additional_t_cond": is_rgb}
        return latents, kwargs

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        module = self._pipeline_module()
        n = params.num_inference_steps
        sigmas = np.linspace(1.0, 0, n + 1)[:-1]
        # the pipeline's shift: from the input image's token count (one frame of the noise)
        mu = (latents.shape[1] / (params.layers + 1) / (256 * 256 / 16 / 16)) ** 0.5
        timesteps, _ = module.retrieve_timesteps(scheduler, n, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return uncond + scale * (cond - uncond)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final latents -> the layers, (B * layers, 4, H, W) in [-1, 1] (the composite frame dropped)."""
        self._require("vae")
        vae = self.components["vae"]
        vsf = self.vae_scale_factor
        layers = latents.shape[1] // ((height // vsf // 2) * (width // vsf // 2)) - 1
        latents = self.pipe._unpack_latents(latents, height, width, layers, vsf).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        b, c, f, h, w = latents.shape
        latents = latents[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(-1, c, 1, h, w)
        return vae.decode(latents, return_dict=False)[0].squeeze(2)
