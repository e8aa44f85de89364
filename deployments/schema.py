"""Request schema: what a client may ask, validated at the edge with messages that name the field.

Two layers: ``GenerationRequest`` checks what a field alone can tell (ranges, formats); then
``resolve_request`` checks it against the served model's spec (size granularity and limits,
whether an option applies to the model) and fills the model's defaults. Both raise
``RequestError(field, message)``, which the HTTP layer turns into a 4xx naming the field.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from ditserve.features.cache import CacheConfigError, CacheRequest, CacheSettings, cache_error, check_blocks, merge_cache
from ditserve.features.lora import LoraConfig, LoraError, adapter_path, list_adapters
from ditserve.models import Feature, Guidance, Modality, ModelSpec, SamplingParams
from ditserve.parallel.vae import VaeConfig, size_error

MAX_PROMPT_CHARS = 20_000
LAYERED_DEFAULT_LAYERS = 4  # QwenImageLayeredPipeline's default
# ASCII digits only: Python's \d and int() also take other scripts' digits ("٦٤x64")
_SIZE_RE = re.compile(r"^[ \t]*([0-9]+)[ \t]*[xX*][ \t]*([0-9]+)[ \t]*$")
# C0 control characters but tab, newline and carriage return: no tokenizer wants them, and a NUL
# truncates the prompt in some C tokenizers and in logs
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class RequestError(ValueError):
    """A bad request; ``field`` names the offending field."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def __reduce__(self):  # crosses process boundaries (Ray) with all its fields
        return (type(self), (self.field, self.message, self.status))


