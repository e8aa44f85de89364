"""The HTTP face of the Router: OpenAI-style routes on FastAPI, request and response models,
OpenAI's error shape, and the image encoding of answers (audio clips are encoded by ``audio.py``).

``build_http_app(backend, max_request_bytes=...)`` returns the FastAPI app a Router replica serves
through Serve's ingress (``@serve.ingress``). The routes only translate: HTTP in, a call to the
``HttpBackend`` (the Router), HTTP out. Every error, FastAPI's own included (validation, unknown
route, wrong method), is answered in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` with ``param`` naming the field as ``GenerationRequest.parse`` does. The served
``/openapi.json`` documents the routes with these models.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import io
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .audio import AUDIO_MEDIA_TYPES, encode_audio
from .executor import RequestTimeoutError
from .overload import RETRY_AFTER_S, StageBusy, StageUnavailable
from .engine import GenerationResult
from .schema import GenerationRequest, RequestError, field_error
from .security import ApiKeyAuth, JsonGuard, RequestIdGuard, parse_json, replay_body, request_id

logger = logging.getLogger("ray.serve")

IMAGES_PATH = "/v1/images/generations"
AUDIO_PATH = "/v1/audio/generations"
EDITS_PATH = "/v1/images/edits"
VIDEOS_PATH = "/v1/videos"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
OPENAPI_PATH = "/openapi.json"


# ---- request and response models ------------------------------------------------------------


class ImagesRequest(GenerationRequest):
    """Body of ``POST /v1/images/generations``: OpenAI's fields plus the generation fields."""

    response_format: Literal["b64_json"] = Field("b64_json", description="Only base64 JSON is returned.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image encoding.")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    user: str | None = Field(None, max_length=256, description="End-user id, logged with the request.")

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.model_dump(include=set(GenerationRequest.model_fields)))

    def check(self) -> None:
        """What the fields' own validators cannot tell (raises ``RequestError``)."""
        if self.output_compression is not None and self.output_format == "png":
            raise RequestError("output_compression", "applies to jpeg and webp only")


class AudioRequest(GenerationRequest):
    """Body of ``POST /v1/audio/generations``: the generation fields (``seconds``,
    ``seconds_start`` for the length) and the answer's form."""

    response_format: Literal["wav", "flac", "b64_json"] = Field(
        "wav", description="'wav' or 'flac': the clip as the body (16-bit PCM; n must be 1); 'b64_json': JSON "
        "with each clip as base64 16-bit WAV.")
    user: str | None = Field(None, max_length=256, description="End-user id, logged with the request.")

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.model_dump(include=set(GenerationRequest.model_fields)))

    def check(self) -> None:
        """What the fields' own validators cannot tell (raises ``RequestError``)."""
        if self.response_format != "b64_json" and self.n > 1:
            raise RequestError("n", f"response_format={self.response_format!r} returns one clip; use b64_json for n > 1")


class ImageEditsRequest(ImagesRequest):
    """Body of ``POST /v1/images/edits`` as JSON: the generation fields, the input image(s) base64.

    The multipart form OpenAI defines (``image`` one file, ``image[]`` several, the other fields as
    form fields, ``lora`` and ``cache`` as JSON text) is read into this same model (``edits_from_form``).
    """

    image: str | list[str] | None = Field(
        None, description="Input image(s), base64 (or data: URLs) of PNG, JPEG or WebP; a multipart request sends "
        "files as `image` (one) or `image[]` (several).",
    )

    def generation_request(self) -> GenerationRequest:
        data = self.model_dump(include=set(GenerationRequest.model_fields) - {"images"})
        return GenerationRequest.model_validate({**data, "images": self.images or self.decoded_images()})

    def decoded_images(self) -> list[bytes]:
        if self.image is None:
            raise RequestError("image", "required: base64 image(s), or files `image` / `image[]` in a multipart form")
        values = self.image if isinstance(self.image, list) else [self.image]
        return [decode_base64(value, f"image[{i}]") for i, value in enumerate(values)]


