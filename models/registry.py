"""The model registry: model identifier -> family, diffusers classes, defaults, sizes and features.

Capabilities are data (STYLE.md rule 5): a model's ``features`` are derived from what its family
adapter declares implemented and verified (``FamilyAdapter.verified_features``), so code that
enables a feature asks the registry instead of keeping its own list. The seed table of
``shared/reference/diffusion-features.md`` stays beside it as ``seed_features`` (a reference: what
the model can take, not what this project runs).
"""

from __future__ import annotations

import enum
import functools

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Modality(str, enum.Enum):
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"


class Feature(str, enum.Enum):
    """Features a model may support; the columns of the seed feature table."""

    TEA_CACHE = "tea_cache"
    CACHE_DIT = "cache_dit"
    SEQUENCE_PARALLEL = "sequence_parallel"
    CFG_PARALLEL = "cfg_parallel"
    TENSOR_PARALLEL = "tensor_parallel"
    LAYERWISE_OFFLOAD = "layerwise_offload"
    LORA = "lora"
    VAE_PATCH_PARALLEL = "vae_patch_parallel"
    FP8 = "fp8"


class Guidance(str, enum.Enum):
    """How a family applies guidance."""

    TRUE_CFG = "true_cfg"  # two denoiser calls (prompt, negative prompt) combined with true_cfg_scale
    DISTILLED = "distilled"  # guidance_scale enters the denoiser as an embedding; one call per step
    CFG = "cfg"  # classic CFG with guidance_scale (two calls)
    NONE = "none"


