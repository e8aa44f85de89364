"""The Router (ingress): validates, composes TextEncoder -> DiT -> VAE, post-processes, answers.

It never holds a model. The stages' ``DeploymentResponse``s are passed on unawaited, so the
conditioning and the latents travel through the object store once, replica to replica. HTTP is
OpenAI-style (``/v1/images/generations``, ``/v1/models``, ``/health``) with OpenAI's error
shape; Python callers use ``handle.generate.remote(GenerationRequest(...))``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ditserve.models import resolve_model

from .config import AppConfig
from .attach import check_support
from .engine import GenerationResult
from .stages import merge_reports
from .schema import GenerationRequest, RequestError, validate_request

logger = logging.getLogger("ray.serve")

STAGES = ("encode", "prepare", "denoise", "decode", "postprocess")
_LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250]


class ImagesRequest(GenerationRequest):
    """Body of ``POST /v1/images/generations``: OpenAI's fields plus the generation fields."""

    response_format: Literal["b64_json"] = Field("b64_json", description="Only base64 JSON is returned.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image encoding.")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    user: str | None = Field(None, max_length=256, description="End-user id, logged with the request.")

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.model_dump(include=set(GenerationRequest.model_fields)))


def encode_image(array: np.ndarray, fmt: str, quality: int | None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=95 if quality is None else quality)
    return buf.getvalue()


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment(name="Router")
class Router:
    """Ingress of the app."""

    @staticmethod
    def deployment_options(cfg: AppConfig) -> dict[str, Any]:
        opts = cfg.router
        return {
            "max_ongoing_requests": opts.max_ongoing_requests,
            "max_queued_requests": opts.max_queued_requests,
            "autoscaling_config": opts.autoscaling.to_serve(),
            "ray_actor_options": {"num_cpus": opts.num_cpus, "resources": dict(opts.custom_resources)},
        }

    def __init__(
        self, cfg: AppConfig, encoder: DeploymentHandle, dit: DeploymentHandle, vae: DeploymentHandle
    ) -> None:
        self.cfg = cfg
        self.encoder, self.dit, self.vae = encoder, dit, vae
        resolved = resolve_model(cfg.engine.model)
        spec = resolved.spec
        self.model_id = spec.id
        self.served = {spec.id: spec}
        self.cache_default = cfg.engine.cache()
        self.num_blocks = check_support(cfg.engine, ()).num_blocks
        self.created = int(time.time())
        self.stage_seconds = Histogram(
            "ditserve_stage_seconds", description="Seconds per request stage.", boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model", "stage"),
        )
        self.request_seconds = Histogram(
            "ditserve_request_seconds", description="Seconds per request, end to end.",
            boundaries=_LATENCY_BOUNDARIES, tag_keys=("model",),
        )
        self.requests = Counter("ditserve_requests_total", description="Requests by outcome.", tag_keys=("model", "status"))
        self.cache_calls = Counter(
            "ditserve_cache_calls_total", description="Transformer calls of cached requests, computed or skipped.",
            tag_keys=("model", "backend", "outcome"),
        )
        self.cache_blocks = Counter(
            "ditserve_cache_blocks_total", description="Transformer blocks of cached requests, evaluated or skipped.",
            tag_keys=("model", "backend", "outcome"),
        )

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
        """
        if isinstance(req, dict):
            req = GenerationRequest.parse(req)
        images, result = await self._run(req, return_latents)
        start = time.perf_counter()
        result.images = [Image.fromarray(a) for a in images] if output_type == "pil" else list(images)
        return self._finish(result, time.perf_counter() - start)

    async def _run(self, req: GenerationRequest, return_latents: bool) -> tuple[np.ndarray, GenerationResult]:
        start = time.perf_counter()
        request_id = serve.context._get_serve_request_context().request_id
        resolved = validate_request(req, self.served, self.model_id, cache_default=self.cache_default,
                                    num_blocks=self.num_blocks, vae=self.cfg.engine.vae)
        encoded = self.encoder.encode.remote(resolved)
        denoised = self.dit.denoise.remote(resolved, encoded)
        decoded = await self.vae.decode.remote(resolved, denoised, return_latents)
        timings, cache = merge_reports(decoded.reports)
        timings["wall"] = time.perf_counter() - start
        return decoded.images, GenerationResult(None, request_id, resolved.model, resolved.seed, timings,
                                                decoded.latents, cache)

    def _finish(self, result: GenerationResult, postprocess_s: float) -> GenerationResult:
        timings = result.timings
        timings["postprocess"] = postprocess_s
        wall = timings.pop("wall") + postprocess_s
        timings["queue"] = max(0.0, wall - sum(timings.get(s, 0.0) for s in STAGES))
        timings["total"] = wall
        for stage, seconds in timings.items():
            if stage != "total":
                self.stage_seconds.observe(seconds, tags={"model": result.model, "stage": stage})
        self.request_seconds.observe(wall, tags={"model": result.model})
        self.requests.inc(tags={"model": result.model, "status": "ok"})
        if result.cache:
            self._count_cache(result.model, result.cache)
        logger.info("request %s done: model=%s seed=%s timings=%s", result.request_id, result.model, result.seed,
                    {k: round(v, 4) for k, v in timings.items()})
        return result

    def _count_cache(self, model: str, stats: dict) -> None:
        tags = {"model": model, "backend": stats["backend"]}
        for outcome, calls, blocks in (
            ("computed", stats["calls_computed"], stats["blocks_evaluated"]),
            ("skipped", stats["calls_cached"], stats["blocks_total"] - stats["blocks_evaluated"]),
        ):
            if calls:
                self.cache_calls.inc(calls, tags={**tags, "outcome": outcome})
            if blocks:
                self.cache_blocks.inc(blocks, tags={**tags, "outcome": outcome})

    # ---- HTTP ---------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        routes = {"/v1/images/generations": "POST", "/v1/models": "GET", "/health": "GET"}
        if path not in routes:
            return error_response(404, f"no route {path}; routes: {', '.join(routes)}")
        if request.method != routes[path]:
            return error_response(405, f"{path} takes {routes[path]}")
        if path == "/health":
            return JSONResponse({"status": "ok"})
        if path == "/v1/models":
            data = [{"id": m, "object": "model", "created": self.created, "owned_by": "ditserve"} for m in self.served]
            return JSONResponse({"object": "list", "data": data})
        return await self._images(request)

    async def _images(self, request: Request) -> Response:
        status = "ok"
        try:
            body = await self._read_json(request)
            http_req = ImagesRequest.parse(body)
            if http_req.output_compression is not None and http_req.output_format == "png":
                raise RequestError("output_compression", "applies to jpeg and webp only")
            if http_req.user:
                logger.info("request for user %s", http_req.user)
            images, result = await self._run(http_req.generation_request(), return_latents=False)
            start = time.perf_counter()
            data = [
                {"b64_json": base64.b64encode(
                    encode_image(a, http_req.output_format, http_req.output_compression)).decode("ascii")}
                for a in images
            ]
            result = self._finish(result, time.perf_counter() - start)
            height, width = images.shape[1:3]
            return JSONResponse(
                {
                    "created": int(time.time()),
                    "data": data,
                    "model": result.model,
                    "output_format": http_req.output_format,
                    "size": f"{width}x{height}",
                    "seed": result.seed,
                    "request_id": result.request_id,
                    "timings": {k: round(v, 6) for k, v in result.timings.items()},
                    "cache": result.cache,
                    "usage": {"images": len(data), "num_inference_steps": http_req.num_inference_steps
                              or self.served[result.model].num_inference_steps},
                },
                headers={"x-request-id": result.request_id},
            )
        except RequestError as exc:
            status = str(exc.status)
            return error_response(exc.status, str(exc), exc.field)
        except BackPressureError as exc:
            status = "429"
            return error_response(429, f"server busy, retry later ({exc})", kind="rate_limit_error")
        except (DeploymentUnavailableError, RayActorError) as exc:
            status = "503"
            return error_response(503, f"model stage unavailable: {exc}")
        except Exception as exc:  # the replica stays up; the client learns what failed
            status = "500"
            logger.exception("request failed")
            return error_response(500, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            if status != "ok":
                self.requests.inc(tags={"model": self.model_id, "status": status})

    async def _read_json(self, request: Request) -> dict:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError("body", f"request body of {declared} bytes exceeds {limit}", status=413)
        raw = await request.body()
        if len(raw) > limit:
            raise RequestError("body", f"request body of {len(raw)} bytes exceeds {limit}", status=413)
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise RequestError("body", f"invalid JSON: {exc}", status=400) from None
        if not isinstance(body, dict):
            raise RequestError("body", "must be a JSON object", status=400)
        return body
