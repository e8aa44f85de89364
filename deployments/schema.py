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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ditserve.features.cache import CacheConfigError, CacheRequest, CacheSettings, cache_error, check_blocks, merge_cache
from ditserve.models import Feature, Guidance, ModelSpec, SamplingParams
from ditserve.parallel.vae import VaeConfig, size_error

MAX_PROMPT_CHARS = 20_000
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")


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

    name: str = Field(min_length=1, max_length=256, description="Name of an adapter the deployment serves.")
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="Strength of the adapter.")


class GenerationRequest(BaseModel):
    """One generation request (the fields of DESIGN.md, OpenAI-style where OpenAI has them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="What to generate.", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (true-CFG models)."
    )
    model: str | None = Field(None, description="Served model id; default: the deployment's model.")
    n: int = Field(1, ge=1, le=10, description="Number of images.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels; default: the model's default size.")
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="Guidance (distilled embedding or CFG).")
    true_cfg_scale: float | None = Field(None, ge=0, le=100, description="True CFG scale (with negative_prompt).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of the initial noise, as in diffusers.")
    lora: LoraRequest | None = Field(None, description="LoRA adapter to apply.")
    cache: CacheRequest | None = Field(
        None, description="Cache for this request: {'backend': 'tea_cache'|'cache_dit', 'config': {...}}, "
        "{'backend': 'none'}, or {'config': {...}} merged over the deployment's; default: the deployment's "
        "cache_backend/cache_config.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

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
    lora: LoraRequest | None
    cache: CacheSettings | None = None  # the deployment's cache merged with the request's


def parse_size(size: str) -> tuple[int, int]:
    width, height = (int(v) for v in _SIZE_RE.match(size).groups())
    return width, height


def resolve_request(req: GenerationRequest, spec: ModelSpec) -> ResolvedRequest:
    """Check ``req`` against the model ``spec`` and fill the model's defaults.

    Raises:
        RequestError: an option the model does not accept, or a size it cannot produce.
    """
    if req.size is None:
        width, height = spec.default_width, spec.default_height
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
    if default_negative is None and spec.guidance == Guidance.CFG:
        default_negative = ""  # classic CFG pipelines (SD3) encode "" when no negative prompt is given
    negative = req.negative_prompt
    if negative is None and default_negative is not None and (cfg_scale or 0.0) > 1.0:
        negative = default_negative  # the model's default: CFG unless asked otherwise
    if negative is not None and (cfg_scale or 0.0) <= 1.0:
        raise RequestError(
            "negative_prompt", f"has no effect unless {cfg_field} > 1 (it is {cfg_scale}) for model {spec.id}"
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
    )
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    return ResolvedRequest(spec.id, req.prompt, negative, params, seed, req.lora)


def select_model(req: GenerationRequest, served: Mapping[str, ModelSpec], default: str) -> ModelSpec:
    """The spec of the model ``req`` asks for among the ``served`` ones (404 naming ``model``)."""
    name = req.model or default
    spec = served.get(name)
    if spec is None:
        raise RequestError("model", f"unknown model {name!r}; served: {', '.join(sorted(served))}", status=404)
    return spec


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
) -> ResolvedRequest:
    """Everything the edge checks: the model is served, the fields fit it, options are available.

    Args:
        cache_default: the deployment's cache (``cache_backend``/``cache_config``).
        num_blocks: the model's transformer block count (``None``: the caches do not know the class).
        vae: the deployment's VAE options (the size must split over its patch-parallel workers).
    """
    spec = select_model(req, served, default)
    resolved = resolve_request(req, spec)
    if resolved.lora is not None:
        raise RequestError("lora", f"adapter {resolved.lora.name!r} is not available: no LoRA adapters are served")
    if vae is not None:
        # the registry's size multiple is the VAE scale x the 2x2 latent packing (Engine checks it
        # against the checkpoint at start-up), so no model files are needed here
        why = size_error(vae, resolved.params.width, resolved.params.height, spec.size_multiple // 2)
        if why is not None:
            raise RequestError("size", why)
    cache = resolve_cache(req, spec, cache_default, num_blocks)
    return dataclasses.replace(resolved, cache=cache)
