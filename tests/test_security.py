"""The Router's HTTP guards (``deployments/security.py``) without a cluster, as ``test_http.py``
drives the app: API keys on every route but ``/health``, hostile bodies refused with 4xx naming the
field, 5xx bodies free of internals, request ids sanitized, and the shutdown handler of
``ditserve run``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import signal

import pytest
from PIL import Image
from ray.exceptions import RayActorError

from ditserve.deployments import AppConfig
from ditserve.deployments.http import ImagesResponse, ImagesUsage, ModelCard, ModelList, build_http_app
from ditserve.deployments.security import (
    MAX_JSON_DEPTH,
    api_key_digests,
    key_digest,
    parse_json,
    read_key_file,
    request_id,
    sanitize_request_id,
)
from ditserve.deployments.schema import GenerationRequest, RequestError

KEYS = ("key-one", "key-two")
LEAK = "worker pid=4242 at 10.1.2.3:6379 actor_id=ab12cd34ef ObjectRef /home/ray/session_latest/logs"


class FakeBackend:
    """Answers with an empty image list carrying the request's id; a prompt picks a failure."""

    def __init__(self) -> None:
        self.failures: list[int] = []

    async def images(self, req):
        if req.prompt == "crash":
            raise RuntimeError(LEAK)
        if req.prompt == "actor died":
            raise RayActorError()
        return ImagesResponse(created=1, data=[], model="m", output_format="png", size="64x64", seed=3,
                              request_id=request_id(), timings={"total": 0.5}, cache=None,
                              usage=ImagesUsage(images=0, num_inference_steps=2))

    async def audio(self, req):
        raise RuntimeError(LEAK)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id="m", created=1)])

    def failed(self, status: int) -> None:
        self.failures.append(status)


