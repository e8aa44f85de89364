"""Cache configuration: which backend and its knobs, as one discriminated union on ``backend``.

One pydantic model of knobs per backend (names as in the DiT serving field, DESIGN.md), and one
settings model per backend pairing its name with its knobs (``TeaCacheSettings``,
``CacheDiTSettings``). ``CACHE_KINDS`` lists them; the backend names (``BACKENDS``, the
``CacheBackend`` literal) are read from their ``backend`` tags, which are the backends' capability
names (``models.Feature``), so a backend is named in exactly one place. The deployment sets a default (``EngineConfig.cache_backend`` / ``cache_config``, validated
here by ``parse_cache_settings``); a request may override it with its ``cache`` field
(``CacheRequest``: a settings model, ``{"backend": "none"}``, or ``{"config": {...}}`` merged over
the deployment's default by ``merge_cache``). A bad deployment option fails at start-up naming
``cache_config.<knob>``, a bad request field gets a 4xx naming ``cache.config.<knob>``: both come
from one translation of pydantic's errors (``cache_error``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ditserve.models import Feature

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


class CacheSettings(BaseModel):
    """A resolved cache choice: the backend and its validated knobs. Abstract: the concrete ones are
    ``CACHE_KINDS``, each narrowing ``backend`` to its one name and ``config`` to its knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    config: BaseModel

    def model_post_init(self, context: Any) -> None:
        if type(self) is CacheSettings:  # the hooks dispatch on the concrete type
            raise TypeError("CacheSettings is abstract: use parse_cache_settings(backend, config) or a CACHE_KINDS model")

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.config.model_dump(exclude_defaults=True).items())
        return f"{self.backend}({knobs})"


class TeaCacheSettings(CacheSettings):
    """TeaCache and its knobs."""

    backend: Literal[Feature.TEA_CACHE.value] = Field(description="TeaCache.")
    config: TeaCacheConfig = Field(default_factory=TeaCacheConfig, description="TeaCache's knobs.")


class CacheDiTSettings(CacheSettings):
    """Cache-DiT (DBCache, TaylorSeer, SCM) and its knobs."""

    backend: Literal[Feature.CACHE_DIT.value] = Field(description="Cache-DiT.")
    config: CacheDiTConfig = Field(default_factory=CacheDiTConfig, description="Cache-DiT's knobs.")


# The one list of backends: everything else (names, the literal, the knobs' union) is read from it.
# Each tag is the backend's capability name (models.Feature), the name a model declares it runs.
CACHE_KINDS: tuple[type[CacheSettings], ...] = (TeaCacheSettings, CacheDiTSettings)


def _tag(kind: type[CacheSettings]) -> str:
    return get_args(kind.model_fields["backend"].annotation)[0]


BACKENDS: tuple[str, ...] = tuple(_tag(k) for k in CACHE_KINDS)
CacheBackend = Literal[BACKENDS]  # type: ignore[valid-type]  # Literal["tea_cache", "cache_dit"]
CacheKnobs = Union[tuple(k.model_fields["config"].annotation for k in CACHE_KINDS)]  # type: ignore[valid-type]
_KNOBS: dict[str, type[BaseModel]] = {_tag(k): k.model_fields["config"].annotation for k in CACHE_KINDS}
NO_CACHE = "none"

AnyCacheSettings = Annotated[Union[CACHE_KINDS], Field(discriminator="backend")]  # type: ignore[valid-type]
_SETTINGS: TypeAdapter[CacheSettings] = TypeAdapter(AnyCacheSettings)


class CacheOff(BaseModel):
    """``{"backend": "none"}``: this request runs without a cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["none"] = Field(description="No cache for this request.")
    config: dict[str, Any] = Field(default_factory=dict, description="Must be empty.")

    @field_validator("config")
    @classmethod
    def _no_knobs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            raise ValueError(f"given with backend {NO_CACHE!r}: a request without a cache has no knobs")
        return value


class CacheOverride(BaseModel):
    """``{"config": {...}}`` without a backend: these knobs over the deployment's ``cache_config``.

    The knobs stay a plain mapping here on purpose: which backend's model they belong to is known
    only against the deployment's default, where ``merge_cache`` validates the merged knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: None = Field(None, description="Omitted: the deployment's backend.")
    config: dict[str, Any] = Field(default_factory=dict, description="Knobs merged over the deployment's.")


_DEFAULT_TAG = "default"


def _request_tag(value: Any) -> str | None:
    backend = value.get("backend") if isinstance(value, Mapping) else getattr(value, "backend", None)
    if backend is None:
        return _DEFAULT_TAG
    return backend if isinstance(backend, str) and backend in (*BACKENDS, NO_CACHE) else None


_REQUEST_TAGS = (*BACKENDS, NO_CACHE, _DEFAULT_TAG)


