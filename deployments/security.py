"""What guards the Router's HTTP app before a route runs: API keys, hostile JSON bodies and
client request ids.

Three ASGI middlewares, so that every route (a route added later included) is covered without
touching it:

- ``ApiKeyAuth``: ``Authorization: Bearer <key>`` against the configured keys (``AppConfig.api_key``,
  ``AppConfig.api_key_file``), compared in constant time over SHA-256 digests; 401 in OpenAI's error
  shape with ``WWW-Authenticate: Bearer`` otherwise. ``/health`` stays open. No key configured: no
  check (the handle API inside the cluster is never behind it).
- ``JsonGuard``: a JSON body must be UTF-8 (UTF-16/32, which ``json.loads`` on bytes guesses, are
  refused) and nested at most ``MAX_JSON_DEPTH`` levels (the C parser's recursion would otherwise
  end in ``RecursionError``); 400 naming ``body``. ``parse_json`` is the same check plus parsing, for
  the routes that parse JSON themselves (the edits route, multipart JSON fields).
- ``RequestIdGuard``: the client's ``x-request-id`` reaches our logs and answers only when it is
  short and of a safe character set (``sanitize_request_id``); otherwise a fresh id replaces it.

Keys are kept as ``sha256:<hex>`` digests from the moment the config is validated (``key_digest``),
so reprs, logs and the Serve config file never hold a key in clear. FastAPI's ``HTTPBearer``
dependency would need adding to each route; a middleware cannot be forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schema import RequestError

if TYPE_CHECKING:
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Ray and Starlette are imported where a middleware runs: AppConfig reads the key helpers, and
# importing the engine's configs does not import Ray.

logger = logging.getLogger("ray.serve")

DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
OPEN_PATHS = frozenset({"/health"})
MAX_JSON_DEPTH = 64
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]+$")
# a JSON string (skipped whole) or one bracket
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


# ---- API keys ---------------------------------------------------------------------------------


def key_digest(key: str) -> str:
    """``key`` as stored: ``sha256:<hex>`` (a value already of that form is kept, so a config
    round-trips and a Serve config file may carry digests instead of keys)."""
    key = key.strip()
    if _DIGEST_RE.match(key):
        return key
    return DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_keys(value: Any) -> tuple[str, ...]:
    """``--api-key`` values (a string, comma-separated, or a list of such) as key digests."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    keys: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("api keys must be strings")
        keys += [key_digest(k) for k in item.split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def read_key_file(path: str) -> tuple[str, ...]:
    """The key digests of a file of keys, one a line (blank lines and ``#`` comments skipped).

    Raises:
        ValueError: the file cannot be read, or holds no key (naming ``api_key_file``).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"api_key_file={path!r} cannot be read ({type(exc).__name__}); give a UTF-8 file with "
                         "one key per line") from None
    keys = split_keys([line for line in lines if line.strip() and not line.lstrip().startswith("#")])
    if not keys:
        raise ValueError(f"api_key_file={path!r} holds no key; give one key per line")
    return keys


def api_key_digests(api_key: Iterable[str], api_key_file: str | None) -> frozenset[str]:
    """Every accepted key's digest: the configured ones and the file's (read now)."""
    return frozenset(api_key) | (frozenset(read_key_file(api_key_file)) if api_key_file else frozenset())


def _error(status: int, message: str, param: str | None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    from starlette.responses import JSONResponse

    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiKeyAuth:
    """ASGI middleware: every HTTP request but ``OPEN_PATHS`` needs ``Authorization: Bearer <key>``
    with a configured key (``digests``: ``key_digest`` of each); 401 otherwise."""

    def __init__(self, app: ASGIApp, digests: Iterable[str], refused: Callable[[int], None]) -> None:
        self.app, self.refused = app, refused
        self.digests = [d.encode("ascii") for d in digests]

    def allowed(self, authorization: bytes | None) -> bool:
        scheme, _, token = (authorization or b"").decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = key_digest_of_token(token.strip()).encode("ascii")
        # every digest is compared (no early exit), each in constant time
        return any([hmac.compare_digest(presented, d) for d in self.digests])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.allowed(dict(scope.get("headers") or ()).get(b"authorization")):
            await self.app(scope, receive, send)
            return
        self.refused(401)
        response = _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                          "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def key_digest_of_token(token: str) -> str:
    """The digest of a presented bearer token (always hashed: a client sending a digest as its
    token does not match)."""
    return DIGEST_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


# ---- hostile JSON bodies ------------------------------------------------------------------------


def check_json(raw: bytes, field: str = "body") -> str:
    """``raw`` as text when it may be parsed as JSON: UTF-8 (a leading BOM dropped), no NUL byte,
    at most ``MAX_JSON_DEPTH`` levels of nesting.

    Raises:
        RequestError: 400 naming ``field``.
    """
    if b"\x00" in raw:
        raise RequestError(field, f"NUL byte at offset {raw.index(0)}: JSON must be UTF-8 (UTF-16 and UTF-32 are "
                           "not accepted)", status=400)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(field, f"not UTF-8 (byte {exc.start}): JSON must be UTF-8", status=400) from None
    depth = 0
    for token in _JSON_TOKENS.finditer(raw):
        ch = token.group()
        if ch in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise RequestError(field, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", status=400)
        elif ch in (b"]", b"}"):
            depth -= 1
    return text.removeprefix("\ufeff")


def parse_json(raw: bytes | str, field: str = "body") -> Any:
    """``raw`` parsed as JSON after ``check_json`` (400 naming ``field`` when it is not JSON)."""
    text = check_json(raw.encode("utf-8") if isinstance(raw, str) else raw, field)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(field, f"invalid JSON: {exc}", status=400) from None


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app ``body`` (read already by a middleware) as one message,
    then defers to the real ``receive`` (disconnects)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class JsonGuard:
    """ASGI middleware: a request body sent as JSON (any body but a multipart form) passes
    ``check_json`` before a route parses it; 400 naming ``body`` otherwise. Sits inside the body
    limit, so the body it reads is bounded."""

    def __init__(self, app: ASGIApp, refused: Callable[[int], None]) -> None:
        self.app, self.refused = app, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = dict(scope.get("headers") or ()).get(b"content-type", b"").lower()
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH") or (
                content_type.startswith((b"multipart/", b"application/x-www-form-urlencoded"))):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            check_json(body)
        except RequestError as exc:
            self.refused(exc.status)
            await _error(exc.status, str(exc), exc.field)(scope, receive, send)
            return
        await self.app(scope, replay_body(body, receive), send)


# ---- request ids --------------------------------------------------------------------------------


def sanitize_request_id(value: str | None) -> str:
    """``value`` when it is 1..``MAX_REQUEST_ID_CHARS`` characters of ``[A-Za-z0-9._:-]``; otherwise
    a fresh id (32 hex digits), so that what a client sends never reaches a log unchecked."""
    if value and len(value) <= MAX_REQUEST_ID_CHARS and _REQUEST_ID_RE.match(value):
        return value
    return uuid.uuid4().hex


class RequestIdGuard:
    """ASGI middleware: the request's id (Serve's, taken from the client's ``x-request-id``) is
    replaced by ``sanitize_request_id``'s, in the header the routes see and in Serve's request
    context (which our log lines and answers read)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from ray.serve import context as serve_context
        from starlette.datastructures import MutableHeaders

        headers = MutableHeaders(scope=scope)
        current = serve_context._get_serve_request_context()
        given = current.request_id or headers.get("x-request-id")
        clean = sanitize_request_id(given)
        if clean != given and given:
            logger.warning("request id replaced by %s: the client's was not 1..%d characters of [A-Za-z0-9._:-]",
                           clean, MAX_REQUEST_ID_CHARS)
        headers["x-request-id"] = clean
        serve_context._set_request_context(request_id=clean)
        await self.app(scope, receive, send)


def request_id() -> str:
    """The current request's (sanitized) id, '' outside a request."""
    from ray.serve import context as serve_context

    return serve_context._get_serve_request_context().request_id


# ---- host paths out of error bodies ----------------------------------------------------------------


def host_paths(model_id: str, lora_dir: str | None) -> list[tuple[str, str]]:
    """(path, public name) pairs to take out of error bodies, longest path first: a model served
    from a folder has its path as id (named by the folder's name), ``lora_dir`` by the option's name."""
    pairs = {}
    if model_id.startswith(("/", "~", "./", "../")) or "\\" in model_id:
        pairs[model_id] = Path(model_id.rstrip("/\\")).name or "model"
    if lora_dir:
        pairs[str(lora_dir)] = "lora_dir"
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def redact_paths(text: str, pairs: Iterable[tuple[str, str]]) -> str:
    """``text`` with each path of ``pairs`` replaced by its public name."""
    for path, name in pairs:
        text = text.replace(path, name)
    return text
