"""Stage objects, Ray-free: ``Encoder``, ``Denoiser``, ``Decoder``, each built from one config as
"adapter + parallel + features" for its stage, each returning a typed result that carries the
report (timings, statistics) of the stage that produced it.

The reference runner (``engine.Engine``) composes them in one process; every served replica and
rank runs exactly these objects (the TextEncoder replica an ``Encoder``, each DiT rank a
``Denoiser``, each VAE worker a ``Decoder``, the Prior replica a ``Prior``). ``Prior`` is the
autoregressive prior of families that declare one (``Conditioning.PRIOR_TOKENS``, GLM-Image): its
``PriorTokens`` reach the Denoiser beside the ``Encoded`` conditioning (``Encoded.prior``) and are
merged into the denoiser kwargs there (``adapter.with_prior``). Room is left, in the same shape, for
a VAE ``encode`` (editing, image to video): a stage object per role, a result type per hand-off.

A result keeps the reports of the stages before it, untouched, in ``reports``: the next stage
appends its own and never merges or rewrites them, and whoever composes (the Router, the
reference runner) reads them all at the end — so timings and cache statistics come from the stage
that measured them, while the tensors still travel replica to replica only once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ditserve.features.cache import cache_run
from ditserve.features.lora import LoraError, LoraStore
from ditserve.models import (
    Audio,
    FamilyAdapter,
    ImageConditioning,
    ModelSpec,
    RequestContext,
    ResolvedModel,
    StepCallback,
    StepOutput,
    TextConditioning,
    adapter_class,
    request_context,
    resolve_model,
)
from ditserve.parallel import ParallelGroups, build_groups
from ditserve.parallel.groups import Group
from ditserve.parallel.vae import build_vae_group

from .attach import Support, attach, check_support, offloaded_components, stage_scope
from .conditioning import ConditioningCache
from .loading import denoiser_loader
from .schema import RequestError, ResolvedRequest
from .worker import RequestAborted

logger = logging.getLogger(__name__)


# ---- results -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What one stage measured for one request.

    Attributes:
        stage: ``prior``, ``encode``, ``denoise`` or ``decode``.
        timings: seconds by name (``prior``; ``encode``; ``prepare`` and ``denoise``; ``decode``).
        cache: cache statistics of the denoiser (``CacheStats.as_dict``), when the request ran one.
        bytes_sent: bytes this rank handed to collectives for the request (benchmarks).
        lora: the adapters of the request and what the DiT's store did for them (loads, hits, ...).
        conditioning: the conditioning cache's hits and misses for the request's input images
            (``vision_hits``/``vision_misses`` from the Encoder, ``latent_hits``/``latent_misses`` from
            the VAE's ``encode``) and the Encoder's prompt cache (``prompt_hits``/``prompt_misses``).
        batch: request batching in the DiT (``Denoiser.denoise_batch``): ``size`` (requests that
            shared the loop), ``samples`` (their images together), and ``alone`` (why the request
            ran by itself, when it did); ``None``: the request came alone (``denoise``).
    """

    stage: str
    timings: dict[str, float]
    cache: dict[str, Any] | None = None
    bytes_sent: int = 0
    lora: dict[str, Any] | None = None
    conditioning: dict[str, int] | None = None
    batch: dict[str, Any] | None = None


@dataclasses.dataclass
class PriorTokens:
    """Prior -> Denoiser: one request's prior tokens (the adapter's ``prior_tokens``, on the CPU)."""

    tokens: torch.Tensor
    reports: tuple[StageReport, ...]


@dataclasses.dataclass
class Encoded:
    """Encoder -> Denoiser: one request's conditioning, and the prior's tokens where the family
    has a prior (set by whoever joins the two hand-offs: the DiT replica, the reference runner)."""

    cond: TextConditioning
    reports: tuple[StageReport, ...]
    prior: PriorTokens | None = None

    def with_prior(self, prior: PriorTokens | None) -> Encoded:
        return self if prior is None else dataclasses.replace(self, prior=prior)


