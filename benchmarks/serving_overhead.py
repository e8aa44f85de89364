"""Serving overhead: N requests through the HTTP server vs the in-process reference runner vs a
plain diffusers pipeline, same checkpoint, steps, size and seeds.

    python benchmarks/serving_overhead.py [--model DIR] [--family qwen-image] [--requests 20]
        [--steps 8] [--size 128] [--concurrency 1]

Prints one JSON object: seconds per request for each path and the ratios to the baselines. With
the tiny checkpoints the model takes milliseconds, so the ratio is the cost of the served graph
(validation, three deployments, object-store hand-offs, PNG + base64) in its purest form.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import tempfile
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from ray import serve  # noqa: E402

from ditserve.deployments import Engine, EngineConfig, GenerationRequest  # noqa: E402
from ditserve.deployments.app import build_app  # noqa: E402
from ditserve.deployments.config import AppConfig  # noqa: E402
from ditserve.models.tiny import make_tiny  # noqa: E402


def _timed(fn, bodies, concurrency: int) -> dict:
    fn(bodies[0])  # warm-up
    latencies = []

    def one(body):
        start = time.perf_counter()
        fn(body)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 4),
        "per_request_s": round(wall / len(bodies), 5),
        "latency_p50_s": round(statistics.median(latencies), 5),
        "latency_max_s": round(max(latencies), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="diffusers folder (default: a tiny checkpoint of --family)")
    parser.add_argument("--family", default="qwen-image", choices=["qwen-image", "flux"])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp()
    model = args.model or str(make_tiny(args.family, os.path.join(tmp, args.family)))
    bodies = [
        {"prompt": f"a red circle number {i}", "size": f"{args.size}x{args.size}",
         "num_inference_steps": args.steps, "seed": i}
        for i in range(args.requests)
    ]

    # Plain diffusers pipeline: prompt -> PIL image.
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    diffusers_run = _timed(
        lambda b: pipe(prompt=b["prompt"], width=args.size, height=args.size, num_inference_steps=args.steps,
                       generator=torch.Generator("cpu").manual_seed(b["seed"])).images,
        bodies, 1,
    )

    # In-process reference runner (same adapter code as the served path).
    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32"))
    runner = _timed(lambda b: engine.generate(GenerationRequest(**b)), bodies, 1)

    # The served graph over HTTP.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppConfig(engine={"model": model, "device": "cpu"}, accelerator="cpu")), name="bench")
    url = f"http://127.0.0.1:{port}/v1/images/generations"

    def http(body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    served = _timed(http, bodies, args.concurrency)
    stage = http(bodies[0])["timings"]
    serve.shutdown()
    ray.shutdown()

    print(json.dumps({
        "benchmark": "serving_overhead",
        "model": model if args.model else f"tiny {args.family}",
        "requests": args.requests, "steps": args.steps, "size": args.size, "http_concurrency": args.concurrency,
        "http": served,
        "in_process_runner": runner,
        "diffusers_pipeline": diffusers_run,
        "ratio_http_vs_runner": round(served["per_request_s"] / runner["per_request_s"], 3),
        "ratio_http_vs_diffusers": round(served["per_request_s"] / diffusers_run["per_request_s"], 3),
        "ratio_runner_vs_diffusers": round(runner["per_request_s"] / diffusers_run["per_request_s"], 3),
        "http_stage_timings_s": stage,
    }, indent=2))


if __name__ == "__main__":
    main()
