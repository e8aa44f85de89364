"""The Ray-free composer: one config -> family adapter (+ parallel + features as they land), and
the in-process reference runner built on it.

``ditserve generate`` runs ``Engine.generate``; every served replica and worker builds the same
``Engine`` for its stage(s) and calls the same step methods, so the served path and the
reference path are one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ditserve.models import (
    STAGES,
    Feature,
    FamilyAdapter,
    ModelSpec,
    RequestContext,
    ResolvedModel,
    StepCallback,
    TextConditioning,
    adapter_class,
    capabilities,
    request_context,
    resolve_model,
)
from ditserve.features.cache import (
    CacheDiTConfig,
    CacheSettings,
    TeaCacheConfig,
    apply_cache,
    cache_run,
    check_blocks,
    parse_cache_settings,
)
from ditserve.models.builtin import DEFAULT_MODEL
from ditserve.models.loading import read_checkpoint
from ditserve.parallel import ParallelConfig, ParallelGroups, apply_parallel, check_parallel, transformer_loader
from ditserve.parallel.groups import Group
from ditserve.parallel.vae import VaeConfig, VaeParallel, check_vae_config

from .schema import GenerationRequest, ResolvedRequest, validate_request

logger = logging.getLogger(__name__)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounded exactly as diffusers' ``numpy_to_pil``."""
    return (images * 255).round().astype("uint8")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(BaseModel):
    """How to load and run one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="Registered model id or diffusers-format folder.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is bfloat16 on GPU, float32 on CPU."
    )
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="DiT parallel degrees.")
    vae: VaeConfig = Field(default_factory=VaeConfig, description="VAE patch parallelism, tiling and slicing.")
    cache_backend: Literal["tea_cache", "cache_dit"] | None = Field(
        None, description="Default cache of the DiT (requests may override it with their `cache` field)."
    )
    cache_config: TeaCacheConfig | CacheDiTConfig | None = Field(
        None, description="Knobs of cache_backend (a JSON object; see features/cache/config.py)."
    )

    @model_validator(mode="before")
    @classmethod
    def _typed_cache_config(cls, data: Any) -> Any:
        """Validate ``cache_config`` against the chosen backend's model (errors name the knob)."""
        if isinstance(data, dict):
            config = data.get("cache_config")
            if isinstance(config, BaseModel):
                config = config.model_dump(exclude_defaults=True)
            settings = parse_cache_settings(data.get("cache_backend"), config)
            data = {**data, "cache_config": None if settings is None else settings.config}
        return data

    def cache(self) -> CacheSettings | None:
        """The deployment's default cache settings (``None``: no cache)."""
        if self.cache_backend is None:
            return None
        return CacheSettings(backend=self.cache_backend, config=self.cache_config)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device={self.device!r} is not a torch device (try 'cpu' or 'cuda')") from None

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


@dataclasses.dataclass
class GenerationResult:
    """What a generation returns.

    Attributes:
        images: PIL images (or arrays, per ``output_type``).
        request_id: id of the request (logs, metrics).
        model: model id.
        seed: the seed used (drawn when the request gave none), to reproduce the result.
        timings: seconds per stage: encode, prepare, denoise, decode, postprocess.
        latents: final packed latents (for equivalence checks and the served path's hand-off).
        cache: cache statistics (``CacheStats.as_dict``) when the request ran with a cache.
    """

    images: Any
    request_id: str
    model: str
    seed: int
    timings: dict[str, float]
    latents: torch.Tensor | None = None
    cache: dict[str, Any] | None = None


@dataclasses.dataclass
class Encoded:
    """TextEncoder -> DiT: one request's conditioning, and the time spent so far."""

    cond: TextConditioning
    timings: dict[str, float]


@dataclasses.dataclass
class Denoised:
    """DiT -> VAE: final packed latents."""

    latents: torch.Tensor
    timings: dict[str, float]
    cache: dict[str, Any] | None = None


@dataclasses.dataclass
class Decoded:
    """VAE -> Router: images as uint8 arrays (n, H, W, 3), as the PIL path rounds them."""

    images: np.ndarray
    timings: dict[str, float]
    latents: torch.Tensor | None = None
    cache: dict[str, Any] | None = None


class _Timer:
    """Accumulates wall time per stage."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def check_model_parallel(config: EngineConfig, resolved: ResolvedModel | None = None,
                         adapter: type[FamilyAdapter] | None = None) -> None:
    """Refuse a parallel layout the model cannot run (start-up error naming the option)."""
    if config.parallel.world_size == 1:
        return
    resolved = resolved or resolve_model(config.model)
    adapter = adapter or adapter_class(resolved.spec.family)
    features = resolved.spec.features
    check_parallel(
        config.parallel,
        read_checkpoint(resolved.path).config("transformer"),
        model=resolved.spec.id,
        cfg_ok=Feature.CFG_PARALLEL in features,
        sp_ok=Feature.SEQUENCE_PARALLEL in features
        and bool(getattr(adapter.component_types["transformer"], "_cp_plan", None)),
        tp_ok=Feature.TENSOR_PARALLEL in features,
    )


def check_cache_feature(spec: ModelSpec, backend: str, field: str) -> None:
    """Refuse a cache backend the model's registry entry does not list (naming ``field``)."""
    feature = Feature(backend)
    if feature not in spec.features:
        works = [f.value for f in (Feature.TEA_CACHE, Feature.CACHE_DIT) if f in spec.features] or "none"
        raise ValueError(f"{field}={backend}: model {spec.id} does not support it (supported caches: {works})")