# multipart form fields that hold JSON (objects or lists) rather than a scalar
_JSON_FORM_FIELDS = ("lora", "cache")


async def edits_from_form(request: Request) -> ImageEditsRequest:
    """A multipart ``/v1/images/edits`` request as ``ImageEditsRequest`` (errors name the field)."""
    try:
        form = await request.form()
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's
        raise RequestError("body", f"unreadable multipart form: {exc}", status=400) from None
    data: dict[str, Any] = {}
    images: list[bytes] = []
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            if isinstance(value, str):
                raise RequestError(f"image[{len(images)}]", "must be a file upload")
            images.append(await value.read())
        elif not isinstance(value, str):
            raise RequestError(key, "unexpected file; only image / image[] take files")
        elif key in _JSON_FORM_FIELDS:
            data[key] = parse_json(value, key)
        else:
            data[key] = value
    if not images:
        raise RequestError("image", "required: one file as `image`, or several as `image[]`")
    try:
        req = ImageEditsRequest.model_validate({**data, "images": images})
    except ValidationError as exc:
        raise field_error(exc.errors()[0]) from None
    return req


class VideosRequest(GenerationRequest):
    """Body of ``POST /v1/videos``: OpenAI's fields (``prompt``, ``model``, ``seconds``, ``size``) plus
    the generation fields (``num_frames``, ``negative_prompt``, ``num_inference_steps``,
    ``guidance_scale``, ``guidance_scale_2``, ``seed``, ``cache``, ``lora``) and ``fps``."""

    seconds: str | float | None = Field(
        None, description="Length in seconds (OpenAI sends a string, e.g. '4'): frames = seconds x fps rounded to "
        "k x 4 + 1. num_frames, when given, wins. Default: the model's frames.",
    )
    fps: int | None = Field(None, ge=1, le=120, description="Frames per second of the MP4, and of seconds -> frames; "
                            "default: the model's.")
    user: str | None = Field(None, max_length=256, description="End-user id, logged with the request.")
    input_reference: str | None = Field(
        None, description="Image-to-video (Wan2.2 I2V-A14B: required; TI2V-5B: optional): the image the video "
        "starts from, base64 (or a data: URL) of PNG, JPEG or WebP, resized to the video's size; a multipart "
        "request sends it as the file `input_reference` (OpenAI's videos API). Checked as every input image "
        "(deployments/images_in.py).",
    )

    def seconds_value(self) -> float:
        try:
            value = float(self.seconds)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise RequestError("seconds", f"{self.seconds!r} is not a number of seconds, e.g. '4'") from None
        if not value > 0 or value == float("inf"):
            raise RequestError("seconds", f"{self.seconds!r} must be a positive number of seconds")
        return value

    def generation_request(self, num_frames: int | None) -> GenerationRequest:
        if self.n != 1:
            raise RequestError("n", "a video job makes one video; send one job per video")
        # ``seconds`` here is the video's length (turned into num_frames), not an audio clip's end
        fields = self.model_dump(include=set(GenerationRequest.model_fields) - {"seconds", "images"}, exclude_none=True)
        images = self.images or self.reference_images()
        return GenerationRequest.model_validate({**fields, "num_frames": num_frames, **({"images": images} if images else {})})

    def reference_images(self) -> list[bytes]:
        """``input_reference`` (base64) as encoded image bytes; none when it is unset."""
        if self.input_reference is None:
            return []
        return [decode_base64(self.input_reference, "input_reference")]


def decode_base64(value: str, field: str) -> bytes:
    """Base64 (or a data: URL) -> bytes (422 naming ``field`` when it is not valid base64)."""
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RequestError(field, "is not valid base64") from None


