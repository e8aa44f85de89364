"""Run the engine on N local processes joined by gloo, without Ray.

The same ``Engine`` and parallel layout a DiT (or VAE) worker group runs, on one machine: used by
the equivalence tests and the benchmarks, by ``ditserve generate`` with parallel degrees, and
usable for quick multi-rank experiments.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditserve.models import STAGES
from ditserve.parallel import build_groups
from ditserve.parallel.vae import build_vae_group

from .engine import Engine, EngineConfig
from .schema import GenerationRequest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_main(rank: int, world: int, port: int, backend: str, fn: Callable[[Any], Any], payload: Any,
                  queue: Any) -> None:
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(int(os.environ.get("DITSERVE_LOCAL_THREADS", "1")))
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=int(os.environ.get("DITSERVE_LOCAL_TIMEOUT_S", "120"))),
        )
        queue.put((rank, "ok", fn(payload)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(world: int, fn: Callable[[Any], Any], payload: Any, *, backend: str = "gloo",
                  timeout_s: float = 600) -> list[Any]:
    """Run ``fn(payload)`` on ``world`` spawned local processes joined in one torch.distributed
    group (``fn`` must be importable by name; results cross a queue, so return numpy, not torch).

    Returns:
        ``fn``'s result per rank.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_process_main, args=(rank, world, port, backend, fn, payload, queue), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    errors.append(f"rank(s) {dead} exited with code {[procs[r].exitcode for r in dead]}")
                elif time.monotonic() > deadline:
                    errors.append(f"no result from ranks {sorted(set(range(world)) - set(out))} in {timeout_s:.0f}s")
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed: " + "\n".join(errors))
    return [out[r] for r in range(world)]


def _generate_rank(payload: tuple[dict, list[dict]]) -> list[dict]:
    """One DiT rank of ``run_local``: the whole engine, every request."""
    config, requests = payload
    cfg = EngineConfig.model_validate(config)
    if cfg.device.startswith("cuda"):
        cfg = cfg.model_copy(update={"device": f"cuda:{dist.get_rank()}"})
    groups = build_groups(cfg.parallel)
    engine = Engine(cfg, STAGES, groups)
    results = []
    for fields in requests:
        sent_before = groups.bytes_sent()
        result = engine.generate(GenerationRequest.model_validate(fields), output_type="np")
        results.append({
            # numpy, not torch: torch tensors cross a queue as shared memory that vanishes with
            # the process that made it
            "latents": result.latents.cpu().numpy(),
            "images": result.images,
            "timings": result.timings,
            "bytes_sent": groups.bytes_sent() - sent_before,
            "cache": result.cache,
        })
    return results


def _decode_rank(payload: tuple[dict, list[tuple[dict, Any]]]) -> list[dict]:
    """One VAE worker of ``run_local_decode``: a decode-only engine in the VAE group."""
    config, items = payload
    cfg = EngineConfig.model_validate(config)
    if cfg.device.startswith("cuda"):
        cfg = cfg.model_copy(update={"device": f"cuda:{dist.get_rank()}"})
    group = build_vae_group(cfg.vae)
    engine = Engine(cfg, ["decode"], vae_group=group)
    results = []
    for fields, latents in items:
        req = engine.resolve(GenerationRequest.model_validate(fields))
        sent_before, start = group.sent, time.perf_counter()
        images = engine.postprocess(engine.decode(req, torch.from_numpy(latents)), output_type="np")
        results.append({"images": images, "timings": {"decode": time.perf_counter() - start},
                        "bytes_sent": group.sent - sent_before})
    return results


def run_local(config: EngineConfig, requests: Sequence[GenerationRequest], *, timeout_s: float = 600) -> list[list[dict]]:
    """Generate ``requests`` on ``config.parallel.world_size`` local processes (gloo on CPU;
    with ``device="cuda"``, rank i on ``cuda:i`` with NCCL).

    Returns:
        Per rank, per request: ``latents``, ``images`` (float arrays), ``timings``, ``bytes_sent``
        (by this rank's collectives, per request), ``cache`` (this rank's cache statistics or None).
    """
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    payload = (config.model_dump(), [r.model_dump() for r in requests])
    out = run_processes(config.parallel.world_size, _generate_rank, payload, backend=backend, timeout_s=timeout_s)
    for per_rank in out:
        for result in per_rank:
            result["latents"] = torch.from_numpy(result["latents"])
    return out


def run_local_decode(config: EngineConfig, items: Sequence[tuple[GenerationRequest, torch.Tensor]], *,
                     timeout_s: float = 600) -> list[list[dict]]:
    """Decode packed latents on ``config.vae.vae_patch_parallel_size`` local VAE workers, as a
    served VAE replica's workers do (each gets the full latents, all end with the full images).

    Args:
        items: (request, its final packed latents) pairs; the request fixes the output size.

    Returns:
        Per worker, per item: ``images`` (float arrays in [0, 1], n x H x W x 3), ``timings``, ``bytes_sent``.
    """
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    payload = (config.model_dump(), [(r.model_dump(), latents.cpu().numpy()) for r, latents in items])
    return run_processes(config.vae.vae_patch_parallel_size, _decode_rank, payload, backend=backend,
                         timeout_s=timeout_s)
