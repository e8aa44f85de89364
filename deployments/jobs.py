"""Video jobs (``/v1/videos``): the ``Jobs`` deployment stores them and runs them.

Why a deployment of its own (one replica) and not a Router's memory: a video takes minutes, and the
client that created it polls, fetches and deletes it through whichever Router replica the proxy
picks; a job must also outlive the Router replica that created it (a scale-down, a restart). The
Jobs replica holds the stage handles and runs each job with the same ``compose`` as a synchronous
request (``compose.py``), in an asyncio task of its own; the DiT and VAE replicas queue the jobs as
they queue any request. The store is in this replica's memory: a job does not survive the Jobs
replica itself (results are in-memory too, bounded by ``VideoJobsOptions``).

Lifecycle: ``queued`` (created; its DiT call waits for a replica) -> ``in_progress`` (the DiT's
rank 0 reported its first step count) -> ``completed`` (MP4 and frames stored) or ``failed``
(``error`` says why) or ``cancelled`` (``DELETE`` while queued or running: the job's stage calls are
cancelled and the DiT ranks stop at their next step; the record stays, without a result, until
``result_ttl_s``). ``DELETE`` of a finished job drops it (then 404).

Progress: the DiT coordinator reads rank 0's step count (the ranks' control thread, which the
running loop does not wait for) and reports it here (``report``) under the job's id; synchronous
requests report under their request id (``progress`` reads them: tests, operators).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from typing import Any

import numpy as np
from ray import serve

from .compose import StageHandles, compose
from .config import AppConfig, VideoJobsOptions
from .http import VideosRequest
from .metrics import RouterMetrics
from .schema import GenerationRequest, RequestError
from .served import ServedModel
from .video import VARIANTS, encode_mp4, encode_npy, encode_png, frames_per_seconds

logger = logging.getLogger("ray.serve")

JOBS = "Jobs"  # the deployment's name (the DiT coordinator reports progress to it by name)
BOARD_SIZE = 256  # progress entries kept for synchronous requests


def video_request(body: VideosRequest, served: ServedModel, opts: VideoJobsOptions) -> tuple[GenerationRequest, int]:
    """The generation request of a ``POST /v1/videos`` body and its output fps (raises ``RequestError``
    naming the field): ``num_frames`` when given, else ``seconds`` x fps rounded to k x 4 + 1, else the
    model's default frames."""
    spec = served.spec
    if body.model is not None and body.model in served.specs and served.specs[body.model].modality.value != "video":
        raise RequestError("model", f"model {body.model} does not generate video; /v1/videos serves video models")
    fps = body.fps or spec.fps or 16
    frames = body.num_frames
    if body.seconds is not None:
        seconds = body.seconds_value()
        if seconds > opts.max_seconds:
            raise RequestError("seconds", f"{seconds:g} s exceeds the deployment's maximum of {opts.max_seconds:g} s")
        if frames is None:
            frames = frames_per_seconds(seconds, fps, spec.frame_multiple)
            if frames > spec.max_frames:
                raise RequestError("seconds", f"{seconds:g} s at {fps} fps is {frames} frames; model {spec.id} makes "
                                   f"at most {spec.max_frames} ({(spec.max_frames - 1) / fps:g} s)")
    return body.generation_request(frames), fps


def new_job(body: VideosRequest, served: ServedModel, opts: VideoJobsOptions) -> tuple[Job, Any]:
    """A ``POST /v1/videos`` body checked against the served model (raises ``RequestError`` naming the
    field; its image is ``input_reference``): the new job's record and the resolved request."""
    req, fps = video_request(body, served, opts)
    resolved = served.validate(req, image_field="input_reference")
    p = resolved.params
    job = Job(id=f"video_{uuid.uuid4().hex}", model=resolved.model, size=f"{p.width}x{p.height}",
              num_frames=p.num_frames, fps=fps, num_inference_steps=p.num_inference_steps, seed=resolved.seed,
              created_at=int(time.time()))
    return job, resolved