async def videos_from_form(request: Request) -> VideosRequest:
    """A multipart ``POST /v1/videos`` (OpenAI's form: ``input_reference`` a file, the other fields as form
    fields, ``lora`` and ``cache`` as JSON text) as ``VideosRequest`` (errors name the field)."""
    try:
        form = await request.form()
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's
        raise RequestError("body", f"unreadable multipart form: {exc}", status=400) from None
    data: dict[str, Any] = {}
    images: list[bytes] = []
    for key, value in form.multi_items():
        if key == "input_reference" and not isinstance(value, str):
            if images:
                raise RequestError(key, "one input_reference per video job")
            images.append(await value.read())
        elif not isinstance(value, str):
            raise RequestError(key, "unexpected file; only input_reference takes a file")
        elif key in _JSON_FORM_FIELDS:
            data[key] = parse_json(value, key)
        else:
            data[key] = value
    if images and "input_reference" in data:
        raise RequestError("input_reference", "give it once: a file or base64, not both")
    try:
        return VideosRequest.model_validate({**data, **({"images": images} if images else {})})
    except ValidationError as exc:
        raise field_error(exc.errors()[0]) from None


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageData(_Response):
    """One image."""

    b64_json: str = Field(description="The encoded image (output_format), base64.")


class ImagesUsage(_Response):
    """What the request consumed."""

    images: int = Field(description="Images generated.")
    num_inference_steps: int = Field(description="Denoising steps per image.")


class ImagesResponse(_Response):
    """Answer of ``POST /v1/images/generations``."""

    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData] = Field(description="The images, in order.")
    model: str = Field(description="Model that generated them.")
    output_format: Literal["png", "jpeg", "webp"] = Field(description="Image encoding.")
    size: str = Field(description="'WIDTHxHEIGHT' of the images.")
    seed: int = Field(description="Seed of the initial noise (drawn when the request gave none).")
    request_id: str = Field(description="Id of the request (logs, metrics, x-request-id).")
    timings: dict[str, float] = Field(
        description="Seconds per stage: queue (time not spent computing), encode, prepare, denoise, decode, "
        "postprocess, total."
    )
    cache: dict[str, Any] | None = Field(description="Cache statistics when the request ran with a cache.")
    lora: dict[str, Any] | None = Field(
        None, description="With LoRA: the adapters applied ('adapters') and what the DiT replica did for them "
        "('loads' from lora_dir, 'hits' already loaded, 'restores' from CPU memory, 'evictions').",
    )
    conditioning: dict[str, int] | None = Field(
        None, description="With input images: the conditioning cache's counts for the request (vision_hits, "
        "vision_misses of the text encoder; latent_hits, latent_misses of the VAE encode).",
    )
    usage: ImagesUsage = Field(description="What the request consumed.")


class AudioData(_Response):
    """One clip."""

    b64_json: str = Field(description="The clip as 16-bit PCM WAV, base64.")


class AudioResponse(_Response):
    """JSON answer of ``POST /v1/audio/generations`` (``response_format=b64_json``)."""

    created: int = Field(description="Unix time of the answer.")
    data: list[AudioData] = Field(description="The clips, in order.")
    model: str = Field(description="Model that generated them.")
    sample_rate: int = Field(description="Samples per second.")
    channels: int = Field(description="Channels (2: stereo).")
    seconds: float = Field(description="Length of each clip in seconds (samples / sample_rate).")
    seed: int = Field(description="Seed of the initial noise (drawn when the request gave none).")
    request_id: str = Field(description="Id of the request (logs, metrics, x-request-id).")
    timings: dict[str, float] = Field(description="Seconds per stage, as for images.")
    cache: dict[str, Any] | None = Field(None, description="Cache statistics when the request ran with a cache.")


@dataclasses.dataclass(frozen=True)
class AudioAnswer:
    """What the backend answers an audio request with: a JSON body or one encoded clip."""

    body: AudioResponse | bytes
    request_id: str
    seed: int
    media_type: str = "application/json"


class VideoError(_Response):
    """Why a video job failed."""

    code: str = Field(description="invalid_request or generation_failed.")
    message: str = Field(description="What went wrong.")


