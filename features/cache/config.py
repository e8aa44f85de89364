"""Cache configuration: which backend (``cache_backend``) and its knobs (``cache_config``).

One pydantic model per backend, names as in the DiT serving field (DESIGN.md). The deployment
sets a default (``EngineConfig.cache_backend`` / ``cache_config``); a request may override it with
its ``cache`` field (``CacheRequest``), merged by ``merge_cache``. Everything here is validated
data: a bad deployment option fails at start-up naming ``cache_config.<knob>``, a bad request field
gets a 4xx naming ``cache.config.<knob>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CacheBackend = Literal["tea_cache", "cache_dit"]
BACKENDS: tuple[str, ...] = ("tea_cache", "cache_dit")


class TeaCacheConfig(BaseModel):
    """TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
    Model", 2024): skip every transformer block while the accumulated, polynomial-rescaled relative
    L1 change of the first block's timestep-modulated input stays under ``rel_l1_thresh``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rel_l1_thresh: float = Field(
        0.2, ge=0, le=10, description="Skip while the accumulated rescaled change stays below this; 0 never skips."
    )
    coefficients: tuple[float, float, float, float, float] | None = Field(
        None,
        description="Degree-4 polynomial (highest power first) mapping the input change to the output change; "
        "default: the checkpoint's fitted ones (ditserve.json), else the family's.",
    )


class CacheDiTConfig(BaseModel):
    """Cache-DiT's DBCache (dual block cache), with the TaylorSeer calibrator and SCM step masks.

    The first ``Fn_compute_blocks`` always run; when their output residual changed by less than
    ``residual_diff_threshold`` (relative L1) since the last fully computed step, the middle blocks
    are skipped and their cached residual reused (or extrapolated by TaylorSeer, Liu et al. 2025,
    "From Reusing to Forecasting"); the last ``Bn_compute_blocks`` always run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    Fn_compute_blocks: int = Field(1, ge=1, description="Leading blocks computed every step (their residual is the probe).")
    Bn_compute_blocks: int = Field(0, ge=0, description="Trailing blocks computed every step.")
    residual_diff_threshold: float = Field(
        0.24, ge=0, le=10, description="Cache while the probe's relative L1 change is below this; 0 never caches."
    )
    max_warmup_steps: int = Field(4, ge=0, description="Steps always computed at the start.")
    max_cached_steps: int = Field(-1, ge=-1, description="Most steps cached per request and branch; -1: no limit.")
    max_continuous_cached_steps: int = Field(3, ge=-1, description="Most consecutive cached steps; -1: no limit.")
    enable_taylorseer: bool = Field(
        True, description="Extrapolate the skipped residual (TaylorSeer) instead of reusing it (on by default: "
        "same speed, better images; false reuses the last residual as plain DBCache)."
    )
    taylorseer_order: int = Field(1, ge=1, le=4, description="Order of the TaylorSeer expansion.")
    scm_steps_mask_policy: Literal["slow", "medium", "fast", "ultra"] | None = Field(
        None, description="Steps Computation Mask: which steps must compute (slow computes most, ultra least)."
    )
    scm_steps_policy: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic: masked-out steps may cache if the probe allows; static: they always cache.",
    )


_CONFIGS: dict[str, type[BaseModel]] = {"tea_cache": TeaCacheConfig, "cache_dit": CacheDiTConfig}


class CacheSettings(BaseModel):
    """A resolved cache choice: the backend and its validated config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: CacheBackend = Field(description="tea_cache or cache_dit.")
    config: TeaCacheConfig | CacheDiTConfig = Field(description="The backend's knobs.")

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.config.model_dump(exclude_defaults=True).items())
        return f"{self.backend}({knobs})"


class CacheRequest(BaseModel):
    """The request field ``cache``: override the deployment's cache for this request.

    ``backend`` "none" turns caching off; omitting it keeps the deployment's backend and merges
    ``config`` over the deployment's ``cache_config``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["tea_cache", "cache_dit", "none"] | None = Field(
        None, description="tea_cache, cache_dit or none; default: the deployment's backend."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Knobs of the backend (see cache_config).")


class CacheConfigError(ValueError):
    """A bad cache option; ``field`` names it (e.g. ``cache_config.rel_l1_thresh``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):
        return (type(self), (self.field, self.message))


def _other(backend: str) -> str:
    return next(b for b in BACKENDS if b != backend)


def parse_cache_settings(
    backend: str | None, config: Mapping[str, Any] | None, *, field: str = "cache_config",
    backend_field: str = "cache_backend",
) -> CacheSettings | None:
    """Validate a backend name and its config; ``None`` backend means no cache.

    Raises:
        CacheConfigError: naming ``backend_field`` or ``field.<knob>``; knobs of the other backend
            are refused (TeaCache and Cache-DiT cannot be combined).
    """
    config = dict(config or {})
    if backend in (None, "none"):
        if config:
            raise CacheConfigError(field, f"given without {backend_field}; choose one of {list(BACKENDS)}")
        return None
    if backend not in _CONFIGS:
        raise CacheConfigError(backend_field, f"{backend!r} is not a cache backend; choose one of {list(BACKENDS)} "
                               "(TeaCache and Cache-DiT cannot be combined)")
    theirs = set(_CONFIGS[_other(backend)].model_fields) - set(_CONFIGS[backend].model_fields)
    foreign = sorted(set(config) & theirs)
    if foreign:
        raise CacheConfigError(
            f"{field}.{foreign[0]}",
            f"belongs to {_other(backend)}, but {backend_field} is {backend}: TeaCache and Cache-DiT cannot be combined",
        )
    try:
        parsed = _CONFIGS[backend].model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        message = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise CacheConfigError(f"{field}.{loc}" if loc else field, message) from None
    return CacheSettings(backend=backend, config=parsed)


def merge_cache(default: CacheSettings | None, request: CacheRequest | None) -> CacheSettings | None:
    """The cache a request runs with: the deployment's, overridden by the request's ``cache``.

    Raises:
        CacheConfigError: naming ``cache.backend`` or ``cache.config.<knob>``.
    """
    if request is None:
        return default
    if request.backend is None:
        if default is None:
            if request.config:
                raise CacheConfigError("cache.backend", f"required: the deployment has no cache; choose one of {list(BACKENDS)}")
            return None
        merged = {**default.config.model_dump(exclude_defaults=True), **request.config}
        return parse_cache_settings(default.backend, merged, field="cache.config", backend_field="cache.backend")
    return parse_cache_settings(request.backend, request.config, field="cache.config", backend_field="cache.backend")
