"""The Router (ingress): validates, composes TextEncoder (and Prior) -> DiT -> VAE, answers.

It never holds a model and never reads a checkpoint: ``build_app`` binds it a ``ServedModel``
summary to validate against. Composition is one method (``_compose``): the stages'
``DeploymentResponse``s are passed on unawaited, so the conditioning and the latents travel
through the object store once, replica to replica. For a model with an autoregressive prior
(``ServedModel.prior``) the Prior's response is the DiT's third argument, computed beside the
text encoder's. HTTP goes through Serve's FastAPI ingress
(routes, models and errors in ``http.py``); metrics are in ``metrics.py``. Python callers use
``handle.generate.remote(GenerationRequest(...))``.

A request with LoRA adapters goes to the DiT with its first adapter as Serve's
``multiplexed_model_id``: Serve prefers a DiT replica that already holds it (``serving.DiT``).
``GET /v1/models`` lists the base model and, read from ``lora_dir`` at each call (adapters dropped
in appear without a restart), each adapter as a model whose ``parent`` is the base model.

Video models: ``/v1/videos`` goes to the ``Jobs`` deployment (``jobs.py``; bound for video models
only), which stores and runs the jobs, so any Router replica answers for any job. Python callers
use ``handle.generate_video.remote(req)`` (a ``VideoResult`` with uint8 frames); ``generate`` and
``/v1/images/generations`` refuse video models, naming ``model``. A synchronous request whose
caller goes away (HTTP disconnect, ``DeploymentResponse.cancel()``) cancels its stage calls
(``compose``): the DiT's ranks stop at their next step; counted as ``status="cancelled"``.

Overload (``overload.py``): a request is admitted only while this replica's requests in flight are
below the smallest stage bound (429 naming the stage past it), its ``timeout_s`` (at most
``max_timeout_s``) cancels its stage calls like a disconnect and answers 504, and its cost
(``max_request_cost``) is checked before any stage runs. Error bodies go through ``redact``: a model
served from a folder is named by the folder's name, never its path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from PIL import Image
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from ditserve.features.lora import list_adapters
from ditserve.models import Modality

from .compose import StageHandles, compose
from .config import AppConfig
from .engine import GenerationResult
from .http import (
    AUDIO_PATH,
    IMAGES_PATH,
    VIDEOS_PATH,
    AudioAnswer,
    AudioRequest,
    ImagesRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoDeleted,
    VideoJob,
    VideoList,
    VideosRequest,
    audio_answer,
    build_http_app,
    encode_images,
    images_response,
)
from .executor import RequestTimeoutError
from .metrics import RouterMetrics
from .overload import RETRY_AFTER_S, Admission, check_cost, check_timeout, stage_bounds
from .schema import GenerationRequest, RequestError, ResolvedRequest
from .security import api_key_digests, host_paths, redact_paths
from .served import ServedModel
from .stages import Decoded, conditioning_report, merge_reports

logger = logging.getLogger("ray.serve")

STAGES = ("prior", "encode", "image_encode", "lora_load", "prepare", "denoise", "decode", "postprocess")
# run concurrently (the prior, the text encoder and the VAE's encode of input images): the longest is
# on the request's path
SIDE_BY_SIDE = ("prior", "encode", "image_encode")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - built outside a replica (unit tests)
        return ""


@dataclasses.dataclass
class VideoResult:
    """What ``Router.generate_video`` returns.

    Attributes:
        frames: uint8 array (n, frames, H, W, 3).
        fps: the model's frames per second.
        result: request id, model, seed, seconds per stage (``images`` is ``None``: see ``frames``).
    """

    frames: np.ndarray
    fps: int
    result: GenerationResult


# The app is built per replica (``__serve_build_asgi_app__``) so that its routes, error handlers and
# body limit close over this replica's Router; Serve's ingress serves it.
@serve.deployment(name="Router")
@serve.ingress()
class Router:
    """Ingress of the app.

    Args:
        cfg: the app config (request size limit, Router options).
        served: the served-model summary the builder read from the checkpoint.
        encoder, dit, vae: handles of the stage deployments.
        prior: handle of the Prior deployment (models with an autoregressive prior; else ``None``).
    """

    @staticmethod
    def deployment_options(cfg: AppConfig) -> dict[str, Any]:
        opts = cfg.router
        return {
            "max_ongoing_requests": opts.max_ongoing_requests,
            "max_queued_requests": opts.max_queued_requests,
            # past the Router's own queue Serve's proxy answers (not our handlers): 429, as our stages' bounds
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
            "autoscaling_config": opts.autoscaling.to_serve(),
            "ray_actor_options": {"num_cpus": opts.num_cpus, "resources": dict(opts.custom_resources)},
        }

    def __init__(
        self, cfg: AppConfig, served: ServedModel, encoder: DeploymentHandle, dit: DeploymentHandle,
        vae: DeploymentHandle, prior: DeploymentHandle | None = None, jobs: DeploymentHandle | None = None,
    ) -> None:
        self.cfg = cfg
        self.served = served
        self.encoder, self.dit, self.vae, self.prior = encoder, dit, vae, prior
        self.jobs = jobs  # the Jobs deployment (video models only)
        self.replica_id = _replica_id()  # the x-ditserve-replica header of /v1/videos answers
        self.created = int(time.time())
        self.metrics = RouterMetrics()
        # per-stage queue bounds, enforced here (overload.py says why Serve's alone does not hold)
        self.admission = Admission(stage_bounds(cfg, served.prior))
        self.outcomes: dict[str, int] = {}  # requests by outcome, as ditserve_requests_total (info())
        self._hidden = host_paths(self.served.id, self.served.lora.lora_dir)

    def __serve_build_asgi_app__(self) -> FastAPI:
        keys = api_key_digests(self.cfg.api_key, self.cfg.api_key_file)  # the file is read here, at start
        self.http_app = build_http_app(self, max_request_bytes=self.cfg.max_request_bytes, api_keys=sorted(keys))
        return self.http_app

    def drain(self) -> int:
        """Stop taking HTTP requests (new ones get 503) and return how many are still being answered
        (``ditserve run`` polls it on SIGTERM before shutting Serve down)."""
        self.http_app.state.drain.draining = True
        return self.http_app.state.drain.count

    # ---- composition --------------------------------------------------------------------------

    async def _compose(self, resolved: ResolvedRequest, return_latents: bool = False,
                       progress_key: str | None = None) -> Decoded:
        """TextEncoder (and Prior) -> DiT -> VAE for one resolved request (``compose.compose``, shared
        with the Jobs deployment); only the last reply is awaited."""
        stages = StageHandles(self.encoder, self.dit, self.vae, self.prior)
        return await compose(stages, resolved, return_latents, progress_key)

    def _is_video(self) -> bool:
        return self.served.spec.modality.value == "video"

    async def _run(self, req: GenerationRequest, return_latents: bool) -> tuple[np.ndarray | None, GenerationResult]:
        """Images (uint8) and the result; an audio model's clips are in ``result.audio`` (images ``None``)."""
        start = time.perf_counter()
        request_id = serve.context._get_serve_request_context().request_id
        resolved = self.served.validate(req)
        timeout_s = check_timeout(req.timeout_s, self.cfg.max_timeout_s)
        spec = self.served.specs[resolved.model]
        check_cost(resolved, self.cfg.max_request_cost, {
            "steps": spec.num_inference_steps, "pixels": spec.default_width * spec.default_height,
            "frames": spec.num_frames or 1})
        # with a Jobs deployment, the DiT reports this request's steps there (Jobs.progress(request_id))
        key = request_id if self.jobs is not None and request_id else None
        with self.admission.admit():  # StageBusy (429) when a stage's queue is full
            try:
                # the deadline cancels the stage calls (compose), so the ranks stop at their next step
                decoded = await asyncio.wait_for(self._compose(resolved, return_latents, key), timeout_s)
            except asyncio.TimeoutError:
                logger.info("request %s passed its timeout_s=%g; its stage calls were cancelled", request_id,
                            timeout_s)
                raise RequestTimeoutError(f"timeout_s: the request ran past its timeout_s={timeout_s:g} and was "
                                          "stopped") from None
            except asyncio.CancelledError:
                self.metrics.cancelled(resolved.model)
                self._count("cancelled")
                logger.info("request %s cancelled (caller gone); its stage calls were cancelled", request_id)
                raise
        # each stage reported its own timings and statistics; they are merged here, once
        timings, cache, lora = merge_reports(decoded.reports)
        timings["wall"] = time.perf_counter() - start
        return decoded.images, GenerationResult(None, request_id, resolved.model, resolved.seed, timings,
                                                decoded.latents, cache, lora, audio=decoded.audio,
                                                conditioning=conditioning_report(decoded.reports))

    def _finish(self, result: GenerationResult, postprocess_s: float) -> GenerationResult:
        """Close the request's timings (``queue``: time not spent computing) and record its metrics."""
        timings = result.timings
        timings["postprocess"] = postprocess_s
        wall = timings.pop("wall") + postprocess_s
        busy = sum(timings.get(s, 0.0) for s in STAGES if s not in SIDE_BY_SIDE)
        busy += max(timings.get(s, 0.0) for s in SIDE_BY_SIDE)
        timings["queue"] = max(0.0, wall - busy)
        timings["total"] = wall
        self.metrics.succeeded(result.model, timings, result.cache)
        self._count("ok")
        self.metrics.conditioning(result.model, result.conditioning)
        logger.info("request %s done: model=%s seed=%s timings=%s", result.request_id, result.model, result.seed,
                    {k: round(v, 4) for k, v in timings.items()})
        return result

    # ---- Python API ---------------------------------------------------------------------------

    async def generate(
        self,
        req: GenerationRequest,
        output_type: Literal["pil", "np"] = "pil",
        return_latents: bool = False,
    ) -> GenerationResult:
        """Generate images. Raises ``RequestError`` (naming the field) for a bad request.

        Returns:
            ``GenerationResult`` with PIL images (or uint8 arrays), the seed, the request id and
            the seconds per stage (``queue`` is the time not spent computing: queues, transfers).
            An audio model's result has ``audio`` instead (float32 waveforms (n, channels,
            samples) and the sample rate; ``output_type`` does not apply) and ``images=None``.
        """
        if isinstance(req, dict):
            req = GenerationRequest.parse(req)
        if self._is_video():
            raise RequestError("model", f"model {self.served.id} generates video: use generate_video (HTTP: "
                               "POST /v1/videos)")
        images, result = await self._run(req, return_latents)
        start = time.perf_counter()
        if images is not None:
            result.images = [Image.fromarray(a) for a in images] if output_type == "pil" else list(images)
        return self._finish(result, time.perf_counter() - start)

    async def generate_video(self, req: GenerationRequest, return_latents: bool = False) -> VideoResult:
        """Generate a video synchronously (video models). Cancelling the call (``response.cancel()``)
        stops the DiT's ranks at their next step.

        Returns:
            ``VideoResult``: uint8 frames (n, frames, H, W, 3), the fps, and the request's result
            (seed, request id, seconds per stage; latents when ``return_latents``).
        """
        if isinstance(req, dict):
            req = GenerationRequest.parse(req)
        if not self._is_video():
            raise RequestError("model", f"model {self.served.id} generates images: use generate")
        frames, result = await self._run(req, return_latents)
        result = self._finish(result, 0.0)
        return VideoResult(frames, self.served.spec.fps or 16, result)

    # ---- HTTP backend (http.HttpBackend) ------------------------------------------------------

    async def images(self, req: ImagesRequest) -> ImagesResponse:
        self._check_route(Modality.IMAGE)
        images, result = await self._run(req.generation_request(), return_latents=False)
        start = time.perf_counter()
        data = encode_images(images, req)
        result = self._finish(result, time.perf_counter() - start)
        height, width = images.shape[1:3]
        steps = req.num_inference_steps or self.served.specs[result.model].num_inference_steps
        return images_response(req, result, data, (width, height), steps)

    def _check_route(self, modality: Modality) -> None:
        """Refuse, before any stage runs, a route that does not fit the served model's output (404
        naming ``model`` and the route that does)."""
        spec = self.served.spec
        if spec.modality != modality:
            route = {Modality.AUDIO: AUDIO_PATH, Modality.VIDEO: VIDEOS_PATH}.get(spec.modality, IMAGES_PATH)
            raise RequestError("model", f"model {spec.id} generates {spec.modality.value}; use POST {route}", status=404)

    async def audio(self, req: AudioRequest) -> AudioAnswer:
        """``POST /v1/audio/generations``: the clip(s) as WAV/FLAC or base64 JSON."""
        self._check_route(Modality.AUDIO)
        _, result = await self._run(req.generation_request(), return_latents=False)
        start = time.perf_counter()
        answer = audio_answer(req, result)
        self._finish(result, time.perf_counter() - start)
        return answer

    def models(self) -> ModelList:
        """The served models, then each adapter of ``lora_dir`` (read now) with the base as parent."""
        cards = [ModelCard(id=m, created=self.created, root=m) for m in self.served.specs]
        for name, path in list_adapters(self.served.lora.lora_dir).items():
            try:
                created = int(path.stat().st_mtime)
            except OSError:  # removed while listing
                continue
            cards.append(ModelCard(id=name, created=created, root=self.served.id, parent=self.served.id))
        return ModelList(data=cards)

    def _jobs(self) -> DeploymentHandle:
        if self.jobs is None:
            raise RequestError("model", f"model {self.served.id} generates {self.served.spec.modality.value}; "
                               "/v1/videos serves video models")
        return self.jobs

    async def create_video(self, req: VideosRequest) -> VideoJob:
        if req.user:
            logger.info("video job for user %s", req.user)
        return VideoJob.model_validate(await self._jobs().create.remote(req))

    async def video(self, video_id: str) -> VideoJob:
        return VideoJob.model_validate(await self._jobs().get.remote(video_id))

    async def videos(self, limit: int, after: str | None) -> VideoList:
        jobs = [VideoJob.model_validate(j) for j in await self._jobs().list.remote(limit + 1, after)]
        page = jobs[:limit]
        return VideoList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                         has_more=len(jobs) > limit)

    async def delete_video(self, video_id: str) -> VideoDeleted:
        return VideoDeleted.model_validate(await self._jobs().delete.remote(video_id))

    async def video_content(self, video_id: str, variant: str) -> tuple[bytes, str]:
        return await self._jobs().content.remote(video_id, variant)

    def info(self) -> dict[str, Any]:
        """This replica's id and model, its requests by outcome (as ``ditserve_requests_total``) and
        in flight (operators, tests: ``handle.broadcast("info")``)."""
        return {"replica_id": self.replica_id, "model": self.served.id, "requests": dict(self.outcomes),
                "in_flight": self.admission.in_flight}

    def redact(self, text: str) -> str:
        """``text`` without host paths: a model served from a folder (its id is the path) is named by
        the folder's name, ``lora_dir`` by the option's name (error bodies; the log keeps the paths)."""
        return redact_paths(text, self._hidden)

    def _count(self, status: str) -> None:
        self.outcomes[status] = self.outcomes.get(status, 0) + 1

    def failed(self, status: int) -> None:
        self.metrics.failed(self.served.id, status)
        self._count(str(status))