class VideoJob(_Response):
    """A video job, in OpenAI's shape (``object: video``) with ditserve's extensions after ``error``."""

    id: str = Field(description="Job id ('video_...').")
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"] = Field(description="Lifecycle state.")
    progress: int = Field(description="Percent of the denoising steps done (100 once completed).")
    created_at: int = Field(description="Unix time the job was created.")
    completed_at: int | None = Field(description="Unix time it ended (completed, failed or cancelled).")
    expires_at: int | None = Field(description="Unix time it will be dropped (result_ttl_s after it ended).")
    model: str = Field(description="Model that generates it.")
    size: str = Field(description="'WIDTHxHEIGHT'.")
    seconds: str = Field(description="Length: num_frames / fps.")
    error: VideoError | None = Field(description="Why it failed (status failed).")
    num_frames: int = Field(description="Frames of the video.")
    fps: int = Field(description="Frames per second of the MP4.")
    seed: int = Field(description="Seed of the initial noise.")
    steps_done: int = Field(description="Denoising steps finished (rank 0's counter).")
    num_inference_steps: int = Field(description="Denoising steps of the job.")
    cancelled_at_step: int | None = Field(description="Cancelled: steps rank 0 had finished when the cancel reached it.")
    stopped_at_step: int | None = Field(description="Cancelled: steps finished when every rank had stopped.")


class VideoList(_Response):
    """Answer of ``GET /v1/videos``: newest first."""

    object: Literal["list"] = "list"
    data: list[VideoJob] = Field(description="The jobs, newest first.")
    first_id: str | None = Field(description="Id of the first job of data.")
    last_id: str | None = Field(description="Id of the last job of data (the next page's 'after').")
    has_more: bool = Field(description="Whether older jobs follow.")


class VideoDeleted(_Response):
    """Answer of ``DELETE /v1/videos/{id}``."""

    id: str = Field(description="Job id.")
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = Field(description="Always true.")