@dataclasses.dataclass
class EncodedImages:
    """VAE ``encode`` -> Denoiser: the latents of one request's input images (editing)."""

    images: ImageConditioning
    reports: tuple[StageReport, ...]


@dataclasses.dataclass
class Denoised:
    """Denoiser -> Decoder: the final latents (in the adapter's latent layout)."""

    latents: torch.Tensor
    reports: tuple[StageReport, ...]


@dataclasses.dataclass
class Decoded:
    """Decoder -> Router: what the adapter delivers for its ``output`` kind (``adapter.deliverable``):
    images as uint8 arrays (n, H, W, 3), rounded as the PIL path rounds, or, for an audio model,
    ``audio`` (float waveforms and the sample rate) and ``images=None``."""

    images: np.ndarray | None
    reports: tuple[StageReport, ...]
    latents: torch.Tensor | None = None
    audio: Audio | None = None


def merge_reports(reports: Sequence[StageReport]) -> tuple[dict[str, float], dict[str, Any] | None,
                                                            dict[str, Any] | None]:
    """All stages' timings in one dict, and the denoiser's cache and LoRA statistics."""
    timings: dict[str, float] = {}
    cache = lora = None
    for report in reports:
        for name, seconds in report.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
        cache = report.cache or cache
        lora = report.lora or lora
    return timings, cache, lora


def conditioning_report(reports: Sequence[StageReport]) -> dict[str, int] | None:
    """The conditioning caches' counts of all stages for one request (input images' ``vision_*``,
    ``latent_*``; the prompt cache's ``prompt_hits``/``prompt_misses``); ``None``: no cache ran."""
    out: dict[str, int] = {}
    for report in reports:
        for name, count in (report.conditioning or {}).items():
            out[name] = out.get(name, 0) + count
    return out or None


