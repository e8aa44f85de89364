"""The Router's HTTP layer (``deployments/http.py``) without a cluster: the FastAPI app driven as
plain ASGI with a fake backend. Errors keep OpenAI's shape with ``param`` naming the field, the
body limit answers before parsing, and ``/openapi.json`` documents our models."""

from __future__ import annotations

import asyncio
import json

import pytest

from ditserve.deployments.http import (
    ImagesResponse,
    ImagesUsage,
    ModelCard,
    ModelList,
    build_http_app,
)
from ditserve.deployments.executor import RequestTimeoutError
from ditserve.deployments.schema import GenerationRequest, RequestError

LIMIT = 400


class FakeBackend:
    """Answers every valid request with an empty image list; size '70x48' is refused as the model would."""

    def __init__(self) -> None:
        self.failures: list[int] = []
        self.requests: list = []

    async def images(self, req):
        self.requests.append(req)
        if req.size == "70x48":
            raise RequestError("size", "width 70 is not a multiple of 16")
        if req.prompt == "too slow":
            raise RequestTimeoutError("denoise: no result within the request deadline of 1 s; the ranks were aborted")
        return ImagesResponse(created=1, data=[], model="m", output_format=req.output_format, size="64x48", seed=3,
                              request_id="rid-1", timings={"total": 0.5}, cache=None,
                              usage=ImagesUsage(images=0, num_inference_steps=4))

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id="m", created=1)])

    def failed(self, status: int) -> None:
        self.failures.append(status)


@pytest.fixture
def http():
    backend = FakeBackend()
    app = build_http_app(backend, max_request_bytes=LIMIT)

    def call(method: str, path: str, body: bytes | dict | None = None, *, content_type: str | None = "application/json",
             chunks: list[bytes] | None = None) -> tuple[int, dict, dict]:
        raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        headers = [(b"content-type", content_type.encode())] if content_type else []
        if chunks is None:
            headers.append((b"content-length", str(len(raw)).encode()))
            chunks = [raw]
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(app(scope, receive, send))
        reply = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        return sent[0]["status"], reply, {k.decode(): v.decode() for k, v in sent[0]["headers"]}

    call.backend = backend
    return call


def _error(reply: dict) -> dict:
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    return reply["error"]


def test_answer_carries_the_request_id(http):
    status, reply, headers = http("POST", "/v1/images/generations", {"prompt": "x", "output_format": "webp"})
    assert status == 200 and reply["request_id"] == "rid-1" and headers["x-request-id"] == "rid-1"
    assert reply["output_format"] == "webp" and reply["usage"] == {"images": 0, "num_inference_steps": 4}
    assert isinstance(http.backend.requests[0].generation_request(), GenerationRequest)


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"prompt": ""}, 422, "prompt", "must not be empty"),
        ({"prompt": "x", "n": 11}, 422, "n", "less than or equal to 10"),
        ({"prompt": "x", "lora": {"name": "a", "scale": 9}}, 422, "lora.scale", "less than or equal to 4"),
        ({"prompt": "x", "cache": {"backend": "nope"}}, 422, "cache.backend", ""),
        ({"prompt": "x", "colour": "red"}, 422, "colour", "unknown field"),
        ({"n": 2}, 422, "prompt", "Field required"),
        ({"prompt": "x", "response_format": "url"}, 422, "response_format", "b64_json"),
        ({"prompt": "x", "output_compression": 50}, 422, "output_compression", "jpeg and webp only"),
        ({"prompt": "x", "size": "70x48"}, 422, "size", "width 70 is not a multiple of 16"),
        (b"{not json", 400, "body", "invalid JSON"),
        (b"[1, 2]", 400, "body", "must be a JSON object"),
        (b"", 400, "body", "must be a JSON object"),
    ],
)
def test_validation_errors_name_the_field(http, body, status, param, message):
    code, reply, _ = http("POST", "/v1/images/generations", body)
    error = _error(reply)
    assert code == status and error["param"] == param and message in error["message"], reply
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{param}: ")
    assert http.backend.failures == [status]