class ModelCard(_Response):
    """One served model, as OpenAI lists them."""

    id: str = Field(description="Model id (the request's model field; an adapter's name selects it at scale 1).")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the deployment started (an adapter: its file's modification time).")
    owned_by: str = Field("ditserve", description="Owner.")
    root: str | None = Field(None, description="The base model this one runs on (itself for a base model).")
    parent: str | None = Field(None, description="A LoRA adapter's base model (vLLM's convention); null for a base "
                               "model.")


class ModelList(_Response):
    """Answer of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="The served models.")


class Health(_Response):
    """Answer of ``GET /health``."""

    status: Literal["ok"] = "ok"


class ErrorDetail(_Response):
    """OpenAI's error object."""

    message: str = Field(description="What went wrong, starting with the field it concerns.")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The offending field (dotted path), 'body', or null.")
    code: str | None = Field(None, description="'invalid_api_key' on a 401, else null.")


class ErrorResponse(_Response):
    """Every error answer."""

    error: ErrorDetail


_ERRORS = {
    400: "Malformed JSON, not a JSON object, not UTF-8, or nested too deep.",
    401: "Missing or wrong API key (when the deployment has keys).",
    404: "Unknown model, route or video job.",
    405: "Wrong method for the route.",
    409: "The video job is not completed: no content yet.",
    413: "Body larger than max_request_bytes.",
    422: "A field is invalid (param names it).",
    429: "A stage's queue is full (the message names it); retry after Retry-After seconds.",
    500: "Generation failed.",
    503: "A model stage is unavailable or lost a worker mid-request; retry after Retry-After seconds.",
    504: "The request ran past its timeout_s (or the deployment's request_timeout_s); its work was stopped.",
}


def _error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


# ---- response shaping -----------------------------------------------------------------------


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    headers = {**(headers or {}), **({"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {})}
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers or None)


def encode_image(array: np.ndarray, fmt: str, quality: int | None) -> bytes:
    """One uint8 (H, W, 3) image, or (H, W, 4) RGBA (layered output), as PNG, JPEG or WEBP bytes."""
    if fmt == "jpeg" and array.ndim == 3 and array.shape[2] == 4:
        raise RequestError("output_format", "jpeg has no alpha channel; use png or webp for RGBA layers")
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=95 if quality is None else quality)
    return buf.getvalue()


def encode_images(images: np.ndarray, req: ImagesRequest) -> list[ImageData]:
    return [ImageData(b64_json=base64.b64encode(encode_image(a, req.output_format, req.output_compression))
                      .decode("ascii")) for a in images]


def audio_answer(req: AudioRequest, result: GenerationResult) -> AudioAnswer:
    """The answer to ``req`` from a finished result (``result.audio`` set)."""
    audio = result.audio
    if req.response_format != "b64_json":
        body = encode_audio(audio.waveforms[0], audio.sample_rate, req.response_format)
        return AudioAnswer(body, result.request_id, result.seed, AUDIO_MEDIA_TYPES[req.response_format])
    data = [AudioData(b64_json=base64.b64encode(encode_audio(w, audio.sample_rate, "wav")).decode("ascii"))
            for w in audio.waveforms]
    body = AudioResponse(
        created=int(time.time()), data=data, model=result.model, sample_rate=audio.sample_rate,
        channels=int(audio.waveforms.shape[1]), seconds=audio.seconds, seed=result.seed,
        request_id=result.request_id, timings={k: round(v, 6) for k, v in result.timings.items()},
        cache=result.cache,
    )
    return AudioAnswer(body, result.request_id, result.seed)


def images_response(req: ImagesRequest, result: GenerationResult, data: Sequence[ImageData], size: tuple[int, int],
                    steps: int) -> ImagesResponse:
    """The answer to ``req``: ``size`` is (width, height), ``steps`` the denoising steps it ran."""
    return ImagesResponse(
        created=int(time.time()), data=list(data), model=result.model, output_format=req.output_format,
        size=f"{size[0]}x{size[1]}", seed=result.seed, request_id=result.request_id,
        timings={k: round(v, 6) for k, v in result.timings.items()}, cache=result.cache, lora=result.lora,
        conditioning=result.conditioning,
        usage=ImagesUsage(images=len(data), num_inference_steps=steps),
    )


def validation_error(err: Mapping[str, Any], content_type: str | None) -> RequestError:
    """FastAPI's first body error as our ``RequestError``: 400 when the body is no JSON object,
    else 422 naming the field exactly as ``GenerationRequest.parse`` does."""
    loc = tuple(err.get("loc", ()))
    if loc[:1] == ("body",):
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        where = f" at character {loc[0]}" if loc else ""
        return RequestError("body", f"invalid JSON: {err.get('ctx', {}).get('error', err['msg'])}{where}", status=400)
    if not loc:
        if isinstance(err.get("input"), bytes | str) and "json" not in (content_type or ""):
            return RequestError("body", "must be a JSON object sent with content-type: application/json", status=400)
        return RequestError("body", "must be a JSON object", status=400)
    return field_error({**err, "loc": loc})


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes with 413 before anything parses it
    (the declared content-length first, then the bytes as they arrive)."""

    def __init__(self, app: ASGIApp, limit: int, refused: Callable[[int], None]) -> None:
        self.app, self.limit, self.refused = app, limit, refused

    async def _refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        self.refused(413)
        response = error_response(413, f"body: request body of {size} bytes exceeds {self.limit}", "body")
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(declared, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees an empty body and the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(f"at least {size}", scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


@dataclasses.dataclass
class Drain:
    """The HTTP requests a Router replica is answering (``count``); ``draining`` once it shuts down."""

    count: int = 0
    draining: bool = False


class InFlight:
    """ASGI middleware: counts the HTTP requests being answered in ``drain``, and once it is
    ``draining`` (a shutdown) answers new ones with 503 and ``Retry-After`` so that a drain ends."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await error_response(503, "the server is shutting down; retry on another replica")(scope, receive, send)
            return
        self.drain.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.count -= 1


# ---- the app --------------------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("ditserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class HttpBackend(Protocol):
    """What the routes call (the Router implements it)."""

    async def images(self, req: ImagesRequest) -> ImagesResponse:
        """Generate and shape the answer; raises ``RequestError`` and the stages' errors."""

    async def audio(self, req: AudioRequest) -> AudioAnswer:
        """Generate audio and shape the answer; raises as ``images``."""

    def models(self) -> ModelList: ...

    async def create_video(self, req: VideosRequest) -> VideoJob:
        """Create a video job (raises ``RequestError`` naming the field)."""

    async def video(self, video_id: str) -> VideoJob: ...

    async def videos(self, limit: int, after: str | None) -> VideoList: ...

    async def delete_video(self, video_id: str) -> VideoDeleted: ...

    async def video_content(self, video_id: str, variant: str) -> tuple[bytes, str]:
        """The job's content bytes and media type."""

    def failed(self, status: int) -> None:
        """Count a refused or failed generation request (metrics)."""

    def redact(self, text: str) -> str:
        """``text`` without host paths (a model served from a folder is named by the folder's name)."""


def build_http_app(backend: HttpBackend, *, max_request_bytes: int, api_keys: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app of one Router replica; the routes call ``backend``. ``api_keys``: the
    accepted keys' digests (``security.key_digest``); none: every route is open."""
    app = FastAPI(
        title="ditserve", version=_version(), openapi_url=OPENAPI_PATH,
        description="Diffusion transformers on Ray Serve, OpenAI-style. Errors: {'error': {message, type, param, "
        "code}}, param naming the field.",
    )
    # innermost first: JSON checks on the bounded body, the body limit, keys, then the request id
    app.add_middleware(JsonGuard, refused=backend.failed)
    app.add_middleware(BodyLimit, limit=max_request_bytes, refused=backend.failed)
    if api_keys:
        app.add_middleware(ApiKeyAuth, digests=api_keys, refused=backend.failed)
    app.add_middleware(RequestIdGuard)
    app.state.drain = Drain()  # the Router's drain() reads and sets it
    app.add_middleware(InFlight, drain=app.state.drain)
    routes = (f"POST {IMAGES_PATH}", f"POST {EDITS_PATH}", f"POST {AUDIO_PATH}", f"POST {VIDEOS_PATH}",
              f"GET {VIDEOS_PATH}[/{{id}}[/content]]", f"DELETE {VIDEOS_PATH}/{{id}}", f"GET {MODELS_PATH}",
              f"GET {HEALTH_PATH}", f"GET {OPENAPI_PATH}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc.errors()[0], request.headers.get("content-type"))
        backend.failed(err.status)
        return error_response(err.status, str(err), err.field)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(500, "internal error", exc)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            message = f"no route {path}; routes: {', '.join(routes)}"
        elif exc.status_code == 405:
            message = f"{path} takes {(exc.headers or {}).get('Allow', 'another method')}, not {request.method}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.post(IMAGES_PATH, response_model=ImagesResponse, responses=_error_docs(400, 404, 413, 422, 429, 500, 503, 504),
              summary="Generate images from a prompt.")
    async def images(req: ImagesRequest) -> JSONResponse:
        return await _answer(backend, req)

    @app.post(AUDIO_PATH, response_model=AudioResponse, responses={
        200: {"content": {t: {} for t in AUDIO_MEDIA_TYPES.values()},
              "description": "The clip (wav, flac) or JSON with base64 WAV clips (b64_json)."},
        **_error_docs(400, 404, 413, 422, 429, 500, 503, 504)}, summary="Generate audio from a prompt.")
    async def audio(req: AudioRequest) -> Response:
        return await _answer(backend, req, _audio_response)

    @app.post(EDITS_PATH, response_model=ImagesResponse, responses=_error_docs(400, 404, 413, 422, 429, 500, 503, 504),
              summary="Edit input image(s) by a prompt (multipart form as OpenAI's, or JSON with base64 images).",
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"]}},
                  "application/json": {"schema": ImageEditsRequest.model_json_schema()}}}})
    async def edits(request: Request) -> JSONResponse:
        req = await _form_or_json(backend, request, ImageEditsRequest, edits_from_form)
        return req if isinstance(req, Response) else await _answer(backend, req)


    video_errors = _error_docs(400, 404, 409, 413, 422, 429, 500, 503)

    @app.post(VIDEOS_PATH, response_model=VideoJob, responses=video_errors,
              summary="Create a video job (JSON, or a multipart form with the file input_reference as OpenAI's).",
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"]}},
                  "application/json": {"schema": VideosRequest.model_json_schema()}}}})
    async def create_video(request: Request) -> Response:
        req = await _form_or_json(backend, request, VideosRequest, videos_from_form)
        return req if isinstance(req, Response) else await _video_answer(backend, lambda: backend.create_video(req))

    @app.get(VIDEOS_PATH, response_model=VideoList, responses=video_errors, summary="List video jobs, newest first.")
    async def videos(limit: int = Query(20, ge=1, le=100, description="Jobs per page."),
                     after: str | None = Query(None, description="Id of the last job of the previous page.")
                     ) -> Response:
        return await _video_answer(backend, lambda: backend.videos(limit, after))

    @app.get(VIDEOS_PATH + "/{video_id}", response_model=VideoJob, responses=video_errors, summary="A video job.")
    async def video(video_id: str) -> Response:
        return await _video_answer(backend, lambda: backend.video(video_id))

    @app.get(VIDEOS_PATH + "/{video_id}/content", responses=video_errors,
             summary="A completed job's MP4 (variant=video), first-frame PNG (thumbnail) or uint8 frames (.npy).")
    async def video_content(video_id: str, variant: str = Query(
            "video", description="video (MP4, H.264), thumbnail (PNG of the first frame), frames (.npy uint8 "
            "(frames, H, W, 3), exact)")) -> Response:
        return await _video_answer(backend, lambda: backend.video_content(video_id, variant))

    @app.delete(VIDEOS_PATH + "/{video_id}", response_model=VideoDeleted, responses=video_errors,
                summary="Cancel a queued or running job (it reads cancelled), or delete a finished one.")
    async def delete_video(video_id: str) -> Response:
        return await _video_answer(backend, lambda: backend.delete_video(video_id))

    @app.get(MODELS_PATH, response_model=ModelList, summary="List the served models.")
    async def models() -> ModelList:
        return backend.models()

    @app.get(HEALTH_PATH, response_model=Health, summary="Liveness of the Router.")
    async def health() -> Health:
        return Health()

    return app