class Timer:
    """Accumulates wall time per name."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


# ---- loading -----------------------------------------------------------------------------------------


def load_adapter(config: Any, stages: Sequence[str], groups: ParallelGroups | None = None,
                 resolved: ResolvedModel | None = None) -> FamilyAdapter:
    """The family adapter with the components of ``stages`` (tensor-parallel shards when
    ``groups`` says so, FP8 when the config or the checkpoint says so), on the config's device and
    dtype."""
    resolved = resolved or resolve_model(config.model)
    spec = resolved.spec
    cls = adapter_class(spec.family)
    loader = denoiser_loader(config, cls, resolved.path, groups) if "denoise" in stages else None
    adapter = cls.from_pretrained(
        resolved.path, stages=stages, device=config.torch_device(), dtype=config.torch_dtype(),
        loaders={name: loader for name in cls.denoisers} if loader else None,
        host_components=offloaded_components(config, stages, cls),
    )
    if spec.condition_pixels:  # editing: the area input images are resized to (the registry's)
        adapter.condition_pixels = spec.condition_pixels
    if adapter.size_multiple != spec.size_multiple:
        raise ValueError(
            f"model {spec.id}: registry says sizes are multiples of {spec.size_multiple}, "
            f"the checkpoint's VAE and packing give {adapter.size_multiple}"
        )
    return adapter


class _Stage:
    """What every stage object has: its config, model and adapter."""

    stage: str

    def __init__(self, config: Any, adapter: FamilyAdapter | None, resolved: ResolvedModel | None,
                 caps: Support | None, groups: Any = None) -> None:
        self.config = config
        self.resolved = resolved or resolve_model(config.model)
        self.spec: ModelSpec = self.resolved.spec
        self.caps = check_support(config, [self.stage], caps)
        self.adapter = adapter or load_adapter(config, [self.stage], groups if self.stage == "denoise" else None,
                                               self.resolved)
        self.features = attach(self.adapter, config, groups, self.stage, self.caps)

    def scope(self) -> contextlib.AbstractContextManager:
        """Around each call of the stage: what its features need there (model-level offload onloads)."""
        return stage_scope(self.adapter, self.config, self.features)


class Encoder(_Stage):
    """Tokenizer(s) and text encoder(s): prompts -> conditioning. Batches the texts of several
    requests whose shapes allow it (``adapter.text_shape_key``), so each gets what it gets alone."""

    stage = "encode"

    def __init__(self, config: Any, adapter: FamilyAdapter | None = None, *, resolved: ResolvedModel | None = None,
                 caps: Support | None = None, prompt_cache_mb: float = 0.0) -> None:
        super().__init__(config, adapter, resolved, caps)
        # input images' vision features by content key (editing; conditioning.py)
        self.vision_cache = ConditioningCache(config.images.conditioning_cache_mb)
        # encoded texts (prompts and negative prompts) by text: the TextEncoder deployment's
        # prompt_cache_mb; the reference runner keeps none (0)
        self.prompt_cache = ConditioningCache(prompt_cache_mb)

    def conditioning(self, reqs: Sequence[ResolvedRequest]) -> list[TextConditioning]:
        return self._conditioning(reqs)[0]

    def _vision_encode(self, req: ResolvedRequest, text: str, counts: dict[str, int]) -> dict[str, Any]:
        """``text`` read with the request's images; their vision features from the cache when seen before."""
        key = "|".join(req.image_keys) if req.image_keys else None
        features = self.vision_cache.get(key) if key is not None else None
        kwargs, computed = self.adapter.encode_image_prompt([text], req.images, 1, features)
        if features is None and computed is None:  # the family reads the text alone (Qwen-Image-Layered)
            return kwargs
        if features is None:
            counts["vision_misses"] = counts.get("vision_misses", 0) + 1
            if key is not None:
                self.vision_cache.put(key, computed)
        else:
            counts["vision_hits"] = counts.get("vision_hits", 0) + 1
        return kwargs

    def _prompt_key(self, text: str) -> str:
        """The prompt cache's key: the text under this replica's model and encoder dtype (what else
        shapes an encoding, e.g. the family's template and max sequence length, is the model's)."""
        return f"{self.spec.id}|{self.adapter.dtype}|{text}"

    def _conditioning(self, reqs: Sequence[ResolvedRequest]) -> tuple[list[TextConditioning], list[dict[str, int]]]:
        # texts alone batch by shape; a request with input images is read with its images, alone
        texts = sorted({t for r in reqs if not r.images for t in (r.prompt, r.negative_prompt) if t is not None})
        by_shape: dict[Any, list[str]] = {}
        for text in texts:
            by_shape.setdefault(self.adapter.text_shape_key(text), []).append(text)
        encoded: dict[Any, dict[str, torch.Tensor | None]] = {}
        counts: list[dict[str, int]] = [{} for _ in reqs]
        if self.prompt_cache.max_bytes:
            for text in texts:
                hit = self.prompt_cache.get(self._prompt_key(text))
                if hit is not None:
                    encoded[text] = {k: v.to(self.adapter.device) if v is not None else None for k, v in hit.items()}
            for i, r in enumerate(reqs):
                for text in (r.prompt, r.negative_prompt) if not r.images else ():
                    if text is not None:
                        outcome = "prompt_hits" if text in encoded else "prompt_misses"
                        counts[i][outcome] = counts[i].get(outcome, 0) + 1
            by_shape = {k: [t for t in group if t not in encoded] for k, group in by_shape.items()}
        with torch.inference_mode(), self.scope():
            for group in by_shape.values():
                if not group:
                    continue
                fresh = self.adapter.encode_texts(group)
                encoded.update(zip(group, fresh))
                if self.prompt_cache.max_bytes:
                    for text, kwargs in zip(group, fresh):
                        self.prompt_cache.put(self._prompt_key(text), {
                            k: v.detach().to("cpu", copy=True) if v is not None else None for k, v in kwargs.items()})
            for i, r in enumerate(reqs):
                for text in (r.prompt, r.negative_prompt) if r.images else ():
                    if text is not None:
                        encoded[i, text] = self._vision_encode(r, text, counts[i])
        out = []
        for i, r in enumerate(reqs):
            n = r.params.num_images_per_prompt
            key = (lambda t: (i, t)) if r.images else (lambda t: t)
            negative = None if r.negative_prompt is None else \
                self.adapter.repeat_text(encoded[key(r.negative_prompt)], n)
            cond = TextConditioning(self.adapter.repeat_text(encoded[key(r.prompt)], n), negative, batch_size=1)
            with torch.inference_mode(), self.scope():
                out.append(self.adapter.request_conditioning(cond, r.params))  # e.g. audio seconds
        return out, counts

    def encode(self, reqs: Sequence[ResolvedRequest]) -> list[Encoded]:
        start = time.perf_counter()
        conds, counts = self._conditioning(reqs)
        seconds = time.perf_counter() - start
        return [Encoded(c, (StageReport("encode", {"encode": seconds}, conditioning=n or None),))
                for c, n in zip(conds, counts)]


