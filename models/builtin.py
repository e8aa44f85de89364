"""Registry entries of the models the project builds itself (no download ever needed).

The tiny checkpoints have the real architecture classes of their family with random weights and
locally built tokenizers: they exercise exactly the served code path, and their images are noise.
"""

from __future__ import annotations

from .registry import Components, Feature, Guidance, Modality, ModelSpec

_ALL_IMAGE_FEATURES = frozenset(Feature) - {Feature.VAE_PATCH_PARALLEL}

BUILTIN_MODELS: list[ModelSpec] = [
    ModelSpec(
        id="ditserve/tiny-qwen-image",
        name="Tiny Qwen-Image (random weights)",
        family="qwen-image",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="QwenImagePipeline",
            transformer="QwenImageTransformer2DModel",
            vae="AutoencoderKLQwenImage",
            scheduler="FlowMatchEulerDiscreteScheduler",
            text_encoders=("Qwen2_5_VLForConditionalGeneration",),
            tokenizers=("Qwen2Tokenizer",),
        ),
        guidance=Guidance.TRUE_CFG,
        num_inference_steps=8,
        true_cfg_scale=4.0,
        default_width=128,
        default_height=128,
        size_multiple=16,
        min_size=16,
        max_size=1024,
        features=_ALL_IMAGE_FEATURES,
        builtin=True,
        notes="built on first use by `ditserve make-tiny --family qwen-image`; random weights (noise images)",
    ),
    ModelSpec(
        id="ditserve/tiny-flux",
        name="Tiny FLUX.1 (random weights)",
        family="flux",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="FluxPipeline",
            transformer="FluxTransformer2DModel",
            vae="AutoencoderKL",
            scheduler="FlowMatchEulerDiscreteScheduler",
            text_encoders=("CLIPTextModel", "T5EncoderModel"),
            tokenizers=("CLIPTokenizer", "T5TokenizerFast"),
        ),
        guidance=Guidance.DISTILLED,
        num_inference_steps=8,
        guidance_scale=3.5,
        default_width=128,
        default_height=128,
        size_multiple=16,
        min_size=16,
        max_size=1024,
        features=frozenset({Feature.CACHE_DIT, Feature.TENSOR_PARALLEL, Feature.LORA}),
        builtin=True,
        notes="built on first use by `ditserve make-tiny --family flux`; random weights (noise images)",
    ),
]

DEFAULT_MODEL = "ditserve/tiny-qwen-image"