async def _images_response(backend: HttpBackend, req: ImagesRequest) -> Response:
    resp = await backend.images(req)
    return JSONResponse(resp.model_dump(mode="json"), headers={"x-request-id": resp.request_id})


async def _audio_response(backend: HttpBackend, req: AudioRequest) -> Response:
    answer = await backend.audio(req)
    headers = {"x-request-id": answer.request_id, "x-seed": str(answer.seed)}
    if isinstance(answer.body, bytes):
        return Response(answer.body, media_type=answer.media_type, headers=headers)
    return JSONResponse(answer.body.model_dump(mode="json"), headers=headers)


async def _json_body(request: Request) -> Any:
    """The body as a JSON object (400 naming ``body`` otherwise)."""
    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise RequestError("body", "must be a JSON object", status=400)
    return data


async def _form_or_json(backend: HttpBackend, request: Request, model: type[BaseModel],
                        from_form: Callable[[Request], Awaitable[Any]]) -> Any:
    """A body that may carry files: a multipart form (OpenAI's uploads, read by ``from_form``) or
    JSON, validated into ``model``; a bad one is answered here (a 4xx ``Response``, naming the field)."""
    try:
        if "multipart/form-data" in request.headers.get("content-type", ""):
            return await from_form(request)
        return model.model_validate(await _json_body(request))
    except RequestError as exc:
        backend.failed(exc.status)
        return error_response(exc.status, _redact(backend, f"{exc.field}: {exc.message}"), exc.field)
    except ValidationError as exc:
        err = field_error(exc.errors()[0])
        backend.failed(err.status)
        return error_response(err.status, str(err), err.field)