@dataclasses.dataclass
class Job:
    """One video job (the store's record)."""

    id: str
    model: str
    size: str
    num_frames: int
    fps: int
    num_inference_steps: int
    seed: int
    created_at: int
    status: str = "queued"
    steps_done: int = 0
    completed_at: int | None = None
    error: dict[str, str] | None = None
    cancelled_at_step: int | None = None
    stopped_at_step: int | None = None
    frames: np.ndarray | None = None
    mp4: bytes | None = None
    task: asyncio.Task | None = dataclasses.field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def result_bytes(self) -> int:
        return (len(self.mp4) if self.mp4 is not None else 0) + (self.frames.nbytes if self.frames is not None else 0)

    def view(self, ttl_s: float) -> dict[str, Any]:
        """The job as ``/v1/videos`` answers it (``http.VideoJob``'s fields)."""
        if self.status == "completed":
            progress = 100
        else:
            progress = min(99, int(100 * self.steps_done / max(1, self.num_inference_steps)))
        return {
            "id": self.id, "object": "video", "status": self.status, "progress": progress,
            "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": int(self.completed_at + ttl_s) if self.completed_at is not None else None,
            "model": self.model, "size": self.size, "seconds": f"{self.num_frames / self.fps:g}",
            "error": self.error, "num_frames": self.num_frames, "fps": self.fps, "seed": self.seed,
            "steps_done": self.steps_done, "num_inference_steps": self.num_inference_steps,
            "cancelled_at_step": self.cancelled_at_step, "stopped_at_step": self.stopped_at_step,
        }


class JobStore:
    """The jobs by id, oldest first, with the retention rules of ``VideoJobsOptions`` (no Ray here)."""

    def __init__(self, opts: VideoJobsOptions, clock: Any = time.time) -> None:
        self.opts, self.clock = opts, clock
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    def add(self, job: Job) -> None:
        self.sweep()
        if len(self.jobs) >= self.opts.max_jobs:
            oldest = next((j for j in self.jobs.values() if j.finished), None)
            if oldest is None:
                raise RequestError("model", f"{len(self.jobs)} jobs are queued or running (max_jobs); retry later",
                                   status=429)
            self.jobs.pop(oldest.id)
        self.jobs[job.id] = job

    def get(self, job_id: str) -> Job:
        self.sweep()
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError("id", f"no video job {job_id!r} (unknown, deleted or expired)", status=404)
        return job

    def pop(self, job_id: str) -> Job:
        job = self.get(job_id)
        return self.jobs.pop(job.id)

    def newest_first(self, limit: int, after: str | None) -> list[Job]:
        self.sweep()
        jobs = list(reversed(self.jobs.values()))
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise RequestError("after", f"no video job {after!r}", status=404)
            jobs = jobs[ids.index(after) + 1:]
        return jobs[:limit]

    def sweep(self) -> None:
        """Drop finished jobs past ``result_ttl_s``, then the oldest finished results past ``max_result_bytes``."""
        now = self.clock()
        for job in [j for j in self.jobs.values() if j.finished and j.completed_at is not None
                    and now - j.completed_at > self.opts.result_ttl_s]:
            self.jobs.pop(job.id)
        total = sum(j.result_bytes for j in self.jobs.values())
        for job in [j for j in self.jobs.values() if j.finished]:
            if total <= self.opts.max_result_bytes:
                break
            total -= job.result_bytes
            self.jobs.pop(job.id)