class CacheRequest(
    RootModel[
        Annotated[
            Union[  # noqa: UP007 (a union of Annotated tags)
                tuple(Annotated[k, Tag(_tag(k))] for k in CACHE_KINDS)
                + (Annotated[CacheOff, Tag(NO_CACHE)], Annotated[CacheOverride, Tag(_DEFAULT_TAG)])
            ],
            Discriminator(
                _request_tag, custom_error_type="cache_backend",
                custom_error_message=f"not a cache backend; choose one of {[*BACKENDS, NO_CACHE]}",
            ),
        ]
    ]
):
    """The request field ``cache``, discriminated by ``backend``: a backend with its knobs
    (``{"backend": "tea_cache", "config": {...}}``, validated as that backend's settings),
    ``{"backend": "none"}`` (no cache), or ``{"config": {...}}`` (knobs merged over the deployment's
    ``cache_config``; see ``merge_cache``). Built from keywords too: ``CacheRequest(backend="none")``.
    """

    model_config = ConfigDict(frozen=True)


class CacheConfigError(ValueError):
    """A bad cache option; ``field`` names it (e.g. ``cache_config.rel_l1_thresh``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):
        return (type(self), (self.field, self.message))


def _owners(knob: str) -> list[str]:
    return [b for b, knobs in _KNOBS.items() if knob in knobs.model_fields]


def _foreign_knob(err: Mapping[str, Any]) -> bool:
    loc = tuple(err["loc"])
    return err["type"] == "extra_forbidden" and len(loc) == 3 and loc[1] == "config" and bool(_owners(str(loc[2])))


def cache_error(
    errors: list[Mapping[str, Any]], *, field: str = "cache_config", backend_field: str = "cache_backend"
) -> CacheConfigError:
    """Pydantic's errors from validating a cache choice (``loc`` relative to it, pydantic's union tag
    first where it adds one) as one ``CacheConfigError`` naming the option as the user wrote it:
    ``backend_field`` or ``field.<knob>``. A knob of another backend says so (TeaCache and Cache-DiT
    cannot be combined) and is reported before other errors."""
    err = min(errors, key=lambda e: not _foreign_knob(e))  # the first, unless another is a foreign knob
    loc = [str(p) for p in err["loc"]]
    if err["type"] in ("union_tag_invalid", "cache_backend", "union_tag_not_found"):
        backend = err["input"].get("backend") if isinstance(err["input"], Mapping) else err["input"]
        return CacheConfigError(backend_field, f"{backend!r} is not a cache backend; choose one of {list(BACKENDS)} "
                                "(TeaCache and Cache-DiT cannot be combined)")
    tag = loc.pop(0) if loc and loc[0] in _REQUEST_TAGS else None
    if loc[:1] == ["backend"]:
        return CacheConfigError(backend_field, err["msg"])
    if not loc:  # the choice itself is no object: name the whole field (``cache``, ``cache_config``)
        return CacheConfigError(field.rsplit(".", 1)[0], err["msg"])
    path = ".".join([field, *loc[1:]]) if loc[:1] == ["config"] else ".".join([field, *loc])
    if err["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "config":
        owners = _owners(loc[1])
        if owners and tag not in owners:
            return CacheConfigError(path, f"belongs to {owners[0]}, but {backend_field} is {tag}: "
                                    f"TeaCache and Cache-DiT cannot be combined (set {backend_field}={owners[0]} "
                                    "to use it, or leave it out)")
        return CacheConfigError(path, "unknown option")
    return CacheConfigError(path, err["msg"].removeprefix("Value error, "))


def parse_cache_settings(
    backend: str | None, config: Mapping[str, Any] | BaseModel | None, *, field: str = "cache_config",
    backend_field: str = "cache_backend",
) -> CacheSettings | None:
    """Validate a backend name and its knobs (through the union); ``None`` backend means no cache.

    Raises:
        CacheConfigError: naming ``backend_field`` or ``field.<knob>``; knobs of another backend
            are refused (TeaCache and Cache-DiT cannot be combined).
    """
    if isinstance(config, BaseModel):
        config = config.model_dump(exclude_defaults=True)
    config = dict(config or {})
    if backend in (None, NO_CACHE):
        if config:
            raise CacheConfigError(field, f"given without {backend_field}; choose one of {list(BACKENDS)}")
        return None
    try:
        return _SETTINGS.validate_python({"backend": backend, "config": config})
    except ValidationError as exc:
        raise cache_error(exc.errors(), field=field, backend_field=backend_field) from None


def merge_cache(default: CacheSettings | None, request: CacheRequest | None) -> CacheSettings | None:
    """The cache a request runs with: the deployment's, overridden by the request's ``cache``.

    Raises:
        CacheConfigError: naming ``cache.backend`` or ``cache.config.<knob>``.
    """
    if request is None:
        return default
    choice = request.root
    if isinstance(choice, CacheOff):
        return None
    if isinstance(choice, CacheSettings):
        return choice  # validated with the request
    if default is None:
        if choice.config:
            raise CacheConfigError("cache.backend", f"required: the deployment has no cache; choose one of {list(BACKENDS)}")
        return None
    merged = {**default.config.model_dump(exclude_defaults=True), **choice.config}
    return parse_cache_settings(default.backend, merged, field="cache.config", backend_field="cache.backend")