async def _answer(backend: HttpBackend, req: ImagesRequest | AudioRequest,
                  respond: Callable[[HttpBackend, Any], Awaitable[Response]] = _images_response) -> Response:
    status = 200
    try:
        req.check()
        if req.user:
            logger.info("request for user %s", req.user)
        return await respond(backend, req)
    except RequestError as exc:
        status = exc.status
        # from the fields: a stage's refusal arrives wrapped by Ray, whose str() is a traceback
        return error_response(exc.status, _redact(backend, f"{exc.field}: {exc.message}"), exc.field)
    except StageBusy as exc:
        status = 429
        logger.warning("request %s refused: %s", request_id(), exc)
        return error_response(429, f"{exc.stage}: queue full, retry after {RETRY_AFTER_S} s (request id "
                              f"{request_id()})", kind="rate_limit_error", headers={"x-request-id": request_id()})
    except BackPressureError as exc:
        status = 429
        logger.warning("request %s refused: %s", request_id(), exc)
        return error_response(429, f"server busy, retry later (request id {request_id()})", kind="rate_limit_error",
                              headers={"x-request-id": request_id()})
    except StageUnavailable as exc:
        # a worker died mid-request: the stage rebuilds its group; the detail (rank, pid) is logged
        status = 503
        return internal_error(503, f"{exc.stage} lost a worker and is rebuilding, retry later", exc)
    except (DeploymentUnavailableError, RayActorError) as exc:
        status = 503
        return internal_error(503, "model stage unavailable, retry later", exc)
    except RequestTimeoutError as exc:
        status = 504
        if str(exc).startswith("timeout_s"):
            return error_response(504, "timeout_s: the request ran past its timeout_s and its work was stopped",
                                  "timeout_s", kind="timeout_error")
        return error_response(504, "the request ran past request_timeout_s and was stopped", kind="timeout_error")
    except Exception as exc:  # the replica stays up; the detail goes to the log only
        status = 500
        return internal_error(500, "generation failed", exc)
    finally:
        if status != 200:
            backend.failed(status)



