"""Multi-rank runs on this machine, through the persistent ``LocalExecutor``.

- ``ParallelEngine``: the reference runner's composition with the DiT world and the VAE workers
  on local executors (``ditserve generate`` with degrees); the prompt is encoded in this process.
- ``run_local`` / ``run_local_decode``: every rank's result, for tests and benchmarks that compare
  ranks (``reply_rank=None``).
- ``run_processes``: a function on every rank of a local group (tests of ``parallel/`` pieces).

Executors are shared per (role, world size, device) for the whole process (``local_executor``):
processes are spawned once and each run ``load``s its own configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ditserve.models import STAGES, RequestContext, StepCallback
from ditserve.parallel.vae import VaeConfig

from .attach import check_support
from .engine import EngineConfig, GenerationResult
from .executor import LocalExecutor, local_executor
from .schema import GenerationRequest, ResolvedRequest, validate_request
from .stages import Decoder, Denoiser, Encoder, Prior, Timer, merge_reports

logger = logging.getLogger(__name__)


def _executor(role: str, world: int, config: EngineConfig, stages: Sequence[str]) -> LocalExecutor:
    executor = local_executor(world, config.device, role=role)
    executor.load(config, stages)
    return executor


class ParallelEngine:
    """``Engine.generate`` with ``config.parallel.world_size`` DiT ranks and
    ``vae_patch_parallel_size`` VAE workers as local processes (gloo on CPU; NCCL, one GPU per
    rank, on CUDA). The DiT ranks run the served ``Denoiser``, the VAE workers the ``Decoder``.

    Args:
        request_timeout_s: a request's deadline in the executors (``None``: none).
    """

    def __init__(self, config: EngineConfig, *, request_timeout_s: float | None = None) -> None:
        self.config = config
        self.caps = check_support(config)
        self.encoder = Encoder(config, caps=self.caps)
        self.spec = self.encoder.spec
        # a family's autoregressive prior runs in this process, like its text encoder
        self.prior = Prior(config, caps=self.caps) if self.encoder.adapter.has_prior() else None
        self.request_timeout_s = request_timeout_s
        dit_config = config.model_copy(update={"vae": VaeConfig()})
        self.dit = _executor("dit", config.parallel.world_size, dit_config, ["denoise"]) \
            if config.parallel.world_size > 1 else Denoiser(dit_config, caps=self.caps)
        self.vae = _executor("vae", config.vae.vae_patch_parallel_size, config, ["decode"]) \
            if config.vae.parallel else Decoder(config, caps=self.caps)

    def resolve(self, req: GenerationRequest) -> ResolvedRequest:
        return validate_request(req, {self.spec.id: self.spec}, self.spec.id, cache_default=self.config.cache(),
                                num_blocks=self.caps.num_blocks, vae=self.config.vae, lora=self.config.lora,
                                images=self.config.images)

    def generate(self, req: GenerationRequest, *, output_type: str = "pil", request_id: str | None = None,
                 callback: StepCallback | None = None) -> GenerationResult:
        """Encode here, denoise on the DiT ranks (rank 0 replies), decode on the VAE workers."""
        request_id = request_id or RequestContext().id
        resolved = self.resolve(req)
        encoded = self.encoder.encode([resolved])[0]
        if self.prior is not None:
            encoded = encoded.with_prior(self.prior.generate(resolved))
        images = None
        if resolved.images:  # editing: the input images' latents, from the VAE
            images = self.vae.encode(resolved) if isinstance(self.vae, Decoder) else \
                self.vae.call_all("encode", resolved, timeout_s=self.request_timeout_s)
        if isinstance(self.dit, Denoiser):
            denoised = self.dit.denoise(resolved, encoded, request_id, callback, images)
        else:  # the ranks' progress is not reported across processes
            denoised = self.dit.call_all("denoise", resolved, encoded, request_id, None, images,
                                         timeout_s=self.request_timeout_s)
        if isinstance(self.vae, Decoder):
            decoded = self.vae.decode(resolved, denoised, return_latents=True)
        else:
            decoded = self.vae.call_all("decode", resolved, denoised, True, timeout_s=self.request_timeout_s)
        timings, cache, lora = merge_reports(decoded.reports)
        timer = Timer()
        with timer.stage("postprocess"):
            images = decoded.images
            if decoded.audio is not None:  # an audio model: float waveforms, whatever output_type
                images = decoded.audio.waveforms
            elif output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(a) for a in images]
            elif output_type == "np":
                images = images.astype("float32") / 255.0
        timings.update(timer.timings)
        return GenerationResult(images, request_id, self.spec.id, resolved.seed, timings, decoded.latents, cache, lora,
                                decoded.audio)


# ---- every rank's result (tests, benchmarks) ---------------------------------------------------------


def _generate_on_rank(worker: Any, requests: list[dict]) -> list[dict]:
    """On one rank of ``run_local``: the reference runner over this rank's groups, every request."""
    engine, groups = worker.stage, worker.groups
    results = []
    for fields in requests:
        sent_before = groups.bytes_sent()
        result = engine.generate(GenerationRequest.model_validate(fields), output_type="np")
        results.append({"latents": result.latents.cpu(), "images": result.images, "timings": result.timings,
                        "bytes_sent": groups.bytes_sent() - sent_before, "cache": result.cache,
                        "lora": result.lora})
    return results


