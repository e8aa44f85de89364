"""Video jobs: per-stage seconds of a tiny T2V job, the job API's overhead over a synchronous call,
and the cancellation latency in denoising steps.

    python benchmarks/video_jobs.py [--model DIR] [--steps 4] [--size 64x48] [--frames 9] [--cancels 3]

Prints one JSON object: the synchronous ``generate_video`` call's seconds per stage (the baseline
measured in the same run), a ``/v1/videos`` job's wall time from POST to ``completed`` plus its
MP4 download (the job path's overhead over the baseline: polling, the Jobs hop, MP4 encoding), and
for ``--cancels`` long requests (a DELETE of a job, a ``.cancel()`` of a sync call) the steps rank 0
had done when the cancel reached it and when every rank had stopped (``stopped - at``: steps run
after the cancel).
"""

from __future__ import annotations

import argparse
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
from ray import serve  # noqa: E402

from ditserve.deployments import GenerationRequest  # noqa: E402
from ditserve.deployments.app import build_app  # noqa: E402
from ditserve.deployments.config import AppConfig  # noqa: E402
from ditserve.models.tiny import make_tiny  # noqa: E402

LONG = dict(prompt="cancel me", size="32x32", num_frames=1, num_inference_steps=200, seed=1)


def _call(url: str, method: str = "GET", body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return resp.read()


def _poll(fn, stop, period: float = 0.02, tries: int = 30000):
    for _ in range(tries):
        value = fn()
        if stop(value):
            return value
        time.sleep(period)
    raise RuntimeError("gave up waiting")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="Wan2.2 diffusers folder (default: a tiny two-expert checkpoint)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64x48")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--cancels", type=int, default=3)
    args = parser.parse_args()
    model = args.model or str(make_tiny("wan", os.path.join(tempfile.mkdtemp(), "wan")))

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = AppConfig(engine={"model": model, "device": "cpu", "dtype": "float32"}, accelerator="cpu")
    handle = serve.run(build_app(cfg), name="video-bench", route_prefix="/")
    jobs = serve.get_deployment_handle("Jobs", "video-bench")
    url = f"http://127.0.0.1:{port}/v1/videos"
    fields = dict(prompt="a red circle moving right", size=args.size, num_frames=args.frames,
                  num_inference_steps=args.steps, seed=7)
    try:
        handle.generate_video.remote(GenerationRequest(**fields)).result()  # warm-up
        sync = handle.generate_video.remote(GenerationRequest(**fields)).result()
        start = time.perf_counter()
        job = json.loads(_call(url, "POST", fields))
        _poll(lambda: json.loads(_call(f"{url}/{job['id']}")), lambda v: v["status"] in ("completed", "failed"))
        mp4 = _call(f"{url}/{job['id']}/content")
        job_wall = time.perf_counter() - start

        cancels = []
        for i in range(args.cancels):
            if i % 2 == 0:  # a job DELETE
                key = json.loads(_call(url, "POST", dict(LONG, seed=i)))["id"]
                _poll(lambda: jobs.progress.remote(key).result() or {}, lambda p: p.get("steps_done", 0) >= 3)
                _call(f"{url}/{key}", "DELETE")
            else:  # a sync call cancelled
                response = handle.generate_video.remote(GenerationRequest(**dict(LONG, seed=i)))
                key = response.request_id
                _poll(lambda: jobs.progress.remote(key).result() or {}, lambda p: p.get("steps_done", 0) >= 3)
                response.cancel()
            seen = _poll(lambda: jobs.progress.remote(key).result() or {},
                         lambda p: p.get("stopped_at_step") is not None)
            cancels.append({"via": "delete" if i % 2 == 0 else "cancel", "at": seen["cancelled_at_step"],
                            "stopped": seen["stopped_at_step"]})
    finally:
        serve.shutdown()
        ray.shutdown()
    after = [c["stopped"] - c["at"] for c in cancels]
    print(json.dumps({
        "model": model if args.model else "ditserve/tiny-wan", "size": args.size, "frames": args.frames,
        "steps": args.steps, "cpu": True,
        "sync_stage_s": {k: round(v, 4) for k, v in sync.result.timings.items()},
        "job_wall_s": round(job_wall, 4), "job_overhead_s": round(job_wall - sync.result.timings["total"], 4),
        "mp4_bytes": len(mp4),
        "cancel": cancels, "steps_after_cancel_max": max(after) if after else None,
        "steps_after_cancel_median": statistics.median(after) if after else None,
    }))


if __name__ == "__main__":
    main()
