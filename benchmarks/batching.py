"""Request batching in the DiT: batching off vs on, for concurrent requests on one DiT replica.

    python benchmarks/batching.py [--model ditserve/demo] [--concurrency 8] [--steps 8] [--size 128]
        [--repeats 2] [--threads 2]

The DiT stage as a replica runs it (``stages.Denoiser``, in this process, no Ray): ``concurrency``
requests arrive together (different seeds and prompts of equal token counts, CFG on as the demo
model's default), and are denoised either one after the other (batching off: what a replica did
before, ``max_batch_size=1``) or as the batches ``Denoiser.denoise_batch`` forms
(``max_batch_size=concurrency``). A request's latency is from the common arrival to the end of the
loop it ran in. Prints one JSON object: throughput (requests/s), p50/p95 latency of both modes, the
ratios, the CPU seconds of each (``cpu_s``: what a shared machine's load does not inflate), whether
the issue's target (1.5x throughput) is met, the batch sizes formed, and the largest difference between a request's batched and lone
latents (the same requests, so the speedup is not bought with other numbers). The two modes
alternate ``repeats`` times and the best run of each is kept (a shared CPU is noisy). ``routing_2_replicas``:
the makespan, counted in steps, of a large/small mix on two replicas, round-robin vs the DiT's
``least_cost`` router policy (``routing.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ditserve.deployments import EngineConfig, GenerationRequest  # noqa: E402
from ditserve.deployments.engine import Engine  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green circle", "a red square", "a blue circle", "a green square",
           "a white circle", "a black square"]


def _percentiles(latencies: list[float]) -> dict[str, float]:
    return {"p50_s": round(float(np.percentile(latencies, 50)), 3), "p95_s": round(float(np.percentile(latencies, 95)), 3)}


def routing_makespans(engine: Engine, replicas: int = 2) -> dict[str, float]:
    """Makespan in steps of one 512x512 sample (``routing.request_cost``) of a mix of large and
    small requests queued at once on ``replicas`` DiT replicas: round-robin vs least queued cost."""
    from ditserve.deployments.routing import LeastCostPolicy, request_cost

    large = engine.resolve(GenerationRequest(prompt="a red circle", size="256x256", num_inference_steps=20))
    small = engine.resolve(GenerationRequest(prompt="a red circle", size="64x64", num_inference_steps=4))
    reqs = [large, small] * 8
    policy = LeastCostPolicy()
    rr, lc = [0.0] * replicas, [0.0] * replicas
    for i, req in enumerate(reqs):
        rr[i % replicas] += request_cost(req)
        chosen = policy.choose(list(range(replicas)))
        policy.routed(chosen, str(i), request_cost(req))
        lc[chosen] += request_cost(req)
    return {"requests": len(reqs), "round_robin_steps": round(max(rr), 3), "least_cost_steps": round(max(lc), 3),
            "ratio": round(max(rr) / max(lc), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ditserve/demo")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (served ranks run one: "
                        "OMP_NUM_THREADS=1; more on a shared CPU spin-wait)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=args.model, device="cpu", dtype="float32"), stages=["encode", "denoise"])
    items = []
    for i in range(args.concurrency):
        req = engine.resolve(GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], size=f"{args.size}x{args.size}",
                                               num_inference_steps=args.steps, seed=i))
        items.append((req, engine.encoder.encode([req])[0], f"bench-{i}"))
    denoiser = engine.denoiser
    denoiser.denoise(*items[0])  # warm-up

    def off() -> tuple[float, list[float], list[torch.Tensor], float]:
        start, cpu = time.perf_counter(), time.process_time()
        latencies, latents = [], []
        for item in items:
            latents.append(denoiser.denoise(*item).latents)
            latencies.append(time.perf_counter() - start)
        return time.perf_counter() - start, latencies, latents, time.process_time() - cpu

    def on() -> tuple[float, list[float], list[torch.Tensor], float, list[dict]]:
        start, cpu = time.perf_counter(), time.process_time()
        out = denoiser.denoise_batch(items)
        makespan = time.perf_counter() - start
        # one call: every request's loop ends by the end of the call (groups run one after another;
        # a request of an earlier group is counted at the end of the call, which overstates its latency)
        return (makespan, [makespan] * len(items), [d.latents for d in out], time.process_time() - cpu,
                [d.reports[-1].batch for d in out])

    runs_off, runs_on = [], []
    for _ in range(args.repeats):  # interleaved, so both modes see the same load on a shared machine
        runs_off.append(off())
        runs_on.append(on())
    best_off = min(runs_off, key=lambda r: r[0])
    best_on = min(runs_on, key=lambda r: r[0])
    sizes = sorted({b["size"] for b in best_on[4]}, reverse=True)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(best_off[2], best_on[2]))
    n = len(items)
    row_off = {"throughput_rps": round(n / best_off[0], 3), "makespan_s": round(best_off[0], 3),
               **_percentiles(best_off[1]), "cpu_s": round(min(r[3] for r in runs_off), 3)}
    row_on = {"throughput_rps": round(n / best_on[0], 3), "makespan_s": round(best_on[0], 3),
              **_percentiles(best_on[1]), "cpu_s": round(min(r[3] for r in runs_on), 3), "batch_sizes": sizes}
    print(json.dumps({
        "model": args.model, "device": "cpu", "threads": args.threads, "concurrency": n, "steps": args.steps,
        "size": args.size, "cfg": items[0][1].cond.negative is not None,
        "batching_off": row_off, "request_batching": row_on,
        "throughput_ratio": round(row_on["throughput_rps"] / row_off["throughput_rps"], 2),
        "p50_ratio": round(row_on["p50_s"] / row_off["p50_s"], 2),
        "p95_ratio": round(row_on["p95_s"] / row_off["p95_s"], 2),
        "cpu_ratio": round(row_off["cpu_s"] / row_on["cpu_s"], 2),
        "meets_1_5x": row_on["throughput_rps"] >= 1.5 * row_off["throughput_rps"],
        "max_abs_diff_batched_vs_alone": max_diff,
        "routing_2_replicas": routing_makespans(engine),
    }))


if __name__ == "__main__":
    main()
