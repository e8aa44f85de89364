"""Worker groups: the Ray actors a DiT or VAE replica starts in its own placement group, joined in
one torch.distributed group (gloo on CPU, NCCL on GPU).

Driver/worker as in vLLM: the replica (coordinator) reaches every rank through one verb,
``call_all(method, *args)``; the workers are thin and run the ``Engine`` of their stage, so the
whole denoising loop runs inside them (one call per request, none per step). Rendezvous happens on
rank 0's node: rank 0 opens a ``TCPStore`` on a free port and the others connect to it, with an
explicit timeout and an error naming the rank that failed to join.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ditserve.parallel import build_groups
from ditserve.parallel.vae import build_vae_group

from .engine import Engine, EngineConfig

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker failed; the message names the rank and the method."""


class StageWorker:
    """One rank: an ``Engine`` for some stages, inside a torch.distributed group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.engine: Engine | None = None
        self._store: Any = None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def open_store(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0 only: open the rendezvous store on a free port of this node."""
        host = ray.util.get_node_ip_address()
        self._store = torch.distributed.TCPStore(
            host, 0, self.world_size, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return host, self._store.port

    def init_distributed(self, host: str, port: int, timeout_s: float) -> str:
        timeout = datetime.timedelta(seconds=timeout_s)
        if self._store is None:
            self._store = torch.distributed.TCPStore(host, port, self.world_size, is_master=False, timeout=timeout)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray shows each rank its own GPU as cuda:0
        torch.distributed.init_process_group(
            backend, store=self._store, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        return backend

    def load(self, config: EngineConfig, stages: Sequence[str]) -> dict[str, Any]:
        # The DiT ranks form the parallel layout's world; the VAE workers form the VAE group.
        groups = build_groups(config.parallel) if "denoise" in stages else None
        vae_group = build_vae_group(config.vae) if "decode" in stages and "denoise" not in stages else None
        self.engine = Engine(config, stages, groups, vae_group=vae_group)
        return {"model": self.engine.spec.id, "device": str(self.engine.device), "dtype": str(self.engine.dtype)}

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``Engine.<method>`` on this rank."""
        try:
            return getattr(self.engine, method)(*args, **kwargs)
        except Exception:
            logger.exception("rank %d: %s failed; the other ranks of this group may block until timeout", self.rank, method)
            raise

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class WorkerGroup:
    """The workers of one replica, one per bundle ``first_bundle + rank`` of the replica's PG.

    Args:
        world_size: number of ranks.
        engine_config: what every rank loads.
        stages: the engine stages the ranks serve (e.g. ``["denoise"]``).
        num_cpus, num_gpus, resources: per-worker Ray resources (must fit the rank bundles).
        placement_group: the replica's placement group (``None``: schedule freely, for tests).
        first_bundle: index of rank 0's bundle (bundle 0 holds the coordinator).
        timeout_s: start-up, rendezvous and collective timeout.
    """

    def __init__(
        self,
        world_size: int,
        engine_config: EngineConfig,
        stages: Sequence[str],
        *,
        num_cpus: float,
        num_gpus: float,
        resources: dict[str, float],
        placement_group: PlacementGroup | None,
        first_bundle: int = 1,
        timeout_s: float = 120.0,
    ) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        actor_cls = ray.remote(StageWorker)
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if num_gpus == 0 else {}
        self.workers = []
        for rank in range(world_size):
            options: dict[str, Any] = dict(
                num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, runtime_env={"env_vars": env}
            )
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=first_bundle + rank
                )
            self.workers.append(actor_cls.options(**options).remote(rank, world_size))
        try:
            self._wait([w.ping.remote() for w in self.workers], "start")
            host, port = self._wait([self.workers[0].open_store.remote(timeout_s)], "open_store")[0]
            backends = self._wait(
                [w.init_distributed.remote(host, port, timeout_s) for w in self.workers], "init_distributed"
            )
            self.info = self._wait([w.load.remote(engine_config, list(stages)) for w in self.workers], "load")[0]
            self.info["backend"] = backends[0]
        except Exception:
            self.kill()
            raise

    def _wait(self, refs: list, method: str) -> list:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            ranks = [refs.index(r) for r in pending]
            raise WorkerError(
                f"{method}: rank(s) {ranks} did not answer within {self.timeout_s:.0f}s "
                "(not scheduled: do the placement bundles hold the workers' resources?)"
            )
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except Exception as exc:
                raise WorkerError(f"{method} failed on rank {rank}: {exc}") from exc
        return out

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``Engine.<method>`` on every rank with the same arguments; results by rank."""
        return self._wait([w.call.remote(method, *args, **kwargs) for w in self.workers], method)

    async def call_all_async(self, method: str, *args: Any, **kwargs: Any) -> list:
        """``call_all`` for async callers (replica event loop stays free for health checks)."""
        import asyncio

        refs = [w.call.remote(method, *args, **kwargs) for w in self.workers]
        try:
            results = await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise WorkerError(f"{method}: no answer from all ranks within {self.timeout_s:.0f}s") from None
        for rank, result in enumerate(results):
            if isinstance(result, BaseException):
                raise WorkerError(f"{method} failed on rank {rank}: {result}") from result
        return results

    def node_ids(self) -> list[str]:
        return ray.get([w.node_id.remote() for w in self.workers])

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def check_health(self, timeout_s: float = 10.0) -> None:
        refs = [w.ping.remote() for w in self.workers]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise WorkerError(f"rank(s) {[refs.index(r) for r in pending]} did not answer a health check")
        ray.get(ready)

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
