"""A small HTTP client for a running ditserve server (``ditserve generate --server URL``)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request


class ServerError(RuntimeError):
    """The server answered with an error (its OpenAI-style message) or could not be reached."""


def generate_images(server: str, body: dict, *, output_format: str = "png", timeout_s: float = 600.0,
                    api_key: str | None = None) -> tuple[list[bytes], dict]:
    """POST /v1/images/generations (``api_key``: sent as ``Authorization: Bearer``); returns the
    encoded images and the rest of the reply."""
    url = server.rstrip("/") + "/v1/images/generations"
    data = json.dumps({**body, "output_format": output_format, "response_format": "b64_json"}).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:
            message = exc.reason
        raise ServerError(f"{exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise ServerError(f"cannot reach {url}: {exc.reason}") from None
    images = [base64.b64decode(item["b64_json"]) for item in reply.pop("data")]
    return images, reply