def test_fields_are_named_as_the_python_api_names_them(http):
    body = {"prompt": "x", "lora": {"name": "a", "scale": -9}}
    with pytest.raises(RequestError) as info:
        GenerationRequest.parse(body)
    _, reply, _ = http("POST", "/v1/images/generations", body)
    assert _error(reply)["param"] == info.value.field == "lora.scale"
    assert _error(reply)["message"] == str(info.value)


def test_body_without_json_content_type_is_refused_with_the_fix(http):
    code, reply, _ = http("POST", "/v1/images/generations", {"prompt": "x"}, content_type=None)
    assert code == 400 and "content-type: application/json" in _error(reply)["message"]


def test_body_over_the_limit_is_refused_before_parsing(http):
    code, reply, _ = http("POST", "/v1/images/generations", {"prompt": "x" * LIMIT})
    assert code == 413 and _error(reply)["param"] == "body" and "exceeds 400" in _error(reply)["message"]
    # no content-length: counted as the chunks arrive
    code, reply, _ = http("POST", "/v1/images/generations", chunks=[b'{"prompt": "', b"x" * 300, b"x" * 300, b'"}'])
    assert code == 413 and "exceeds 400" in _error(reply)["message"]
    assert http.backend.requests == [] and http.backend.failures == [413, 413]


def test_unknown_route_and_wrong_method_keep_openai_shape(http):
    code, reply, _ = http("GET", "/v1/nothing")
    assert code == 404 and "no route /v1/nothing" in _error(reply)["message"]
    code, reply, headers = http("GET", "/v1/images/generations")
    assert code == 405 and headers["allow"] == "POST" and "takes POST" in _error(reply)["message"]
    code, reply, _ = http("POST", "/health")
    assert code == 405 and _error(reply)["type"] == "invalid_request_error"


def test_models_and_health(http):
    assert http("GET", "/health")[1] == {"status": "ok"}
    status, models, _ = http("GET", "/v1/models")
    assert status == 200 and models == {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 1, "owned_by": "ditserve", "root": None, "parent": None}]}


def test_openapi_documents_routes_with_our_models(http):
    status, spec, _ = http("GET", "/openapi.json")
    assert status == 200
    assert set(spec["paths"]) == {"/v1/images/generations", "/v1/images/edits", "/v1/audio/generations", "/v1/models",
                                  "/health", "/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content"}
    audio = spec["paths"]["/v1/audio/generations"]["post"]
    assert audio["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/AudioRequest"
    assert {"audio/wav", "audio/flac", "application/json"} <= set(audio["responses"]["200"]["content"])
    assert set(spec["paths"]["/v1/videos/{video_id}"]) == {"get", "delete"}
    assert spec["paths"]["/v1/videos"]["post"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"] == "#/components/schemas/VideoJob"
    post = spec["paths"]["/v1/images/generations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ImagesRequest"
    schemas = spec["components"]["schemas"]
    assert set(schemas["ImagesRequest"]["properties"]) == set(GenerationRequest.model_fields) | {
        "response_format", "output_format", "output_compression", "user"}
    assert set(schemas["ImagesResponse"]["properties"]) == {
        "created", "data", "model", "output_format", "size", "seed", "request_id", "timings", "cache", "lora",
        "conditioning", "usage"}
    edits = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(edits)
    for code in ("400", "413", "422", "429", "503"):  # our error shape, not FastAPI's HTTPValidationError
        assert post["responses"][code]["content"]["application/json"]["schema"]["$ref"] == \
            "#/components/schemas/ErrorResponse"


def test_request_past_its_deadline_is_a_504_in_openai_shape(http):
    status, body, _ = http("POST", "/v1/images/generations", {"prompt": "too slow"})
    assert status == 504
    assert body["error"]["type"] == "timeout_error" and "request_timeout_s" in body["error"]["message"]
