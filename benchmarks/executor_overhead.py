"""What the persistent executor and the single reply save, on local gloo ranks.

    python benchmarks/executor_overhead.py [--family qwen-image] [--world 2] [--requests 4]
        [--size 64] [--steps 2]

Prints one JSON object with, for the same requests on the same checkpoint:
- ``spawn_per_run_s``: a fresh process group per run (spawn, rendezvous, load, generate, exit) —
  how every multi-rank run (tests, ``ditserve generate``) worked before the executor;
- ``persistent_s``: one persistent ``LocalExecutor``, loaded once, every request a ``call_all``;
- ``reply_bytes``: bytes that come back to the driver per request when only rank 0 replies vs
  when every rank sends its copy (what the served DiT replica used to receive);
and the ratios. Both runs' latents are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ditserve.deployments import EngineConfig, GenerationRequest  # noqa: E402
from ditserve.deployments.executor import LocalExecutor  # noqa: E402
from ditserve.deployments.schema import validate_request  # noqa: E402
from ditserve.deployments.stages import Encoded, Encoder  # noqa: E402
from ditserve.models.tiny import make_tiny  # noqa: E402
from ditserve.parallel import ParallelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="qwen-image", choices=["qwen-image", "flux"])
    parser.add_argument("--model", help="diffusers folder (default: a tiny checkpoint of --family)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    model = args.model or str(make_tiny(args.family, tempfile.mkdtemp(prefix="ditserve-bench-")))
    config = EngineConfig(model=model, device="cpu", parallel=ParallelConfig(ulysses_degree=args.world))
    encoder = Encoder(config.model_copy(update={"parallel": ParallelConfig()}))
    requests = []
    for i in range(args.requests):
        req = GenerationRequest(prompt=f"a red circle {i}", size=f"{args.size}x{args.size}",
                                num_inference_steps=args.steps, seed=i, true_cfg_scale=1.0)
        resolved = validate_request(req, {encoder.spec.id: encoder.spec}, encoder.spec.id)
        requests.append((resolved, Encoded(encoder.conditioning([resolved])[0], ())))

    start = time.perf_counter()
    spawned = []
    for resolved, encoded in requests:
        executor = LocalExecutor(args.world)
        executor.load(config, ["denoise"])
        spawned.append(executor.call_all("denoise", resolved, encoded, "bench"))
        executor.shutdown()
    spawn_s = time.perf_counter() - start

    start = time.perf_counter()
    executor = LocalExecutor(args.world)
    executor.load(config, ["denoise"])
    persistent = [executor.call_all("denoise", resolved, encoded, "bench") for resolved, encoded in requests]
    persistent_s = time.perf_counter() - start
    every = executor.call_all("denoise", *requests[0], "bench", reply_rank=None)
    executor.shutdown()

    equal = all(float((a.latents - b.latents).abs().max()) == 0.0 for a, b in zip(spawned, persistent))
    one = len(pickle.dumps(persistent[0]))
    allr = len(pickle.dumps(every))
    print(json.dumps({
        "model": model, "world": args.world, "requests": args.requests, "size": args.size, "steps": args.steps,
        "spawn_per_run_s": round(spawn_s, 3), "persistent_s": round(persistent_s, 3),
        "speedup": round(spawn_s / persistent_s, 2),
        "reply_bytes": {"reply_rank_0": one, "every_rank": allr, "ratio": round(allr / one, 2)},
        "latents_equal": equal,
    }))


if __name__ == "__main__":
    main()