class Prior(_Stage):
    """The autoregressive prior (families with ``Conditioning.PRIOR_TOKENS``): a prompt -> its
    prior tokens, sampled with transformers' ``generate`` (KV cache) and the request's seed.

    One request generates at a time per process: the seed goes through torch's global generator
    (as the diffusers pipeline seeds ``generate``), so two requests must not interleave there.
    """

    stage = "prior"

    def __init__(self, config: Any, adapter: FamilyAdapter | None = None, *, resolved: ResolvedModel | None = None,
                 caps: Support | None = None) -> None:
        super().__init__(config, adapter, resolved, caps)
        if not self.adapter.has_prior():
            raise ValueError(f"model {self.spec.id} ({self.spec.family}) has no autoregressive prior")
        self._lock = threading.Lock()

    def generate(self, req: ResolvedRequest) -> PriorTokens:
        start = time.perf_counter()
        p = req.params
        with self._lock, self.scope():
            tokens = self.adapter.prior_tokens(req.prompt, p.height, p.width, req.seed)
        return PriorTokens(tokens, (StageReport("prior", {"prior": time.perf_counter() - start}),))


class Denoiser(_Stage):
    """The DiT: prepare + the whole denoising loop, with the request's cache, on this rank's share
    of the parallel layout.

    Args:
        groups: this rank's process groups (``None``: one rank).
        aborted: asked once per step; ``True`` stops the request (``RequestAborted``). Executors
            pass the rank worker's collective check, so every rank stops at the same step.
        on_step: told the number of steps finished after each step (before ``aborted`` is asked):
            the rank worker's progress counter.
    """

    stage = "denoise"

    def __init__(self, config: Any, groups: ParallelGroups | None = None, adapter: FamilyAdapter | None = None, *,
                 resolved: ResolvedModel | None = None, caps: Support | None = None,
                 aborted: Callable[[], bool] | None = None, on_step: Callable[[int], None] | None = None) -> None:
        if config.parallel.world_size > 1 and groups is None:
            raise ValueError(f"{config.parallel.describe()} needs process groups (run it with an executor: "
                             "ParallelEngine, ditserve generate, or the served DiT)")
        self.groups = groups or ParallelGroups.single()
        self.aborted = aborted
        self.on_step = on_step
        super().__init__(config, adapter, resolved, caps, self.groups)

    def denoise(self, req: ResolvedRequest, encoded: Encoded, request_id: str,
                callback: StepCallback | None = None, images: EncodedImages | None = None) -> Denoised:
        """The request's loop; ``images``: its input images' latents (editing), from the VAE's ``encode``."""
        timer = Timer()
        sent_before = self.groups.bytes_sent()
        cond = encoded.cond.to(self.adapter.device, self.adapter.dtype)
        if self.adapter.has_prior():
            if encoded.prior is None:
                raise ValueError(f"model {self.spec.id} denoises with its prior's tokens; none came with the request")
            cond = self.adapter.with_prior(cond, encoded.prior.tokens)
        # Same as diffusers: the initial noise is drawn on the CPU from a seeded generator.
        generator = torch.Generator("cpu").manual_seed(req.seed)
        ctx = RequestContext(id=request_id, seed=req.seed, num_inference_steps=req.params.num_inference_steps)
        on_step = self._step_callback(callback)
        store = self.adapter.lora_store
        with request_context(ctx), self.scope(), self._lora(store, req, timer) as lora:
            with timer.stage("prepare"):
                image_cond = images.images.to(self.adapter.device, self.adapter.dtype) if images is not None else None
                state = self.adapter.prepare(req.params, cond, generator, image_cond)
            steps = req.params.num_inference_steps
            # the ranks computing one CFG branch together reduce the skip metrics (same decisions)
            with timer.stage("denoise"), cache_run(req.cache, self.adapter.transformer, self.adapter.cache_blocks,
                                                   steps, self.groups.branch, self.spec.tea_cache_coefficients) as run:
                latents = self.adapter.denoise(state, cond, callback=on_step)
        report = StageReport("denoise", timer.timings, run.stats.as_dict() if run is not None else None,
                             self.groups.bytes_sent() - sent_before, lora)
        prior_reports = encoded.prior.reports if encoded.prior is not None else ()
        before = (*prior_reports, *encoded.reports, *(images.reports if images is not None else ()))
        return Denoised(latents.cpu(), (*before, report))

    def denoise_batch(self, items: Sequence[tuple[ResolvedRequest, Encoded, str]],
                      callback: StepCallback | None = None) -> list[Denoised | RequestError]:
        """Several requests (``(request, encoded, request_id)``), denoised in as few loops as they
        allow: those that can share a forward (``batch_groups``) run as one batch, each with its own
        seed, CFG scale and negative prompt; the others one at a time. Results in order, each with
        the timings of the loop it ran in and its ``batch`` report; a request refused on its own
        account (``RequestError``, e.g. an adapter that does not load; every rank agrees) gets the
        error in its place, and the other groups still run."""
        out: list[Denoised | RequestError | None] = [None] * len(items)
        for group, alone in self.batch_groups(items):
            if len(group) > 1:
                try:
                    results = self._denoise_group([items[i] for i in group], callback)
                except RequestError as exc:  # the group's shared LoRA set: the same answer for each
                    results = [exc] * len(group)
                if results is not None:
                    for i, result in zip(group, results):
                        out[i] = result
                    continue
                alone = self._merge_refusal  # prepared states that cannot merge after all
            for i in group:
                req, encoded, request_id = items[i]
                try:
                    one = self.denoise(req, encoded, request_id, callback)
                except RequestError as exc:
                    out[i] = exc
                    continue
                report = dataclasses.replace(one.reports[-1], batch={
                    "size": 1, "samples": req.params.num_images_per_prompt, **({"alone": alone} if alone else {})})
                out[i] = Denoised(one.latents, (*one.reports[:-1], report))
        return out

    def batch_groups(self, items: Sequence[tuple[ResolvedRequest, Encoded, str]]) -> list[tuple[list[int], str | None]]:
        """Indices of ``items`` that can share a forward, and why an item runs alone (``None``: it
        had no partner, or it is a group). Requests share one when they ask for the same size,
        frames, steps and guidance kind (CFG on or off), the same LoRA set, no cache, no input
        images, and their texts encode to the same shapes; seeds, CFG scales, negative prompts and
        ``n`` may differ."""
        refusal = self.adapter.batch_refusal() or (
            "the model denoises with a prior's tokens" if self.adapter.has_prior() else None)
        groups: dict[Any, list[int]] = {}
        alone: list[tuple[list[int], str | None]] = []
        for i, (req, encoded, _) in enumerate(items):
            reason = refusal
            if reason is None and req.cache is not None:
                # the block caches skip or compute a whole forward: one decision for every sample
                reason = "cache: a block cache decides per forward, not per sample; a cached request runs alone"
            if reason is None and req.images:
                reason = "input images: an editing request runs alone"
            if reason is not None:
                alone.append(([i], reason))
                continue
            groups.setdefault(self._batch_key(req, encoded.cond), []).append(i)
        return [(g, None) for g in groups.values()] + alone

    def _batch_key(self, req: ResolvedRequest, cond: TextConditioning) -> Any:
        # what two requests must share for one forward (per-request values set to one placeholder)
        p = dataclasses.replace(req.params, guidance_scale=None, true_cfg_scale=None, guidance_scale_2=None,
                                num_images_per_prompt=1)

        def shapes(kw: dict[str, torch.Tensor | None] | None) -> Any:
            return None if kw is None else tuple(sorted((k, None if v is None else tuple(v.shape[1:]))
                                                        for k, v in kw.items()))

        return p, req.loras, self.adapter.cfg_scale(req.params, cond) is None, shapes(cond.positive), \
            shapes(cond.negative)

    _merge_refusal = "the requests' prepared states differ in a denoiser input that is not per sample"

    def _denoise_group(self, items: Sequence[tuple[ResolvedRequest, Encoded, str]],
                       callback: StepCallback | None) -> list[Denoised] | None:
        """One loop over the samples of ``items`` (one batch group); ``None``: their prepared states
        do not merge (the caller runs them one at a time)."""
        timer = Timer()
        sent_before = self.groups.bytes_sent()
        reqs = [req for req, _, _ in items]
        conds = [encoded.cond.to(self.adapter.device, self.adapter.dtype) for _, encoded, _ in items]
        first = reqs[0]
        ctx = RequestContext(id="+".join(rid for _, _, rid in items), seed=first.seed,
                             num_inference_steps=first.params.num_inference_steps)
        on_step = self._step_callback(callback)
        with request_context(ctx), self.scope(), self._lora(self.adapter.lora_store, first, timer) as lora:
            with timer.stage("prepare"):
                # each request its own initial noise, from its own seed, as alone
                states = [self.adapter.prepare(r.params, c, torch.Generator("cpu").manual_seed(r.seed))
                          for r, c in zip(reqs, conds)]
                try:
                    self.adapter.merge_states(states, conds)
                except ValueError as exc:
                    logger.info("batch of %d not merged (%s); its requests run one at a time", len(items), exc)
                    return None
            with timer.stage("denoise"):
                latents = self.adapter.denoise_batch(states, conds, callback=on_step)
        batch = {"size": len(items), "samples": sum(r.params.num_images_per_prompt for r in reqs)}
        sent = (self.groups.bytes_sent() - sent_before) // len(items)
        out = []
        for (req, encoded, _), lat in zip(items, latents):
            report = StageReport("denoise", dict(timer.timings), None, sent, lora, batch=dict(batch))
            before = (*encoded.reports,)
            out.append(Denoised(lat.cpu(), (*before, report)))
        return out

    @contextlib.contextmanager
    def _lora(self, store: LoraStore | None, req: ResolvedRequest, timer: Timer) -> Iterator[dict[str, Any] | None]:
        """The request's adapters active around its loop (every rank loads and agrees first);
        yields the store's report for the request, ``None`` without LoRA."""
        if not req.lora:
            yield None
            return
        if store is None:  # validated at the edge; a direct caller may still ask
            raise RequestError("lora", f"model {self.spec.id} is served without lora_dir: no adapters")
        before = dataclasses.replace(store.stats)
        try:
            with timer.stage("lora_load"):
                run = store.prepare(req.loras)
        except LoraError as exc:
            raise RequestError(exc.field, exc.message, exc.status) from None
        with store.activated(run):
            yield {"adapters": run.names, **store.stats.counts_since(before)}

    def _step_callback(self, callback: StepCallback | None) -> StepCallback | None:
        if self.aborted is None and self.on_step is None:
            return callback

        def on_step(step: StepOutput) -> None:
            if callback is not None:
                callback(step)
            if self.on_step is not None:
                self.on_step(step.index + 1)
            if self.aborted is not None and self.aborted():
                raise RequestAborted("the request was aborted at a step boundary")

        return on_step