@serve.deployment(name=JOBS)
class Jobs:
    """The video job store and runner (one replica; see the module docstring).

    Args:
        cfg: the app config (``video_jobs`` options).
        served: the served-model summary (requests are validated here, once).
        encoder, dit, vae, prior: the stage handles (the same as the Router's).
    """

    @staticmethod
    def deployment_options(cfg: AppConfig) -> dict[str, Any]:
        # one replica: the store is its memory; many concurrent calls (polls, progress reports)
        return {"num_replicas": 1, "max_ongoing_requests": 1000, "max_queued_requests": -1,
                "ray_actor_options": {"num_cpus": cfg.video_jobs.num_cpus}}

    def __init__(self, cfg: AppConfig, served: ServedModel, encoder: Any, dit: Any, vae: Any, prior: Any = None) -> None:
        self.opts = cfg.video_jobs
        self.served = served
        self.stages = StageHandles(encoder, dit, vae, prior)
        self.store = JobStore(self.opts)
        self.board: collections.OrderedDict[str, dict[str, int]] = collections.OrderedDict()
        self.metrics = RouterMetrics()

    # ---- the job API ----------------------------------------------------------------------------

    async def create(self, body: VideosRequest) -> dict[str, Any]:
        job, resolved = new_job(body, self.served, self.opts)
        self.store.add(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job, resolved))
        logger.info("video job %s created: model=%s size=%s frames=%d steps=%d seed=%d", job.id, job.model, job.size,
                    job.num_frames, job.num_inference_steps, job.seed)
        return job.view(self.opts.result_ttl_s)

    async def get(self, job_id: str) -> dict[str, Any]:
        return self.store.get(job_id).view(self.opts.result_ttl_s)

    async def list(self, limit: int = 20, after: str | None = None) -> list[dict[str, Any]]:
        return [j.view(self.opts.result_ttl_s) for j in self.store.newest_first(limit, after)]

    async def delete(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (its record stays, ``cancelled``), or drop a finished one."""
        job = self.store.get(job_id)
        if job.finished:
            self.store.pop(job_id)
        else:
            job.status = "cancelled"
            job.completed_at = int(time.time())
            if job.task is not None:
                job.task.cancel()
                # the task ends as soon as its stage calls are cancelled; the DiT reports where its
                # ranks stopped (stopped_at_step) once they have
                await asyncio.wait([job.task], timeout=30)
            self.metrics.cancelled(job.model)
            logger.info("video job %s cancelled at step %d", job.id, job.steps_done)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    async def content(self, job_id: str, variant: str = "video") -> tuple[bytes, str]:
        """The job's result as (bytes, media type): ``video`` (MP4), ``thumbnail`` (PNG of the first
        frame) or ``frames`` (.npy, uint8 (frames, H, W, 3))."""
        if variant not in VARIANTS:
            raise RequestError("variant", f"{variant!r} is not one of {', '.join(VARIANTS)}")
        job = self.store.get(job_id)
        if job.status != "completed" or job.frames is None:
            raise RequestError("id", f"video job {job_id} is {job.status}; its content is ready when it is completed",
                               status=409)
        if variant == "video":
            data = job.mp4
        elif variant == "thumbnail":
            data = encode_png(job.frames[0])
        else:
            data = encode_npy(job.frames)
        return data, VARIANTS[variant]

    # ---- progress (from the DiT coordinator) -------------------------------------------------

    async def report(self, key: str, steps_done: int | None = None, cancelled_at_step: int | None = None,
                     stopped_at_step: int | None = None) -> None:
        """Rank 0's step count for ``key`` (a job id or a request id); steps only grow."""
        job = self.store.jobs.get(key)
        entry = job if job is not None else self.board.setdefault(key, {})
        if job is None:
            self.board.move_to_end(key)
            while len(self.board) > BOARD_SIZE:
                self.board.popitem(last=False)
        for name, value in (("steps_done", steps_done), ("cancelled_at_step", cancelled_at_step),
                            ("stopped_at_step", stopped_at_step)):
            if value is None:
                continue
            if job is not None:
                if name != "steps_done" or value > job.steps_done:
                    setattr(job, name, value)
            else:
                entry[name] = max(value, entry.get(name, 0)) if name == "steps_done" else value
        if job is not None and job.status == "queued" and steps_done is not None:
            job.status = "in_progress"

    async def progress(self, key: str) -> dict[str, Any] | None:
        """What was reported under ``key`` (``steps_done``, ``cancelled_at_step``, ``stopped_at_step``)."""
        job = self.store.jobs.get(key)
        if job is not None:
            return {"steps_done": job.steps_done, "cancelled_at_step": job.cancelled_at_step,
                    "stopped_at_step": job.stopped_at_step}
        entry = self.board.get(key)
        return dict(entry) if entry is not None else None

    # ---- running ----------------------------------------------------------------------------

    async def _run(self, job: Job, resolved: Any) -> None:
        start = time.perf_counter()
        try:
            decoded = await compose(self.stages, resolved, progress_key=job.id)
            frames = decoded.images[0]
            mp4 = await asyncio.to_thread(encode_mp4, frames, job.fps)
            if job.status == "cancelled":  # deleted while its MP4 was being written: keep nothing
                return
            job.frames, job.mp4 = frames, mp4
            job.steps_done = job.num_inference_steps
            job.status, job.completed_at = "completed", int(time.time())
            self.store.sweep()  # within the byte budget (this job too, if it alone exceeds it)
            self.metrics.requests.inc(tags={"model": job.model, "status": "ok"})
            logger.info("video job %s completed in %.2f s", job.id, time.perf_counter() - start)
        except asyncio.CancelledError:
            job.status = "cancelled"
            raise
        except RequestError as exc:
            self._failed(job, "invalid_request", f"{exc.field}: {exc.message}", exc.status)
        except Exception as exc:  # noqa: BLE001 - the job fails; the replica serves the next one
            logger.exception("video job %s failed", job.id)
            self._failed(job, "generation_failed", f"{type(exc).__name__}: the generation failed (see the logs)", 500)

    def _failed(self, job: Job, code: str, message: str, status: int) -> None:
        job.status, job.completed_at, job.error = "failed", int(time.time()), {"code": code, "message": message}
        self.metrics.failed(job.model, status)
