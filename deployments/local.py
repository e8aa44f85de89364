"""Run the engine on N local processes joined by gloo, without Ray.

The same ``Engine`` and parallel layout a DiT worker group runs, on one machine: used by the
equivalence tests and the communication benchmark, and usable for quick multi-rank experiments.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditserve.models import STAGES
from ditserve.parallel import build_groups

from .engine import Engine, EngineConfig
from .schema import GenerationRequest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config: dict, requests: list[dict], queue: Any) -> None:
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(1)
        cfg = EngineConfig.model_validate(config)
        backend = "gloo"
        if cfg.device.startswith("cuda"):  # one GPU per rank, NCCL
            backend = "nccl"
            cfg = cfg.model_copy(update={"device": f"cuda:{rank}"})
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=int(os.environ.get("DITSERVE_LOCAL_TIMEOUT_S", "120"))),
        )
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
        queue.put((rank, "ok", results))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(config: EngineConfig, requests: Sequence[GenerationRequest], *, timeout_s: float = 600) -> list[list[dict]]:
    """Generate ``requests`` on ``config.parallel.world_size`` local processes (gloo on CPU;
    with ``device="cuda"``, rank i on ``cuda:i`` with NCCL).

    Returns:
        Per rank, per request: ``latents``, ``images`` (float arrays), ``timings``, ``bytes_sent``
        (by this rank's collectives, per request), ``cache`` (this rank's cache statistics or None).
    """
    world = config.parallel.world_size
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    payload = [r.model_dump() for r in requests]
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world, port, config.model_dump(), payload, queue), daemon=True)
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
    for per_rank in out.values():
        for result in per_rank:
            result["latents"] = torch.from_numpy(result["latents"])
    return [out[r] for r in range(world)]