def _redact(backend: HttpBackend, text: str) -> str:
    redact = getattr(backend, "redact", None)  # test backends may not have one
    return redact(text) if redact is not None else text


def internal_error(status: int, what: str, exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    """A 5xx that tells the client what failed and the request id, never the exception's text
    (Ray's carries pids, addresses, actor ids and tracebacks): that goes to the log, with the id."""
    rid = request_id()
    logger.error("request %s: %s", rid, what, exc_info=exc)
    return error_response(status, f"{what} ({type(exc).__name__}); request id {rid}: see the server log",
                          headers={**(headers or {}), **({"x-request-id": rid} if rid else {})} or None)


async def _video_answer(backend: HttpBackend, call: Callable[[], Any]) -> Response:
    """A ``/v1/videos`` route's answer: the model as JSON or content bytes, or an error in OpenAI's
    shape; ``x-ditserve-replica`` names the Router replica that answered."""
    headers = {"x-ditserve-replica": str(getattr(backend, "replica_id", ""))}
    try:
        result = await call()
        if isinstance(result, tuple):
            data, media_type = result
            return Response(data, media_type=media_type, headers=headers)
        return JSONResponse(result.model_dump(mode="json"), headers=headers)
    except RequestError as exc:
        return error_response(exc.status, _redact(backend, f"{exc.field}: {exc.message}"), exc.field, headers=headers)
    except BackPressureError:
        return error_response(429, "server busy, retry later", kind="rate_limit_error", headers=headers)
    except (DeploymentUnavailableError, RayActorError) as exc:
        return internal_error(503, "video job store unavailable", exc, headers)
    except Exception as exc:  # the replica stays up; the client learns what failed
        return internal_error(500, "video request failed", exc, headers)