def _client(api_keys=(), backend=None):
    backend = backend or FakeBackend()
    app = build_http_app(backend, max_request_bytes=200_000, api_keys=[key_digest(k) for k in api_keys])

    def call(method: str, path: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
             content_type: str = "application/json") -> tuple[int, dict, dict]:
        raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        hdrs = [(b"content-type", content_type.encode()), (b"content-length", str(len(raw)).encode())]
        hdrs += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": hdrs,
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}
        messages = [{"type": "http.request", "body": raw, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        try:
            asyncio.run(app(scope, receive, send))
        except Exception:  # Starlette re-raises after its 500 handler answered (for the server's log)
            if not sent:
                raise
        text = b"".join(m.get("body", b"") for m in sent[1:])
        reply = json.loads(text) if text.startswith(b"{") else {"raw": text}
        return sent[0]["status"], reply, {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}

    call.app, call.backend = app, backend
    return call


def _error(reply: dict) -> dict:
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    return reply["error"]


def _routes(app) -> list[tuple[str, str]]:
    return sorted({(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"})


# ---- API keys -------------------------------------------------------------------------------------


def test_every_route_but_health_needs_a_key():
    call = _client(KEYS)
    # a route added after the app was built is covered too (the check is a middleware)
    call.app.add_api_route("/v1/later", lambda: {"ok": True}, methods=["GET"])
    routes = _routes(call.app)
    assert ("POST", "/v1/images/generations") in routes and ("GET", "/v1/later") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                        {"Authorization": f"Bearer {key_digest('key-one')}"}):
            status, reply, resp_headers = call(method, path, {"prompt": "x"}, headers)
            if path == "/health":
                assert status == 200, (method, path, headers)
                continue
            assert status == 401, (method, path, headers, status)
            assert resp_headers["www-authenticate"] == "Bearer"
            assert _error(reply)["code"] == "invalid_api_key" and "Bearer" in _error(reply)["message"]
    assert set(call.backend.failures) == {401}


def test_right_key_passes_and_no_key_configured_leaves_routes_open():
    call = _client(KEYS)
    for key in KEYS:
        status, reply, _ = call("POST", "/v1/images/generations", {"prompt": "x"}, {"Authorization": f"Bearer {key}"})
        assert status == 200, reply
        assert call("GET", "/v1/models", headers={"authorization": f"bearer {key}"})[0] == 200
    open_call = _client()
    assert open_call("POST", "/v1/images/generations", {"prompt": "x"})[0] == 200
    assert open_call("GET", "/openapi.json")[0] == 200


def test_keys_are_stored_as_digests_from_flags_and_files(tmp_path):
    from ditserve.cluster import cli
    from ditserve.cluster.serve_config import serve_config_yaml

    args = cli.build_parser().parse_args(["config", "--api-key", "alpha-secret", "--api-key", "beta-secret, gamma-secret"])
    cfg = cli._app_config(args)
    assert cfg.api_key == tuple(key_digest(k) for k in ("alpha-secret", "beta-secret", "gamma-secret"))
    dumped = serve_config_yaml(cfg) + repr(cfg) + str(cfg)
    assert "secret" not in dumped and key_digest("alpha-secret") in dumped
    assert AppConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # digests round-trip
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    assert read_key_file(str(keys)) == (key_digest("file-key-1"), key_digest("file-key-2"))
    both = api_key_digests(cfg.api_key, str(keys))
    assert len(both) == 5
    with pytest.raises(ValueError, match="api_key_file=.*cannot be read"):
        read_key_file(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="api_key_file=.*holds no key"):
        read_key_file(str(tmp_path / "empty"))


# ---- hostile bodies -------------------------------------------------------------------------------


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


DEEP = b'{"prompt": "x", "cache": ' + b"[" * 5000 + b"]" * 5000 + b"}"
UTF16 = json.dumps({"prompt": "x"}).encode("utf-16")  # with a BOM
UTF16LE = json.dumps({"prompt": "x"}).encode("utf-16-le")  # without: json.loads(bytes) would guess it


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/audio/generations", "/v1/images/edits"])
@pytest.mark.parametrize(("body", "message"), [(DEEP, f"deeper than {MAX_JSON_DEPTH}"), (UTF16, "UTF-8"),
                                               (UTF16LE, "UTF-8")], ids=["deep", "utf16", "utf16le"])
def test_hostile_json_bodies_get_400_naming_body(path, body, message):
    call = _client()
    status, reply, _ = call("POST", path, body)
    assert status == 400 and _error(reply)["param"] == "body" and message in _error(reply)["message"], reply


def test_the_guarded_parser_also_reads_edits_json_and_form_fields():
    call = _client()
    deep_form = (b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
                 b'--B\r\nContent-Disposition: form-data; name="lora"\r\n\r\n' + b"[" * 5000 + b"]" * 5000 + b"\r\n"
                 b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n" + base64.b64decode(_png()) + b"\r\n--B--\r\n")
    status, reply, _ = call("POST", "/v1/images/edits", deep_form, content_type="multipart/form-data; boundary=B")
    assert status == 400 and _error(reply)["param"] == "lora", reply
    with pytest.raises(RequestError, match="deeper than"):
        parse_json("[" * 2000 + "]" * 2000)
    assert parse_json('{"a": [[1]]}') == {"a": [[1]]} and parse_json('"[{not a bracket"') == "[{not a bracket"


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": "a\x00b"}, "prompt", "U+0000"),
    ({"prompt": "\x1b[31mred"}, "prompt", "U+001B"),
    ({"prompt": "x", "negative_prompt": "\x07"}, "negative_prompt", "U+0007"),
    ({"prompt": "x", "size": "٦٤x64"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "64x６４"}, "size", "WIDTHxHEIGHT"),
])
def test_control_characters_and_foreign_digits_get_422_naming_the_field(body, param, message):
    call = _client()
    status, reply, _ = call("POST", "/v1/images/generations", body)
    assert status == 422 and _error(reply)["param"] == param and message in _error(reply)["message"], reply


def test_tabs_and_newlines_stay_accepted_in_prompts():
    assert GenerationRequest.parse({"prompt": "line one\n\tline two\r\n", "size": " 64x32 "}).size == "64x32"


# ---- error bodies and request ids -----------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(("path", "prompt", "status"), [("/v1/images/generations", "crash", 500),
                                                        ("/v1/audio/generations", "x", 500),
                                                        ("/v1/images/generations", "actor died", 503)])
def test_server_errors_carry_the_request_id_not_the_internals(path, prompt, status):
    call = _client()
    records = _Records()
    logging.getLogger("ray.serve").addHandler(records)
    try:
        code, reply, headers = call("POST", path, {"prompt": prompt}, {"x-request-id": "client-req-7"})
    finally:
        logging.getLogger("ray.serve").removeHandler(records)
    message = _error(reply)["message"]
    assert code == status and "request id client-req-7" in message and headers["x-request-id"] == "client-req-7"
    assert not re.search(r"pid|10\.1\.2\.3|actor_id|/home|Traceback|ObjectRef", message), message
    assert _error(reply)["type"] == "server_error"
    logged = [r for r in records.records if "client-req-7" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the detail went to the log, with the id
    if status == 500:
        assert LEAK in str(logged[0].exc_info[1])


@pytest.mark.parametrize("given", ["a b", "x" * 129, "id\x7f", "ид-1", "<script>", ""])
def test_unsafe_request_ids_are_replaced_before_logs_and_answers(given):
    call = _client()
    headers = {"x-request-id": given} if given.isascii() else {}
    status, reply, resp_headers = call("POST", "/v1/images/generations", {"prompt": "x"}, headers)
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", reply["request_id"]), reply
    assert resp_headers["x-request-id"] == reply["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", sanitize_request_id(given))


def test_safe_request_ids_are_kept():
    call = _client()
    for given in ("my-req-1", "trace:01HZX.4_a", "x" * 128):
        status, reply, _ = call("POST", "/v1/images/generations", {"prompt": "x"}, {"x-request-id": given})
        assert status == 200 and reply["request_id"] == given


# ---- SIGTERM / SIGINT drain of `ditserve run` -----------------------------------------------------


def test_a_draining_router_refuses_new_requests_with_503_and_counts_in_flight():
    call = _client()
    seen: list[int] = []
    images = call.backend.images

    async def counting(req):
        seen.append(call.app.state.drain.count)
        return await images(req)

    call.backend.images = counting
    assert call("POST", "/v1/images/generations", {"prompt": "x"})[0] == 200
    assert seen == [1] and call.app.state.drain.count == 0
    call.app.state.drain.draining = True
    for method, path in (("GET", "/health"), ("POST", "/v1/images/generations")):
        status, reply, headers = call(method, path, {"prompt": "x"})
        assert status == 503 and headers["retry-after"] == "1" and "shutting down" in _error(reply)["message"]


def test_shutdown_waits_for_in_flight_requests_then_stops_serve():
    from ditserve.cluster.server import shutdown_gracefully

    left, stopped = [2, 1, 0], []
    assert shutdown_gracefully(5.0, lambda: left.pop(0), poll_s=0, shutdown=lambda: stopped.append(1))
    assert left == [] and stopped == [1]
    # the grace period ends first: Serve is shut down anyway
    assert not shutdown_gracefully(0.05, lambda: 1, poll_s=0.01, shutdown=lambda: stopped.append(2))

    def dead() -> int:
        raise RayActorError()

    assert not shutdown_gracefully(5.0, dead, shutdown=lambda: stopped.append(3))
    assert stopped == [1, 2, 3]


def test_sigterm_and_sigint_set_the_stop_event_and_a_second_signal_forces():
    import os
    import threading

    from ditserve.cluster.server import install_stop_handlers, shutdown_gracefully

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for first, second in ((signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)):
            stop = threading.Event()
            install_stop_handlers(stop)
            os.kill(os.getpid(), first)
            assert stop.wait(5) and not getattr(stop, "force", False)
            os.kill(os.getpid(), second)
            assert getattr(stop, "force", False)
            # a forced stop ends the drain at once, however long the grace period
            assert not shutdown_gracefully(3600, lambda: 1, stop=stop, shutdown=lambda: None)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_generate_client_sends_the_key_as_bearer(monkeypatch):
    from ditserve.cluster import client

    sent = []

    class _Reply(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(request, timeout):
        sent.append(request)
        return _Reply(json.dumps({"data": [], "seed": 1}).encode())

    monkeypatch.setattr(client.urllib.request, "urlopen", urlopen)
    client.generate_images("http://h:1", {"prompt": "x"}, api_key="key-one")
    client.generate_images("http://h:1", {"prompt": "x"})
    assert sent[0].get_header("Authorization") == "Bearer key-one" and sent[1].get_header("Authorization") is None


# ---- schema-based fuzz of the routes (hypothesis, bounded) ------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ditserve.deployments.http import AudioAnswer, AudioRequest, ImageEditsRequest, ImagesRequest  # noqa: E402


class FuzzBackend(FakeBackend):
    """Turns each valid request into the engine's request (as the Router does) and answers 200."""

    async def images(self, req):
        req.generation_request()
        self.answered = getattr(self, "answered", 0) + 1
        return ImagesResponse(created=1, data=[], model="m", output_format="png", size="64x64", seed=3,
                              request_id=request_id(), timings={}, cache=None,
                              usage=ImagesUsage(images=0, num_inference_steps=2))

    async def audio(self, req):
        req.generation_request()
        self.answered = getattr(self, "answered", 0) + 1
        return AudioAnswer(b"RIFF", request_id(), 1, "audio/wav")


_LEAF = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
_JSON = st.recursive(_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=8)
_SPECIFIC = {
    "prompt": st.text(max_size=40),
    "negative_prompt": st.text(max_size=10),
    "size": st.from_regex(r"\A[0-9٠-٩６]{1,5}[xX* ][0-9]{1,5}\Z") | st.text(max_size=8),
    "n": st.integers(-2, 12),
    "num_inference_steps": st.integers(-1, 300),
    "seed": st.integers(-1, 2**64),
    "output_format": st.sampled_from(["png", "jpeg", "webp", "gif"]),
    "response_format": st.sampled_from(["b64_json", "url", "wav", "flac"]),
    "lora": st.fixed_dictionaries({"name": st.text(max_size=6)}, optional={"scale": st.floats(-10, 10)}),
    "cache": st.fixed_dictionaries({}, optional={"backend": st.sampled_from(["tea_cache", "cache_dit", "none", "x"]),
                                                 "config": _JSON}),
    "image": st.sampled_from([_png(), "data:image/png;base64," + _png(), "!!", ""]) | st.lists(st.just(_png()), max_size=2),
}
_ROUTES = {"/v1/images/generations": ImagesRequest, "/v1/audio/generations": AudioRequest,
           "/v1/images/edits": ImageEditsRequest}


def _bodies(model) -> st.SearchStrategy[dict]:
    """Wild bodies (any field any JSON) and near-valid ones (a plain prompt, the field strategies)."""
    wild = {name: (_SPECIFIC[name] | _JSON) if name in _SPECIFIC else _JSON
            for name in model.model_fields if name != "prompt"}
    wild["unknown_field"] = _JSON
    near = {name: _SPECIFIC[name] for name in model.model_fields if name in _SPECIFIC and name != "prompt"}
    required = {"prompt": st.text("abc xyz", min_size=1, max_size=10).filter(str.strip)}
    if "image" in model.model_fields:
        required["image"] = st.just(_png())
        near.pop("image")
    return (st.fixed_dictionaries({"prompt": _SPECIFIC["prompt"] | _JSON}, optional=wild)
            | st.fixed_dictionaries(required, optional=near))


@pytest.mark.parametrize("path", list(_ROUTES))
def test_fuzzed_bodies_never_get_a_500(path):
    fuzz = _client(backend=FuzzBackend())

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=_bodies(_ROUTES[path]) | st.binary(max_size=64))
    def check(body):
        status, reply, _ = fuzz("POST", path, body)
        assert status < 500, (body, status, reply)
        if status != 200:
            assert _error(reply)["message"]

    check()
    assert fuzz.backend.answered > 0  # some bodies were valid: the fuzz reached the backend


def test_an_unexpected_error_outside_generation_is_a_clean_500():
    call = _client()

    def broken() -> ModelList:
        raise OSError(LEAK)

    call.backend.models = broken
    status, reply, headers = call("GET", "/v1/models", headers={"x-request-id": "req-9"})
    message = _error(reply)["message"]
    assert status == 500 and "OSError" in message and "req-9" in message and "10.1.2.3" not in message
