"""The engine config and the in-process reference runner.

``EngineConfig`` says what to load and how (model, device, dtype, parallel degrees, VAE options,
default cache, quantization). ``Engine`` is the reference path (DESIGN.md, "One reference path"): it composes
the stage objects of ``stages.py`` (Encoder -> Denoiser -> Decoder, with a Prior before the
Denoiser for families that declare one) in this process, exactly as
the served graph composes the deployments that run the same objects. ``ParallelEngine``
(``local.py``) is the same composition with the DiT ranks and VAE workers on a local executor.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ditserve.features.cache import CacheBackend, CacheKnobs, CacheSettings, parse_cache_settings
from ditserve.features.lora import LoraConfig
from ditserve.features.offload import OffloadConfig
from ditserve.features.quantization import QuantizationConfig
from ditserve.models import (
    STAGES,
    Audio,
    FamilyAdapter,
    ModelSpec,
    RequestContext,
    StepCallback,
    TextConditioning,
    adapter_class,
    resolve_model,
)
from ditserve.models.builtin import DEFAULT_MODEL
from ditserve.parallel import ParallelConfig, ParallelGroups
from ditserve.parallel.devices import rank_device, visible_gpus
from ditserve.parallel.groups import Group
from ditserve.parallel.vae import VaeConfig

from .attach import check_support
from .schema import GenerationRequest, ResolvedRequest, validate_request
from .images_in import ImageInputConfig
from .stages import Decoder, Denoiser, Encoded, Encoder, Prior, Timer, conditioning_report, load_adapter, merge_reports

logger = logging.getLogger(__name__)


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
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters served per request.")
    offload: OffloadConfig = Field(default_factory=OffloadConfig,
                                   description="CPU offload: model-level and layerwise (features/offload).")
    quant: QuantizationConfig = Field(default_factory=QuantizationConfig,
                                      description="FP8 quantization of the DiT's linear layers.")
    images: ImageInputConfig = Field(default_factory=ImageInputConfig,
                                     description="Input image limits (editing) and the conditioning cache.")
    # The deployment's default cache, as two options (DESIGN.md's names); together they are one
    # member of the cache union (features/cache/config.py), validated through it below.
    cache_backend: CacheBackend | None = Field(
        None, description="Default cache of the DiT (requests may override it with their `cache` field)."
    )
    cache_config: CacheKnobs | None = Field(
        None, description="Knobs of cache_backend as a JSON object, e.g. '{\"rel_l1_thresh\": 0.2}' "
        "(see features/cache/config.py).",
    )

    @model_validator(mode="before")
    @classmethod
    def _typed_cache_config(cls, data: Any) -> Any:
        """Validate ``cache_backend`` + ``cache_config`` as one cache choice (errors name the knob)."""
        if isinstance(data, dict):
            settings = parse_cache_settings(data.get("cache_backend"), data.get("cache_config"))
            data = {**data, "cache_config": None if settings is None else settings.config}
        return data

    def cache(self) -> CacheSettings | None:
        """The deployment's default cache settings (``None``: no cache)."""
        return parse_cache_settings(self.cache_backend, self.cache_config)

    def torch_device(self) -> torch.device:
        """The device of a single process (a rank's comes from ``parallel.devices.rank_device``)."""
        return rank_device(self.device, world_size=1, local_rank=0, visible_gpus=visible_gpus()).device

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
        latents: final latents (for equivalence checks and the served path's hand-off).
        cache: cache statistics (``CacheStats.as_dict``) when the request ran with a cache.
        lora: what the DiT's adapter store did for the request (``adapters``, ``loads``, ``hits``, ...),
            when it ran with LoRA.
        audio: for an audio model served through the Router: the waveforms and their sample rate
            (``images`` is then ``None``); the reference runner returns the waveforms in ``images``
            as ``output_type`` asks ("pt" tensors, "np" arrays).
        conditioning: with input images, the conditioning cache's hits and misses (``vision_*`` of
            the text encoder, ``latent_*`` of the VAE's encode).
    """

    images: Any
    request_id: str
    model: str
    seed: int
    timings: dict[str, float]
    latents: torch.Tensor | None = None
    cache: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    audio: Audio | None = None  # an audio model's output: float waveforms (n, channels, samples), sample rate
    conditioning: dict[str, int] | None = None


class Engine:
    """The reference runner: a loaded model for some of the stages ("encode", "denoise", "decode",
    and "prior" for a family with an autoregressive prior), composed in this process.

    Args:
        config: what to load and where.
        stages: the stages this process serves; the reference runner loads all three (and the
            prior's, added where the family has one and ``stages`` encode).
        groups: the DiT rank's process groups when this process is one rank of a world.
        vae_group: the VAE workers' group when this process is one VAE worker.
        aborted: asked once per denoising step (see ``stages.Denoiser``).
    """

    def __init__(
        self, config: EngineConfig, stages: Sequence[str] = STAGES, groups: ParallelGroups | None = None,
        vae_group: Group | None = None, aborted: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.resolved = resolve_model(config.model)
        self.spec: ModelSpec = self.resolved.spec
        stages = adapter_class(self.spec.family).stages_with_prior(stages)
        self.caps = caps = check_support(config, stages)
        if "denoise" in stages and config.parallel.world_size > 1 and groups is None:
            raise ValueError(f"{config.parallel.describe()} needs process groups (run it with an executor: "
                             "ParallelEngine, ditserve generate, or the served DiT)")
        # one adapter holds every stage's components; each stage object attaches its features
        self.adapter: FamilyAdapter = load_adapter(config, stages, groups, self.resolved)
        kw = dict(resolved=self.resolved, caps=caps)
        self.prior = Prior(config, self.adapter, **kw) if "prior" in stages else None
        self.encoder = Encoder(config, self.adapter, **kw) if "encode" in stages else None
        self.denoiser = Denoiser(config, groups, self.adapter, aborted=aborted, **kw) if "denoise" in stages else None
        self.decoder = Decoder(config, vae_group, self.adapter, **kw) if "decode" in stages else None
        self.groups = self.denoiser.groups if self.denoiser else ParallelGroups.single()
        logger.info(
            "engine ready: model=%s family=%s path=%s stages=%s device=%s dtype=%s",
            self.spec.id, self.spec.family, self.resolved.path, list(stages), self.adapter.device, self.adapter.dtype,
        )

    @property
    def num_blocks(self) -> int | None:
        """Transformer blocks (read once from the config; every request's cache check uses it)."""
        return self.caps.num_blocks

    def resolve(self, req: GenerationRequest) -> ResolvedRequest:
        """Validate ``req`` against this engine's model (raises ``RequestError``)."""
        return validate_request(req, {self.spec.id: self.spec}, self.spec.id, cache_default=self.config.cache(),
                                num_blocks=self.num_blocks, vae=self.config.vae, lora=self.config.lora,
                                images=self.config.images)

    # ---- one stage at a time (tests, tools) -----------------------------------------------------

    def encode(self, req: ResolvedRequest) -> TextConditioning:
        return self.encoder.conditioning([req])[0]

    def prior_tokens(self, req: ResolvedRequest) -> torch.Tensor | None:
        """The prior's tokens for ``req`` (``None``: the family has no prior)."""
        return self.prior.generate(req).tokens if self.prior is not None else None

    def denoise(self, req: ResolvedRequest, cond: TextConditioning, *, request_id: str = "denoise",
                callback: StepCallback | None = None) -> torch.Tensor:
        prior = self.prior.generate(req) if self.prior is not None else None
        return self.denoiser.denoise(req, Encoded(cond, (), prior), request_id, callback).latents

    def decode(self, req: ResolvedRequest, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.images(req, latents)

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        return self.adapter.postprocess(images, output_type=output_type)

    # ---- the reference path ---------------------------------------------------------------------

    def generate(
        self,
        req: GenerationRequest,
        *,
        output_type: str = "pil",
        request_id: str | None = None,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Run all stages in this process (the reference path)."""
        request_id = request_id or RequestContext().id
        resolved = self.resolve(req)
        prior = self.prior.generate(resolved) if self.prior is not None else None
        encoded = self.encoder.encode([resolved])[0].with_prior(prior)
        images = self.decoder.encode(resolved) if resolved.images else None
        denoised = self.denoiser.denoise(resolved, encoded, request_id, callback, images)
        timer = Timer()
        with timer.stage("decode"):
            images = self.decoder.images(resolved, denoised.latents)
        with timer.stage("postprocess"):
            out = self.postprocess(images, output_type)
        timings, cache, lora = merge_reports(denoised.reports)
        timings.update(timer.timings)
        return GenerationResult(out, request_id, self.spec.id, resolved.seed, timings, denoised.latents, cache, lora,
                                conditioning_report(denoised.reports))
