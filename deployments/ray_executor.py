"""The executor over Ray actors: the ranks a DiT or VAE replica starts in its own placement group.

One actor per bundle ``first_bundle + rank`` of the replica's placement group, each holding a
``worker.RankWorker``; rendezvous on rank 0's node (rank 0 opens a ``TCPStore`` on a free port,
the others connect), with the collective timeout of the deployment.

Why the actors have two concurrency groups: requests run in the default group, one at a time (the
collectives of two requests must never interleave), while ``ping`` (the replica's health check)
and ``abort`` run in a ``control`` group with its own thread. A plain sync actor queued the
health ping behind a running generation, so Serve took a healthy replica that was busy for longer
than its health-check timeout for dead and killed it mid-request.

Cancellation: when the coroutine awaiting ``call_all_async`` is cancelled (Serve cancels a
replica's handler when its caller cancels the ``DeploymentResponse`` or the HTTP client
disconnects), the ranks are aborted (every rank stops at the same next step), awaited so the group
is free for the next request, and the ``CancelledError`` is re-raised: no result is returned.
``last_cancel`` keeps the steps rank 0 had finished when the cancel arrived and where the ranks
stopped (``progress``, read on the control thread).

Inputs are put in the object store once (``ray.put``) and every rank gets the reference; only the
reply rank returns its result.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .executor import Executor, RequestTimeoutError, WorkerError, _name
from .schema import RequestError
from .worker import RankWorker, RequestAborted, Target

logger = logging.getLogger(__name__)

CONTROL = "control"


@ray.remote(concurrency_groups={CONTROL: 2})
class RankActor:
    """A ``RankWorker`` in a Ray actor (Ray shows it its own GPU as ``cuda:0``: local rank 0)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.worker = RankWorker(rank, world_size, local_rank=0)

    def run(self, op: str, *args: Any) -> Any:
        return getattr(self.worker, op)(*args)

    def call(self, request: tuple[Target, tuple, dict], reply: bool, call_id: int = 0) -> Any:
        target, args, kwargs = request
        return self.worker.call(target, args, kwargs, reply, call_id)

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> int:
        return self.worker.ping()

    @ray.method(concurrency_group=CONTROL)
    def abort(self, call_id: int | None = None) -> int:
        return self.worker.abort(call_id)

    @ray.method(concurrency_group=CONTROL)
    def progress(self) -> tuple[int, int]:
        return self.worker.progress()

    @ray.method(concurrency_group=CONTROL)
    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    @ray.method(concurrency_group=CONTROL)
    def where(self) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()