def run_local(config: EngineConfig, requests: Sequence[GenerationRequest]) -> list[list[dict]]:
    """Generate ``requests`` on ``config.parallel.world_size`` local ranks, each running the
    whole reference runner over its groups (the VAE decodes whole on each rank).

    Returns:
        Per rank, per request: ``latents``, ``images`` (float arrays), ``timings``, ``bytes_sent``
        (by this rank's collectives, per request), ``cache`` (this rank's cache statistics or None),
        ``lora`` (this rank's adapter-store report or None).
    """
    config = config.model_copy(update={"vae": VaeConfig()})
    executor = _executor("dit", config.parallel.world_size, config, STAGES)
    return executor.call_all(_generate_on_rank, [r.model_dump() for r in requests], reply_rank=None)


def _decode_on_rank(worker: Any, items: list[tuple[dict, torch.Tensor]]) -> list[dict]:
    decoder = worker.stage
    results = []
    for fields, latents in items:
        req = validate_request(GenerationRequest.model_validate(fields), {decoder.spec.id: decoder.spec},
                               decoder.spec.id)
        sent_before, timer = worker.vae_group.sent, Timer()
        with timer.stage("decode"):
            images = decoder.adapter.postprocess(decoder.images(req, latents), output_type="np")
        results.append({"images": images, "timings": timer.timings, "bytes_sent": worker.vae_group.sent - sent_before})
    return results


def run_local_decode(config: EngineConfig, items: Sequence[tuple[GenerationRequest, torch.Tensor]]) -> list[list[dict]]:
    """Decode latents on ``config.vae.vae_patch_parallel_size`` local VAE workers, as a served VAE
    replica's workers do (each gets the full latents, all end with the full images).

    Args:
        items: (request, its final latents) pairs; the request fixes the output size.

    Returns:
        Per worker, per item: ``images`` (float arrays in [0, 1], n x H x W x 3), ``timings``, ``bytes_sent``.
    """
    executor = _executor("vae", config.vae.vae_patch_parallel_size, config, ["decode"])
    payload = [(r.model_dump(), latents.cpu()) for r, latents in items]
    return executor.call_all(_decode_on_rank, payload, reply_rank=None)


def _call_function(worker: Any, fn: Callable[[Any], Any], payload: Any) -> Any:
    return fn(payload)


def run_processes(world: int, fn: Callable[[Any], Any], payload: Any, *, backend: str = "gloo") -> list[Any]:
    """Run ``fn(payload)`` on every rank of a local group of ``world`` processes (``fn`` must be
    importable by name); results by rank."""
    executor = local_executor(world, "cuda" if backend == "nccl" else "cpu", role="functions")
    return executor.call_all(_call_function, fn, payload, reply_rank=None)