def num_transformer_blocks(resolved: ResolvedModel) -> int | None:
    """Transformer blocks of a model, from its config (``None``: its adapter declares no cache blocks)."""
    return capabilities(resolved).num_blocks


def check_model_vae(config: EngineConfig) -> None:
    """Refuse VAE options the model's VAE cannot run (start-up error naming the option)."""
    if config.vae == VaeConfig():
        return
    resolved = resolve_model(config.model)
    spec = resolved.spec
    scale = adapter_class(spec.family).vae_scale_from_config(read_checkpoint(resolved.path))
    check_vae_config(config.vae, spec.components.vae or "?", model=spec.id,
                     default_size=(spec.default_width, spec.default_height), vae_scale=scale)


class Engine:
    """A loaded model for some of the stages ("encode", "denoise", "decode").

    Args:
        config: what to load and where.
        stages: the stages this process serves; the in-process runner loads all three.
    """

    def __init__(
        self, config: EngineConfig, stages: Sequence[str] = STAGES, groups: ParallelGroups | None = None,
        vae_group: Group | None = None,
    ) -> None:
        self.config = config
        self.resolved = resolve_model(config.model)
        self.spec: ModelSpec = self.resolved.spec
        cls = adapter_class(self.spec.family)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        if "denoise" in stages:
            check_model_parallel(config, self.resolved, cls)
            if config.parallel.world_size > 1 and groups is None:
                raise ValueError(f"{config.parallel.describe()} needs process groups (run it in a worker group)")
        loader = transformer_loader(groups) if groups is not None and "denoise" in stages else None
        self.adapter: FamilyAdapter = cls.from_pretrained(
            self.resolved.path, stages=stages, device=self.device, dtype=self.dtype,
            loaders={"transformer": loader} if loader else None,
        )
        if self.adapter.size_multiple != self.spec.size_multiple:
            raise ValueError(
                f"model {self.spec.id}: registry says sizes are multiples of {self.spec.size_multiple}, "
                f"the checkpoint's VAE and packing give {self.adapter.size_multiple}"
            )
        self.groups = groups or ParallelGroups.single()
        if "denoise" in stages:
            # before parallel: hooks registered later wrap the earlier ones, so sequence parallel's
            # split of block 0's inputs runs first and the cache sees this rank's shard
            self._attach_cache()
        if "denoise" in stages and config.parallel.world_size > 1:
            apply_parallel(self.adapter, groups)
        self.vae_parallel: VaeParallel | None = None
        if "decode" in stages:
            vae = self.adapter.components["vae"]
            check_vae_config(config.vae, type(vae), model=self.spec.id, vae_scale=self.adapter.vae_scale_factor,
                             default_size=(self.spec.default_width, self.spec.default_height))
            self.vae_parallel = VaeParallel(vae, config.vae, vae_group, self.adapter.vae_scale_factor)
        logger.info(
            "engine ready: model=%s family=%s path=%s stages=%s device=%s dtype=%s",
            self.spec.id, self.spec.family, self.resolved.path, list(stages), self.device, self.dtype,
        )

    def _attach_cache(self) -> None:
        """Cache hooks go on every supported transformer (idle unless a request or the deployment
        asks for a cache); the deployment's default is checked against the model here, at start."""
        transformer = self.adapter.transformer
        blocks = self.adapter.cache_blocks
        supported = blocks is not None
        default = self.config.cache()
        if default is not None:
            check_cache_feature(self.spec, default.backend, "cache_backend")
            if not supported:
                raise ValueError(f"cache_backend={default.backend}: transformer {type(transformer).__name__} of model "
                                 f"{self.spec.id} has no cache support")
            check_blocks(default, self.num_blocks)
        if supported:
            apply_cache(transformer, blocks)

    @functools.cached_property
    def num_blocks(self) -> int | None:
        """Transformer blocks (read once from the config; every request's cache check uses it)."""
        return num_transformer_blocks(self.resolved)

    # ---- request handling ---------------------------------------------------------------------

    def resolve(self, req: GenerationRequest) -> ResolvedRequest:
        """Validate ``req`` against this engine's model (raises ``RequestError``)."""
        return validate_request(req, {self.spec.id: self.spec}, self.spec.id, cache_default=self.config.cache(),
                                num_blocks=self.num_blocks, vae=self.config.vae)

    # ---- the stages ---------------------------------------------------------------------------

    def encode(self, req: ResolvedRequest) -> TextConditioning:
        return self.encode_batch([req])[0]

    def encode_batch(self, reqs: Sequence[ResolvedRequest]) -> list[TextConditioning]:
        """Encode the prompts (and negative prompts) of several requests, batching the texts
        whose shapes allow it (``adapter.text_shape_key``) so each gets what it gets alone."""
        texts = sorted({t for r in reqs for t in (r.prompt, r.negative_prompt) if t is not None})
        groups: dict[Any, list[str]] = {}
        for text in texts:
            groups.setdefault(self.adapter.text_shape_key(text), []).append(text)
        encoded: dict[str, dict[str, torch.Tensor | None]] = {}
        with torch.inference_mode():
            for group in groups.values():
                encoded.update(zip(group, self.adapter.encode_texts(group)))
        out = []
        for r in reqs:
            n = r.params.num_images_per_prompt
            negative = None if r.negative_prompt is None else self.adapter.repeat_text(encoded[r.negative_prompt], n)
            out.append(TextConditioning(self.adapter.repeat_text(encoded[r.prompt], n), negative, batch_size=1))
        return out

    def denoise(
        self,
        req: ResolvedRequest,
        cond: TextConditioning,
        *,
        request_id: str,
        callback: StepCallback | None = None,
        timer: _Timer | None = None,
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The DiT stage: prepare + the denoising loop, with the request's cache (``req.cache``).

        Args:
            stats: filled with the cache statistics of the request when it ran with a cache.
        """
        timer = timer or _Timer()
        cond = cond.to(self.device, self.dtype)
        # Same as diffusers: the initial noise is drawn on the CPU from a seeded generator.
        generator = torch.Generator("cpu").manual_seed(req.seed)
        ctx = RequestContext(id=request_id, seed=req.seed, num_inference_steps=req.params.num_inference_steps)
        with request_context(ctx):
            with timer.stage("prepare"):
                state = self.adapter.prepare(req.params, cond, generator)
            steps = req.params.num_inference_steps
            # the ranks computing one CFG branch together reduce the skip metrics (same decisions)
            with timer.stage("denoise"), cache_run(req.cache, self.adapter.transformer, self.adapter.cache_blocks,
                                                   steps, self.groups.branch,
                                                   self.spec.tea_cache_coefficients) as run:
                latents = self.adapter.denoise(state, cond, callback=callback)
        if run is not None and stats is not None:
            stats.update(run.stats.as_dict())
        return latents

    def decode(self, req: ResolvedRequest, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device)
        with torch.inference_mode():
            # patch parallel / tiled over the VAE workers when configured (parallel/vae.py)
            return self.vae_parallel.decode(lambda: self.adapter.decode(latents, req.params.height, req.params.width))

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        return self.adapter.postprocess(images, output_type=output_type)

    # ---- the served path: one call per stage, payloads between deployments ----------------------

    def run_encode(self, reqs: Sequence[ResolvedRequest]) -> list[Encoded]:
        start = time.perf_counter()
        conds = self.encode_batch(reqs)
        elapsed = time.perf_counter() - start
        return [Encoded(c, {"encode": elapsed}) for c in conds]

    def run_denoise(self, req: ResolvedRequest, encoded: Encoded, request_id: str) -> Denoised:
        timer = _Timer()
        stats: dict[str, Any] = {}
        latents = self.denoise(req, encoded.cond, request_id=request_id, timer=timer, stats=stats)
        return Denoised(latents.cpu(), {**encoded.timings, **timer.timings}, stats or None)

    def run_decode(self, req: ResolvedRequest, denoised: Denoised, *, return_latents: bool = False) -> Decoded:
        start = time.perf_counter()
        images = self.postprocess(self.decode(req, denoised.latents), output_type="np")
        images = to_uint8(images)
        timings = {**denoised.timings, "decode": time.perf_counter() - start}
        return Decoded(images, timings, denoised.latents if return_latents else None, denoised.cache)

    # ---- in-process reference runner ----------------------------------------------------------

    def generate(
        self,
        req: GenerationRequest,
        *,
        output_type: str = "pil",
        request_id: str | None = None,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Run all stages in this process (the reference path)."""
        timer = _Timer()
        request_id = request_id or RequestContext().id
        resolved = self.resolve(req)
        with timer.stage("encode"):
            cond = self.encode(resolved)
        stats: dict[str, Any] = {}
        latents = self.denoise(resolved, cond, request_id=request_id, callback=callback, timer=timer, stats=stats)
        with timer.stage("decode"):
            images = self.decode(resolved, latents)
        with timer.stage("postprocess"):
            out = self.postprocess(images, output_type)
        return GenerationResult(out, request_id, self.spec.id, resolved.seed, timer.timings, latents, stats or None)