class RayExecutor(Executor):
    """The ranks of one replica.

    Args:
        world_size: number of ranks.
        config: what every rank loads (``EngineConfig``).
        stages: the stages the ranks serve (e.g. ``["denoise"]``).
        num_cpus, num_gpus, resources: per-rank Ray resources (must fit the rank bundles).
        placement_group: the replica's placement group (``None``: schedule freely, for tests).
        first_bundle: index of rank 0's bundle (bundle 0 holds the coordinator).
        timeout_s: rendezvous and collective timeout (``distributed_timeout_s``); a request's own
            deadline is ``call_all``'s ``timeout_s``.
        startup_timeout_s: how long the actors may take to start and load (default ``timeout_s``).
    """

    def __init__(
        self,
        world_size: int,
        config: Any,
        stages: Sequence[str],
        *,
        num_cpus: float,
        num_gpus: float,
        resources: dict[str, float],
        placement_group: PlacementGroup | None,
        first_bundle: int = 1,
        timeout_s: float = 120.0,
        startup_timeout_s: float | None = None,
    ) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        #: (steps rank 0 had finished when the last cancel arrived, steps when the ranks stopped)
        self.last_cancel: tuple[int, int] | None = None
        self.cancels: list[tuple[int, int]] = []  # every cancel's (at, stopped), oldest first
        self.stopping: asyncio.Future | None = None  # the latest cancelled call's stop task (outlives its caller)
        self._call_id = 0  # id of the latest call (progress of an older one reads as 0)
        # starting actors and loading weights is not a collective: it gets its own, longer, limit
        self.startup_timeout_s = startup_timeout_s or timeout_s
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if num_gpus == 0 else {}
        self.actors = []
        for rank in range(world_size):
            options: dict[str, Any] = dict(
                num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, runtime_env={"env_vars": env}
            )
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=first_bundle + rank
                )
            self.actors.append(RankActor.options(**options).remote(rank, world_size))
        try:
            self._wait([a.ping.remote() for a in self.actors], "start")
            host = self._wait([self.actors[0].node_ip.remote()], "node_ip")[0]
            port = self._wait([self.actors[0].run.remote("open_store", host, timeout_s)], "open_store")[0] \
                if world_size > 1 else 0
            placement = self._wait([a.run.remote("init_distributed", host, port, config.device, timeout_s)
                                    for a in self.actors], "init_distributed")
            self.load(config, stages)
            self.info = {**self.info, "backend": placement[0]["backend"]}
        except Exception:
            self.kill()
            raise

    # ---- the verb ----------------------------------------------------------------------------------

    def _load(self, config: Any, stages: list[str]) -> dict[str, str]:
        return self._wait([a.run.remote("load", config, stages) for a in self.actors], "load")[0]

    def _refs(self, target: Target, args: tuple, kwargs: dict, reply_rank: int | None) -> list:
        request = ray.put((target, args, kwargs))  # once, for every rank
        self._call_id += 1
        return [a.call.remote(request, reply_rank is None or rank == reply_rank, self._call_id)
                for rank, a in enumerate(self.actors)]

    def call_all(self, target: Target, *args: Any, reply_rank: int | None = 0, timeout_s: float | None = None,
                 **kwargs: Any) -> Any:
        refs = self._refs(target, args, kwargs, reply_rank)
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            self.abort()
            ray.wait(pending, num_returns=len(pending), timeout=self.timeout_s)
            raise RequestTimeoutError(f"{_name(target)}: no result within the request deadline of {timeout_s:g} s; "
                                      "the ranks were aborted")
        return self._results(refs, _name(target), reply_rank)

    async def call_all_async(self, target: Target, *args: Any, reply_rank: int | None = 0,
                             timeout_s: float | None = None, **kwargs: Any) -> Any:
        if self.stopping is not None and not self.stopping.done():
            # the previous call was cancelled and its ranks are still stopping: start after them, so
            # their abort cannot reach this call (and its progress reads from 0)
            await asyncio.shield(self.stopping)
        refs = self._refs(target, args, kwargs, reply_rank)
        call_id = self._call_id
        done = asyncio.gather(*refs, return_exceptions=True)
        try:
            results = await asyncio.wait_for(asyncio.shield(done), timeout=timeout_s)
        except asyncio.CancelledError:
            # the caller went away: stop the ranks, wait until they have (in a task of its own, held
            # by the executor: Serve may cancel the handler again, and it then returns at once and
            # frees the replica before the ranks have stopped; the next call waits for this task),
            # then re-raise
            # (in a fresh context: Serve cancels the request's Ray task recursively, which would
            # also cancel the abort and progress calls made from a task that inherited its context)
            stop = self.stopping = asyncio.get_running_loop().create_task(self._stop(done, call_id),
                                                                         context=contextvars.Context())
            try:
                await asyncio.shield(stop)
            except asyncio.CancelledError:
                pass
            raise
        except asyncio.TimeoutError:
            self.abort()
            try:  # every rank stops at its next step; wait for them so the group is free again
                await asyncio.wait_for(done, timeout=self.timeout_s)
            except asyncio.TimeoutError:
                pass
            raise RequestTimeoutError(f"{_name(target)}: no result within the request deadline of {timeout_s:g} s; "
                                      "the ranks were aborted") from None
        return self._pick(results, _name(target), reply_rank)

    def _results(self, refs: list, method: str, reply_rank: int | None) -> Any:
        results = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - collected and raised below with the rank
                results.append(exc)
        return self._pick(results, method, reply_rank)

    @staticmethod
    def _pick(results: list, method: str, reply_rank: int | None) -> Any:
        for rank, result in enumerate(results):
            if isinstance(result, BaseException):
                cause = getattr(result, "cause", None) or result
                if isinstance(cause, RequestAborted):
                    raise RequestTimeoutError(f"{method}: aborted") from None
                if isinstance(cause, RequestError):  # the request's fault; the group is fine
                    raise cause from None
                raise WorkerError(f"{method} failed on rank {rank}: {result}") from result
        return results if reply_rank is None else results[reply_rank]

    def _wait(self, refs: list, method: str) -> list:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.startup_timeout_s)
        if pending:
            ranks = [refs.index(r) for r in pending]
            raise WorkerError(
                f"{method}: rank(s) {ranks} did not answer within {self.startup_timeout_s:.0f}s "
                "(not scheduled: do the placement bundles hold the workers' resources?)"
            )
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except Exception as exc:
                raise WorkerError(f"{method} failed on rank {rank}: {exc}") from exc
        return out

    async def _stop(self, done: asyncio.Future, call_id: int) -> tuple[int, int]:
        """Abort call ``call_id`` and wait for every rank to leave it; records and returns ``last_cancel``."""
        # rank 0 answers the abort with the steps it had finished when the abort landed (a separate
        # progress read before or after it would be off by the steps run during a round trip)
        at = await _answer(self._abort_refs(call_id)[0], "abort", 0)
        try:
            await asyncio.wait_for(done, timeout=self.timeout_s)
        except asyncio.TimeoutError:
            logger.warning("ranks did not stop within %g s of a cancel", self.timeout_s)
        self.last_cancel = (at, await _answer(self.progress(), "progress", at))
        self.cancels = [*self.cancels[-99:], self.last_cancel]
        logger.info("call cancelled at step %d; the ranks stopped after step %d", *self.last_cancel)
        return self.last_cancel

    # ---- control -----------------------------------------------------------------------------------

    async def progress(self) -> int:
        """Denoising steps rank 0 has finished in the latest call (control thread: the call is not
        disturbed); 0 until that call has started there."""
        call_id, steps = await self.actors[0].progress.remote()
        return steps if call_id == self._call_id else 0

    def abort(self) -> None:
        self._abort_refs()

    def _abort_refs(self, call_id: int | None = None) -> list:
        """Abort call ``call_id`` (default: the latest; one at a time per replica), even on a rank
        that has not started it yet; each rank's reference answers the steps it had finished when
        the abort landed."""
        return [actor.abort.remote(self._call_id if call_id is None else call_id) for actor in self.actors]

    async def check_health(self, timeout_s: float = 10.0) -> None:
        """Every rank answers a ping (from its control thread: a running request does not delay it)."""
        refs = [a.ping.remote() for a in self.actors]
        try:
            await asyncio.wait_for(asyncio.gather(*refs), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise WorkerError(f"a rank of {self.world_size} did not answer a health check in {timeout_s:g}s") from None

    async def where(self) -> list[tuple[str, int]]:
        """(node id, pid) of every rank."""
        return list(await asyncio.gather(*[a.where.remote() for a in self.actors]))

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        self.kill()


async def _answer(awaitable: Any, what: str, default: int) -> int:
    """A control call's answer during a cancel, or ``default`` when Ray cancelled or lost it (the
    stop must finish and be recorded either way)."""
    try:
        return await awaitable
    except (ray.exceptions.RayError, asyncio.CancelledError) as exc:
        logger.warning("%s during a cancel got no answer (%s)", what, type(exc).__name__)
        return default