class Decoder(_Stage):
    """The VAE: latents -> uint8 images, whole, patch-parallel over the VAE workers' group, tiled
    or sliced as configured (the VAE entries of the feature table)."""

    stage = "decode"

    def __init__(self, config: Any, group: Group | None = None, adapter: FamilyAdapter | None = None, *,
                 resolved: ResolvedModel | None = None, caps: Support | None = None) -> None:
        self.group = group
        super().__init__(config, adapter, resolved, caps, group)
        # input images' latents by content key (editing; conditioning.py)
        self.latent_cache = ConditioningCache(config.images.conditioning_cache_mb)

    def images(self, req: ResolvedRequest, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the decoded output: images (B, 3, H, W) in [-1, 1], or waveforms
        (B, channels, samples) cut to the request's seconds."""
        latents = latents.to(self.adapter.device)
        with torch.inference_mode(), self.scope():
            return self.adapter.decode_output(latents, req.params)

    def encode(self, req: ResolvedRequest) -> EncodedImages | None:
        """The request's input images -> their VAE latents (editing; the VAE deployment's ``encode``).

        Patch parallel splits decode only: the VAE encoder's plan is not written, and an input image
        is small next to the decoder's output; so the first worker of a patch-parallel group encodes
        whole and the others return ``None`` at once (the replica answers with the first's result)."""
        if self.group is not None and self.group.size > 1 and self.group.rank != 0:
            return None
        start = time.perf_counter()
        # an image's latents may depend on the request too (Wan2.2: its output size and frames)
        extra = self.adapter.image_encode_key(req.params)
        keys = [f"{k}|{extra}" if extra else k for k in req.image_keys] if req.image_keys else (None,) * len(req.images)
        latents, sizes, counts = [], [], {"latent_hits": 0, "latent_misses": 0}
        for image, key in zip(req.images, keys):
            item = self.latent_cache.get(key) if key is not None else None
            if item is None:
                with torch.inference_mode(), self.scope():
                    one = self.adapter.encode_request_images([image], req.params).to("cpu")
                item = (one.latents[0], one.sizes[0])
                counts["latent_misses"] += 1
                if key is not None:
                    self.latent_cache.put(key, item)
            else:
                counts["latent_hits"] += 1
            latents.append(item[0])
            sizes.append(item[1])
        report = StageReport("image_encode", {"image_encode": time.perf_counter() - start}, conditioning=counts)
        return EncodedImages(ImageConditioning(latents, sizes), (report,))

    def decode(self, req: ResolvedRequest, denoised: Denoised, return_latents: bool = False) -> Decoded:
        start = time.perf_counter()
        sent_before = self.group.sent if self.group is not None else 0
        out = self.adapter.deliverable(self.images(req, denoised.latents))
        report = StageReport("decode", {"decode": time.perf_counter() - start},
                             bytes_sent=(self.group.sent - sent_before) if self.group is not None else 0)
        audio = out if isinstance(out, Audio) else None
        return Decoded(None if audio else out, (*denoised.reports, report),
                       denoised.latents if return_latents else None, audio)


def build_stage(config: Any, stages: Sequence[str], *, aborted: Callable[[], bool] | None = None,
                on_step: Callable[[int], None] | None = None) -> tuple[Any, ParallelGroups | None, Group | None]:
    """The stage object a rank serves (inside an initialized torch.distributed world, if any):
    ``["denoise"]`` a Denoiser in the DiT layout's groups, ``["decode"]`` a Decoder in the VAE
    group, ``["encode"]`` an Encoder, several stages the reference runner over them.

    Returns:
        (stage object, DiT groups or None, VAE group or None).
    """
    stages = list(stages)
    groups = build_groups(config.parallel) if "denoise" in stages else None
    vae_group = build_vae_group(config.vae) if stages == ["decode"] else None
    if stages == ["denoise"]:
        return Denoiser(config, groups, aborted=aborted, on_step=on_step), groups, None
    if stages == ["decode"]:
        return Decoder(config, vae_group), None, vae_group
    if stages == ["encode"]:
        return Encoder(config), None, None
    if stages == ["prior"]:
        return Prior(config), None, None
    from .engine import Engine

    return Engine(config, stages, groups, vae_group=vae_group, aborted=aborted), groups, vae_group
