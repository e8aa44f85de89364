"""Open-loop load test: requests arrive at a fixed rate whatever the server does (an asyncio client,
aiohttp, which Ray already installs), for a bounded time, and every one must get exactly one answer.

    python benchmarks/load.py --url http://HOST:8000 [--rate 20] [--duration 30] [--body JSON]
        [--api-key KEY] [--path /v1/images/generations]
    python benchmarks/load.py --tiny [--rate 20] [--duration 10]   # starts a tiny app on a local Ray

Prints one JSON object: requests sent, answered, by class (200 / 4xx / 5xx, and per status), lost
(no HTTP answer: a connection error or the client timeout; must be 0), invalid (a 200 without a
decodable image, or an error that is not OpenAI-shaped JSON; must be 0), p50/p95/p99 latency of the
answered requests, and the baseline measured in the same run: one request alone before the load
(``single_request_s``, so ``rate x single_request_s`` says how far above capacity the run was) and
one after it (``after_status``: the server answers normally afterwards).

Open loop on purpose: a closed-loop client (N workers, each waiting for its answer) slows down with
the server and never overloads it; real clients do not wait for each other. ``run_load`` is the
core, reused by the throughput benchmarks (batching) and by the served reliability test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import time
from collections import Counter
from typing import Any

import aiohttp

IMAGES_PATH = "/v1/images/generations"
DEFAULT_BODY = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "seed": 0}


def _valid(status: int, data: bytes) -> bool:
    """A 200 holds at least one decodable image (or audio bytes); an error is OpenAI-shaped JSON."""
    try:
        if status != 200:
            return "message" in json.loads(data)["error"]
        try:
            answer = json.loads(data)
        except ValueError:
            return len(data) > 0  # a binary answer (audio formats)
        from PIL import Image

        for item in answer["data"]:
            Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).verify()
        return len(answer["data"]) > 0
    except Exception:  # noqa: BLE001 - anything else is invalid
        return False


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


async def _load(url: str, rate: float, duration_s: float, body: dict[str, Any], headers: dict[str, str],
                timeout_s: float) -> dict[str, Any]:
    results: list[tuple[int | None, float, bool]] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue in the client

    async def one(session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                data = await resp.read()
                results.append((resp.status, time.perf_counter() - start, _valid(resp.status, data)))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            results.append((None, time.perf_counter() - start, False))

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        start = time.perf_counter()
        n = max(1, int(rate * duration_s))
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(session)))
        send_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - start
    statuses = Counter(status for status, _, _ in results if status is not None)
    answered = [latency for status, latency, _ in results if status is not None]
    return {
        "rate": rate, "duration_s": duration_s, "send_s": round(send_s, 3), "wall_s": round(wall_s, 3),
        "sent": len(tasks), "answered": len(answered),
        "200": statuses.get(200, 0),
        "4xx": sum(c for s, c in statuses.items() if 400 <= s < 500),
        "5xx": sum(c for s, c in statuses.items() if s >= 500),
        "lost": sum(1 for status, _, _ in results if status is None),
        "invalid": sum(1 for status, _, ok in results if status is not None and not ok),
        "statuses": {str(s): c for s, c in sorted(statuses.items())},
        "p50_s": _percentile(answered, 0.50), "p95_s": _percentile(answered, 0.95),
        "p99_s": _percentile(answered, 0.99),
        "mean_s": round(statistics.fmean(answered), 4) if answered else None,
    }


def run_load(url: str, rate: float, duration_s: float, body: dict[str, Any] | None = None, *,
             path: str = IMAGES_PATH, api_key: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Send ``rate`` requests per second for ``duration_s`` seconds to ``url + path`` (open loop),
    then one more alone; returns the report described in the module docstring.

    Args:
        url: the server's base URL (``http://host:8000``).
        body: the JSON body of every request (default: a 64x64, 2-step image).
        api_key: sent as ``Authorization: Bearer`` when the deployment has keys.
        timeout_s: the client's limit per request; a request past it counts as lost.
    """
    target = url.rstrip("/") + path
    body = dict(DEFAULT_BODY if body is None else body)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    async def main() -> dict[str, Any]:
        single = await _load(target, 1.0, 1.0, body, headers, timeout_s)  # the baseline, alone
        report = await _load(target, rate, duration_s, body, headers, timeout_s)
        after = await _load(target, 1.0, 1.0, body, headers, timeout_s)
        report["single_request_s"] = single["p50_s"]
        report["after_status"] = int(next(iter(after["statuses"]))) if after["statuses"] else None
        return report

    return asyncio.run(main())


def _start_tiny() -> str:
    """A local Ray with Serve on a free port and the tiny Qwen-Image app; returns its URL."""
    import socket
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from ditserve.deployments.app import build_app
    from ditserve.deployments.config import AppConfig
    from ditserve.models.tiny import make_tiny

    model = make_tiny("qwen-image", os.path.join(tempfile.mkdtemp(), "qwen"))
    ray.init(num_cpus=4, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = AppConfig.model_validate({"engine": {"model": str(model), "device": "cpu"}, "accelerator": "cpu",
                                    "dit": {"max_queued_requests": 4}})
    serve.run(build_app(cfg), name="load", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="server base URL (or --tiny)")
    parser.add_argument("--tiny", action="store_true", help="start a tiny app on a local Ray and load it")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    parser.add_argument("--body", type=json.loads, default=None, help="JSON body of every request")
    parser.add_argument("--path", default=IMAGES_PATH)
    parser.add_argument("--api-key", default=os.environ.get("DITSERVE_API_KEY"))
    parser.add_argument("--timeout", type=float, default=120.0, help="client limit per request (then: lost)")
    args = parser.parse_args()
    if not args.url and not args.tiny:
        parser.error("give --url or --tiny")
    url = _start_tiny() if args.tiny else args.url
    report = run_load(url, args.rate, args.duration, args.body, path=args.path, api_key=args.api_key,
                      timeout_s=args.timeout)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