class Components(BaseModel):
    """The diffusers / transformers classes a model is made of (class names as in model_index.json).

    ``None`` means the model has no such component, or that diffusers 0.42 does not ship it (see
    ``ModelSpec.notes``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str | None = Field(None, description="diffusers pipeline class of the reference path.")
    transformer: str | None = Field(None, description="Denoiser class (diffusers).")
    vae: str | None = Field(None, description="VAE / autoencoder class (diffusers).")
    scheduler: str | None = Field(None, description="Scheduler class (diffusers).")
    text_encoders: tuple[str, ...] = Field((), description="Text encoder classes, in pipeline order.")
    tokenizers: tuple[str, ...] = Field((), description="Tokenizer classes, paired with text_encoders.")


class ModelSpec(BaseModel):
    """One registered model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Model identifier, e.g. 'Qwen/Qwen-Image'.")
    name: str = Field(description="Display name.")
    family: str = Field(description="Family adapter key, e.g. 'qwen-image', 'flux'.")
    modality: Modality = Field(description="What the model outputs.")
    task: str = Field("text-to-image", description="text-to-image | image-edit | text-to-video | ...")
    components: Components = Field(description="Classes the model is made of.")
    guidance: Guidance = Field(description="How guidance is applied.")
    num_inference_steps: int = Field(ge=1, le=200, description="Default denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, description="Default guidance_scale (distilled/CFG).")
    true_cfg_scale: float | None = Field(None, ge=0, description="Default true_cfg_scale (true CFG).")
    cfg_threshold: float = Field(
        1.0, ge=0, description="Classic CFG (guidance 'cfg') runs when guidance_scale is above this: 1 in most "
        "diffusers pipelines, 0 in ZImagePipeline.",
    )
    default_width: int = Field(gt=0, description="Default width in pixels.")
    default_height: int = Field(gt=0, description="Default height in pixels.")
    size_multiple: int = Field(gt=0, description="Width and height must be multiples of this (VAE scale x patch).")
    min_size: int = Field(gt=0, description="Smallest allowed width/height in pixels.")
    max_size: int = Field(gt=0, description="Largest allowed width/height in pixels.")
    num_frames: int | None = Field(None, description="Default frame count (video).")
    frame_multiple: int = Field(4, gt=0, description="Video: frame counts are k x this + 1 (the VAE's temporal "
                                "compression).")
    max_frames: int = Field(241, gt=0, description="Video: the largest frame count a request may ask.")
    fps: int | None = Field(None, gt=0, description="Video: frames per second of the output.")
    guidance_scale_2: float | None = Field(
        None, ge=0, description="Two-expert video models: default CFG scale of the low-noise expert (None: "
        "guidance_scale)."
    )
    boundary_ratio: float | None = Field(
        None, gt=0, lt=1, description="Two-expert video models: the fraction of the training timesteps below which "
        "the low-noise expert denoises (from the checkpoint's model_index.json; None: one expert)."
    )
    audio_seconds: float | None = Field(None, description="Default duration (audio).")
    max_audio_seconds: float | None = Field(None, description="Longest clip (audio): the denoiser's latent "
                                            "frames x the VAE hop length / the sample rate.")
    audio_sample_rate: int | None = Field(None, description="Samples per second of the output (audio).")
    audio_channels: int | None = Field(None, description="Channels of the output (audio; 2 is stereo).")
    cfg_null_uncond: bool = Field(
        False, description="Classic CFG without a negative prompt runs its unconditional branch on zero "
        "conditioning (StableAudioPipeline), not on an encoded \"\".",
    )
    seed_features: frozenset[Feature] = Field(
        frozenset(), description="The seed table's feature row (reference; see ``features`` for what runs)."
    )
    feature_limit: frozenset[Feature] | None = Field(
        None,
        description="Narrows ``features`` for this model (e.g. a step-distilled checkpoint has no CFG to "
        "split); ``features`` in a checkpoint's ditserve.json sets it. It never adds a feature.",
    )
    builtin: bool = Field(False, description="Built by the project itself (no download needed).")
    notes: str = Field("", description="Anything a user should know (e.g. not in diffusers 0.42).")
    default_negative_prompt: str | None = Field(
        None, description="Negative prompt of requests that give none, so true CFG runs at the default "
        "true_cfg_scale (Qwen-Image's own examples use ' '); a request with true_cfg_scale <= 1 runs without it.",
    )
    max_input_images: int = Field(
        0, ge=0, description="Input images a request may send (editing); 0: the model takes none.",
    )
    min_input_images: int = Field(
        1, ge=0, description="Input images a request must send when the model takes any (max_input_images > 0); "
        "0: optional (Wan2.2 TI2V-5B: text, or text and an image).",
    )
    condition_pixels: int | None = Field(
        None, gt=0, description="Editing: the pixel area an input image is resized to (keeping its aspect "
        "ratio, sides multiples of 32) before the VAE encodes it; the output size follows it by default "
        "(the pipeline's 1024*1024).",
    )
    size_follows_input: bool = Field(
        False, description="Editing: the output is always the input image's size (resized to condition_pixels), "
        "as the pipeline takes no width/height (Qwen-Image-Layered, LongCat-Image-Edit); a request's size is refused.",
    )
    tea_cache_coefficients: tuple[float, float, float, float, float] | None = Field(
        None, description="TeaCache polynomial fitted for this checkpoint (tools/fit_tea_cache.py); "
        "default: the family's.",
    )

    @model_validator(mode="after")
    def _sizes_consistent(self) -> ModelSpec:
        for field in ("default_width", "default_height", "min_size", "max_size"):
            value = getattr(self, field)
            if value % self.size_multiple:
                raise ValueError(f"{self.id}: {field}={value} is not a multiple of size_multiple={self.size_multiple}")
        if self.min_size > self.max_size:
            raise ValueError(f"{self.id}: min_size={self.min_size} > max_size={self.max_size}")
        return self

    @property
    def features(self) -> frozenset[Feature]:
        """Features that work: its family adapter's verified features (empty for a family that has
        no adapter yet), narrowed by ``feature_limit``. Imports the adapter on first use."""
        features = _family_features(self.family)
        return features if self.feature_limit is None else features & self.feature_limit

    def supports(self, feature: Feature) -> bool:
        return feature in self.features


class ModelNotFoundError(LookupError):
    """Raised for an identifier that is neither registered nor a local diffusers folder."""


class FamilyNotImplementedError(NotImplementedError):
    """Raised when a registered model's family has no adapter yet."""


@functools.cache
def _family_features(family: str) -> frozenset[Feature]:
    from .families import adapter_class, implemented_families

    if family not in implemented_families():
        return frozenset()
    return adapter_class(family).verified_features()


@functools.cache
def registry() -> dict[str, ModelSpec]:
    """All registered models by id: the seed catalog plus the project's built-in models."""
    from .builtin import BUILTIN_MODELS
    from .catalog import MODELS

    specs: dict[str, ModelSpec] = {}
    for spec in [*MODELS, *BUILTIN_MODELS]:
        if spec.id in specs:
            raise ValueError(f"model id {spec.id!r} registered twice")
        specs[spec.id] = spec
    return specs


def get_spec(model_id: str) -> ModelSpec:
    """The registered spec of ``model_id``; raises ``ModelNotFoundError`` listing the known ids."""
    try:
        return registry()[model_id]
    except KeyError:
        known = ", ".join(sorted(registry()))
        raise ModelNotFoundError(f"unknown model {model_id!r}; registered models: {known}") from None


def list_specs() -> list[ModelSpec]:
    return list(registry().values())