class LoraRequest(BaseModel):
    """A LoRA adapter to apply to this request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256, description="Name of an adapter the deployment serves "
                      "(a subfolder or .safetensors file of its lora_dir; GET /v1/models lists them).")
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="Strength of the adapter (diffusers' adapter weight).")


# One adapter, or several combined (a weighted sum). The tags name the two forms so that an error
# inside one is reported at the path the user wrote (``lora.scale``, ``lora.1.name``).
LoraField = Annotated[
    Annotated[LoraRequest, Tag("one")] | Annotated[list[LoraRequest], Tag("many")],
    Discriminator(lambda v: "many" if isinstance(v, list | tuple) else "one"),
]
_UNION_TAGS = {"one", "many"}


def _no_control(text: str) -> str:
    """``text`` when it holds no control character but tab, newline and carriage return (and no DEL)."""
    bad = _CONTROL_RE.search(text)
    if bad:
        raise ValueError(f"control character U+{ord(bad.group()):04X} at index {bad.start()}; only tab, newline and "
                         "carriage return are accepted")
    return text


class GenerationRequest(BaseModel):
    """One generation request (the fields of DESIGN.md, OpenAI-style where OpenAI has them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="What to generate.", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (CFG and true-CFG models)."
    )
    model: str | None = Field(None, description="Served model id; default: the deployment's model.")
    n: int = Field(1, ge=1, le=10, description="Number of images.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels; default: the model's default size.")
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="Guidance (distilled embedding or CFG).")
    true_cfg_scale: float | None = Field(None, ge=0, le=100, description="True CFG scale (with negative_prompt).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of the initial noise, as in diffusers.")
    num_frames: int | None = Field(None, ge=1, description="Video: frames per video (k x 4 + 1 for Wan2.2); "
                                   "default: the model's.")
    guidance_scale_2: float | None = Field(
        None, ge=0, le=100, description="Two-expert video models (Wan2.2 A14B): CFG scale of the low-noise "
        "expert; default: the model's, else guidance_scale.",
    )
    lora: LoraField | None = Field(
        None, description="LoRA adapter(s) for this request: {'name': ..., 'scale': 1.0} or a list of them "
        "(combined as a weighted sum; at most the deployment's max_loras_per_request).",
    )
    cache: CacheRequest | None = Field(
        None, description="Cache for this request: {'backend': 'tea_cache'|'cache_dit', 'config': {...}}, "
        "{'backend': 'none'}, or {'config': {...}} merged over the deployment's; default: the deployment's "
        "cache_backend/cache_config.",
    )
    # audio models only (StableAudioPipeline's audio_end_in_s / audio_start_in_s)
    seconds: float | None = Field(None, gt=0, description="Audio: where the clip ends, in seconds (its length when "
                                  "seconds_start is 0); at most the model's maximum; default: the model's default.")
    seconds_start: float | None = Field(None, ge=0, description="Audio: where the clip starts, in seconds "
                                        "(less than seconds); default 0.")
    images: list[Any] | None = Field(
        None, description="Input images of an editing model: PIL images, uint8 numpy arrays (H, W[, C]) or "
        "encoded PNG/JPEG/WebP bytes, checked by deployments/images_in.py (formats, pixel and byte caps).",
    )
    layers: int | None = Field(None, ge=1, le=10, description="Layered models: RGBA layers to decompose into.")
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="Queue tier: with the DiT's least_cost router, an 'interactive' request waiting "
        "for a DiT replica is sent before every 'batch' one that waits with it.",
    )
    timeout_s: float | None = Field(None, gt=0, description="This request's deadline in seconds, queues included "
                                    "(at most the deployment's max_timeout_s): past it the work is cancelled on "
                                    "every rank and the answer is 504.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _no_control(value)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_plain(cls, value: str | None) -> str | None:
        return None if value is None else _no_control(value)

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _SIZE_RE.match(value)
        if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
            raise ValueError(f"{value!r} is not of the form 'WIDTHxHEIGHT' with positive integers, e.g. '1024x1024'")
        return f"{int(match.group(1))}x{int(match.group(2))}"

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate a JSON-like mapping; the first error becomes a ``RequestError`` naming its field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise field_error(exc.errors()[0]) from None


def field_error(err: Mapping[str, Any]) -> RequestError:
    """One pydantic error (an item of ``ValidationError.errors()``, its ``loc`` relative to the
    request body) as a ``RequestError`` naming the field, e.g. ``cache.config.rel_l1_thresh``.
    The Python API and the HTTP layer both name fields through it."""
    loc = tuple(err["loc"])
    if loc[:1] == ("cache",) and len(loc) > 1 or err["type"] == "cache_backend":
        # inside the cache union: named as the user wrote it (no union tag), e.g. cache.config.<knob>
        exc = cache_error([{**err, "loc": loc[1:]}], field="cache.config", backend_field="cache.backend")
        return RequestError(exc.field, exc.message)
    if loc[:1] == ("lora",):
        loc = tuple(p for p in loc if p not in _UNION_TAGS)
    field = ".".join(str(p) for p in loc) or "body"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    return RequestError(field, message)


@dataclasses.dataclass(frozen=True)
class ResolvedRequest:
    """A request checked against its model, with every default filled in."""

    model: str
    prompt: str
    negative_prompt: str | None  # None when the request runs no negative branch
    params: SamplingParams
    seed: int
    lora: tuple[LoraRequest, ...] = ()  # the adapters, in the order given
    cache: CacheSettings | None = None  # the deployment's cache merged with the request's
    # input images (editing), decoded and checked (images_in.read_images): uint8 (H, W, 3|4) arrays,
    # and their content keys (the conditioning cache's keys)
    images: tuple[Any, ...] = dataclasses.field(default=(), compare=False, repr=False)
    image_keys: tuple[str, ...] = ()
    layers: int | None = None
    priority: str = "interactive"  # the request's queue tier (routing.py)

    @property
    def loras(self) -> tuple[tuple[str, float], ...]:
        """(name, scale) of each adapter."""
        return tuple((lora.name, lora.scale) for lora in self.lora)


def parse_size(size: str) -> tuple[int, int]:
    width, height = (int(v) for v in _SIZE_RE.match(size).groups())
    return width, height


def resolve_request(req: GenerationRequest, spec: ModelSpec, images: tuple[Any, ...] = ()) -> ResolvedRequest:
    """Check ``req`` against the model ``spec`` and fill the model's defaults (``images``: its input
    images, decoded; an editing model's default size follows them).

    Raises:
        RequestError: an option the model does not accept, or a size it cannot produce.
    """
    seconds, seconds_start = resolve_seconds(req, spec)
    if req.size is not None and spec.size_follows_input:
        raise RequestError("size", f"model {spec.id} outputs at the input image's size; leave size unset")
    if req.size is None and images and spec.condition_pixels:
        # editing: the output follows the input image, as the pipeline's default (its last image's)
        from ditserve.models import adapter_class

        h, w = images[-1].shape[:2]
        width, height = adapter_class(spec.family).condition_size(w, h, spec.condition_pixels)
        width, height = width // spec.size_multiple * spec.size_multiple, height // spec.size_multiple * spec.size_multiple
    elif req.size is None:
        width, height = spec.default_width, spec.default_height
    elif spec.modality == Modality.AUDIO:
        raise RequestError("size", f"model {spec.id} generates audio: give seconds (and seconds_start), not a size")
    else:
        width, height = parse_size(req.size)
        for name, value in (("width", width), ("height", height)):
            if value % spec.size_multiple:
                raise RequestError(
                    "size", f"{name} {value} is not a multiple of {spec.size_multiple} for model {spec.id}"
                )
            if not spec.min_size <= value <= spec.max_size:
                raise RequestError(
                    "size", f"{name} {value} is outside {spec.min_size}..{spec.max_size} for model {spec.id}"
                )

    if req.layers is not None and spec.task != "image-layered":
        raise RequestError("layers", f"model {spec.id} does not decompose into layers")
    guidance_scale = req.guidance_scale
    true_cfg_scale = req.true_cfg_scale
    if spec.guidance == Guidance.TRUE_CFG:
        if guidance_scale is not None:
            raise RequestError(
                "guidance_scale", f"model {spec.id} is not guidance-distilled and ignores it; use true_cfg_scale"
            )
        true_cfg_scale = spec.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
    elif spec.guidance == Guidance.DISTILLED:
        guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
        true_cfg_scale = 1.0 if true_cfg_scale is None else true_cfg_scale
    elif spec.guidance == Guidance.CFG:
        if true_cfg_scale is not None:
            raise RequestError("true_cfg_scale", f"model {spec.id} uses classic CFG; use guidance_scale")
        guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale

    # the scale that turns the negative branch on: classic CFG's guidance_scale, else true_cfg_scale
    cfg_field = "guidance_scale" if spec.guidance == Guidance.CFG else "true_cfg_scale"
    cfg_scale = guidance_scale if spec.guidance == Guidance.CFG else true_cfg_scale
    default_negative = spec.default_negative_prompt
    if default_negative is None and spec.guidance == Guidance.CFG and not spec.cfg_null_uncond:
        default_negative = ""  # classic CFG pipelines (SD3) encode "" when no negative prompt is given
    negative = req.negative_prompt
    # classic CFG's threshold is the pipeline's (1 in most, 0 in ZImagePipeline); true CFG's is 1
    threshold = spec.cfg_threshold if spec.guidance == Guidance.CFG else 1.0
    if negative is None and default_negative is not None and (cfg_scale or 0.0) > threshold:
        negative = default_negative  # the model's default: CFG unless asked otherwise
    if negative is not None and (cfg_scale or 0.0) <= threshold:
        raise RequestError(
            "negative_prompt", f"has no effect unless {cfg_field} > {threshold:g} (it is {cfg_scale}) for model {spec.id}"
        )
    if negative is None and req.true_cfg_scale is not None and req.true_cfg_scale > 1.0:
        raise RequestError("true_cfg_scale", "true CFG needs a negative_prompt (even ' ')")

    params = SamplingParams(
        height=height,
        width=width,
        num_inference_steps=req.num_inference_steps or spec.num_inference_steps,
        guidance_scale=guidance_scale,
        true_cfg_scale=true_cfg_scale,
        num_images_per_prompt=req.n,
        seconds=seconds,
        seconds_start=seconds_start,
        **_video_params(req, spec, guidance_scale),
        layers=(req.layers or LAYERED_DEFAULT_LAYERS) if spec.task == "image-layered" else None,
    )
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    lora = req.lora if isinstance(req.lora, list) else [req.lora] if req.lora is not None else []
    return ResolvedRequest(spec.id, req.prompt, negative, params, seed, tuple(lora), images=images,
                           layers=req.layers, priority=req.priority)


def _video_params(req: GenerationRequest, spec: ModelSpec, guidance_scale: float | None) -> dict[str, Any]:
    """``num_frames`` and ``guidance_scale_2`` of a video request, checked against the model."""
    if spec.modality != Modality.VIDEO:
        for field in ("num_frames", "guidance_scale_2"):
            if getattr(req, field) is not None:
                raise RequestError(field, f"applies to video models; model {spec.id} generates {spec.modality.value}")
        return {}
    frames = req.num_frames or spec.num_frames or 1
    step = spec.frame_multiple
    if (frames - 1) % step:
        below = (frames - 1) // step * step + 1
        raise RequestError("num_frames", f"{frames} is not k x {step} + 1 for model {spec.id} (e.g. {below} or "
                           f"{below + step})")
    if frames > spec.max_frames:
        raise RequestError("num_frames", f"{frames} exceeds the model's maximum of {spec.max_frames} frames")
    scale_2 = req.guidance_scale_2
    if scale_2 is not None and spec.boundary_ratio is None:
        raise RequestError("guidance_scale_2", f"model {spec.id} has one denoiser; use guidance_scale")
    if scale_2 is None and spec.boundary_ratio is not None:
        scale_2 = spec.guidance_scale_2 if spec.guidance_scale_2 is not None else guidance_scale
    return {"num_frames": frames, "guidance_scale_2": scale_2}


def resolve_seconds(req: GenerationRequest, spec: ModelSpec) -> tuple[float | None, float | None]:
    """An audio request's (seconds, seconds_start), defaulted and checked against the model;
    ``(None, None)`` for other models, which refuse the fields."""
    if spec.modality != Modality.AUDIO:
        for name in ("seconds", "seconds_start"):
            if getattr(req, name) is not None:
                raise RequestError(name, f"applies to audio models only; model {spec.id} generates {spec.modality.value}")
        return None, None
    longest = spec.max_audio_seconds
    end = req.seconds if req.seconds is not None else (spec.audio_seconds or longest)
    start = req.seconds_start or 0.0
    if end is None:
        raise RequestError("seconds", f"model {spec.id} has no default length; give seconds")
    if longest is not None and end > longest + 1e-9:
        raise RequestError("seconds", f"{end:g} is beyond the model's maximum of {longest:.4g} s for model {spec.id}")
    if start >= end:
        raise RequestError("seconds_start", f"{start:g} must be less than seconds={end:g}")
    rate = spec.audio_sample_rate
    if rate is not None and int(end * rate) - int(start * rate) < 1:
        raise RequestError("seconds_start", f"[{start:g}, {end:g}) s holds no sample at {rate} Hz; ask for a longer clip")
    return end, start


def select_model(req: GenerationRequest, served: Mapping[str, ModelSpec], default: str,
                 adapters: Mapping[str, Any] | None = None) -> ModelSpec:
    """The spec of the model ``req`` asks for among the ``served`` ones (404 naming ``model``); a
    LoRA adapter's name selects its base model (the first served one)."""
    name = req.model or default
    spec = served.get(name)
    if spec is None and adapters and name in adapters:
        spec = served[default]
    if spec is None:
        known = sorted(served) + sorted(adapters or ())
        raise RequestError("model", f"unknown model {name!r}; served: {', '.join(known)}", status=404)
    return spec


def resolve_lora(req: GenerationRequest, resolved: ResolvedRequest, config: LoraConfig | None,
                 adapters: Mapping[str, Any] | None = None) -> tuple[LoraRequest, ...]:
    """The request's adapters, checked against the deployment's ``lora_dir``: ``model`` naming an
    adapter adds it at scale 1 (so an OpenAI client can pick one), then the ``lora`` field's."""
    many = isinstance(req.lora, list)
    items = [(f"lora.{i}.name" if many else "lora.name", lora) for i, lora in enumerate(resolved.lora)]
    if adapters and req.model in adapters:
        items.insert(0, ("model", LoraRequest(name=req.model)))
    if not items:
        return ()
    loras = [lora for _, lora in items]
    names = [lora.name for lora in loras]
    if len(set(names)) != len(names):
        raise RequestError("lora", f"adapters {names} name one adapter twice; give each once with its scale")
    if config is not None and len(loras) > config.max_loras_per_request:
        raise RequestError("lora", f"{len(loras)} adapters exceed max_loras_per_request={config.max_loras_per_request}")
    for field, lora in items:
        try:
            adapter_path(config.lora_dir if config is not None else None, lora.name, field=field, known=adapters)
        except LoraError as exc:
            raise RequestError(exc.field, exc.message, exc.status) from None
    return tuple(loras)


def resolve_cache(
    req: GenerationRequest, spec: ModelSpec, default: CacheSettings | None, num_blocks: int | None
) -> CacheSettings | None:
    """The cache the request runs with: the deployment's ``default`` overridden by ``req.cache``,
    checked against the model (its registry features and block count)."""
    if req.cache is None:
        return default
    try:
        settings = merge_cache(default, req.cache)
    except CacheConfigError as exc:
        raise RequestError(exc.field, exc.message) from None
    if settings is None:
        return None
    if Feature(settings.backend) not in spec.features or num_blocks is None:
        raise RequestError("cache.backend", f"model {spec.id} does not support {settings.backend}")
    try:
        check_blocks(settings, num_blocks, field="cache.config")
    except CacheConfigError as exc:
        raise RequestError(exc.field, exc.message) from None
    return settings


def validate_request(
    req: GenerationRequest,
    served: Mapping[str, ModelSpec],
    default: str,
    *,
    cache_default: CacheSettings | None = None,
    num_blocks: int | None = None,
    vae: VaeConfig | None = None,
    lora: LoraConfig | None = None,
    images: Any = None,
    image_field: str | None = None,
) -> ResolvedRequest:
    """Everything the edge checks: the model is served, the fields fit it, options are available.

    Args:
        cache_default: the deployment's cache (``cache_backend``/``cache_config``).
        num_blocks: the model's transformer block count (``None``: the caches do not know the class).
        vae: the deployment's VAE options (the size must split over its patch-parallel workers).
        lora: the deployment's LoRA options (``lora_dir`` is listed for the adapter names).
        images: the deployment's input image limits (``images_in.ImageInputConfig``; default limits when
            ``None``).
        image_field: the name the client gave the input image, for the errors (a video job's
            ``input_reference``: one image, named as is); default ``image[i]``.
    """
    # lora_dir is listed only for a request that may name an adapter (a lora field, or a model that
    # is not the served one), not for every request
    may_name = req.lora is not None or (req.model is not None and req.model not in served)
    adapters = list_adapters(lora.lora_dir) if lora is not None and may_name else {}
    spec = select_model(req, served, default, adapters)
    from .images_in import read_images  # images_in names fields with this module's RequestError

    where = {"field": image_field, "indexed": False} if image_field else {}
    arrays, keys = read_images(req.images, spec, images, **where)
    resolved = dataclasses.replace(resolve_request(req, spec, arrays), image_keys=keys)
    resolved = dataclasses.replace(resolved, lora=resolve_lora(req, resolved, lora, adapters))
    if vae is not None and spec.modality != Modality.AUDIO:  # audio has no image size to split
        # the registry's size multiple is the VAE scale x the 2x2 latent packing (Engine checks it
        # against the checkpoint at start-up), so no model files are needed here
        why = size_error(vae, resolved.params.width, resolved.params.height, spec.size_multiple // 2)
        if why is not None:
            raise RequestError("size", why)
    cache = resolve_cache(req, spec, cache_default, num_blocks)
    return dataclasses.replace(resolved, cache=cache)
