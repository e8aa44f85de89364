"""The executor: one verb, ``call_all(target, *args, reply_rank=0)``, reaches every rank of a group.

Two implementations of one contract (vLLM's ``collective_rpc`` with a unique reply rank):

- ``LocalExecutor`` (here): persistent spawned processes on this machine, joined by gloo (or NCCL,
  one GPU per rank). The reference runner's multi-rank mode, ``ditserve generate`` with degrees,
  tests and benchmarks use it; one executor serves configuration after configuration (``load``).
- ``RayExecutor`` (``ray_executor.py``): one Ray actor per bundle of a replica's placement group
  (the served DiT and VAE).

Both run ``worker.RankWorker`` on every rank. Inputs are serialized once for all ranks; only
``reply_rank`` sends its result back (``reply_rank=None``: every rank, for tests that compare
ranks). A call's deadline (``timeout_s``, the deployment's ``request_timeout_s``) is separate
from the collective timeout of the group: when it passes, every rank is asked to abort and stops
at the same step, and the call raises ``RequestTimeoutError``; the group stays usable.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from .schema import RequestError
from .worker import RankWorker, RequestAborted, Target

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A rank failed; the message names the rank and the method."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline (``request_timeout_s``); its ranks were aborted."""


def _name(target: Target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


class Executor(abc.ABC):
    """Every rank of one group, reached through ``call_all``."""

    world_size: int

    @abc.abstractmethod
    def call_all(self, target: Target, *args: Any, reply_rank: int | None = 0, timeout_s: float | None = None,
                 **kwargs: Any) -> Any:
        """Run ``target`` on every rank with the same arguments.

        Args:
            target: a method name of the ranks' stage object, or a picklable function
                ``fn(worker, *args, **kwargs)``.
            reply_rank: the rank whose result is returned; ``None`` returns every rank's, by rank.
            timeout_s: the call's deadline (``None``: none); past it the ranks are aborted.

        Raises:
            WorkerError: a rank failed (names the rank and the method).
            RequestTimeoutError: the deadline passed.
        """

    async def call_all_async(self, target: Target, *args: Any, reply_rank: int | None = 0,
                             timeout_s: float | None = None, **kwargs: Any) -> Any:
        """``call_all`` for async callers (the caller's event loop stays free)."""
        return await asyncio.to_thread(self.call_all, target, *args, reply_rank=reply_rank, timeout_s=timeout_s,
                                       **kwargs)

    def load(self, config: Any, stages: Sequence[str]) -> dict[str, str]:
        """Build the stage object of ``stages`` for ``config`` on every rank; rank 0's info."""
        self.info = self._load(config, list(stages))
        return self.info

    @abc.abstractmethod
    def _load(self, config: Any, stages: list[str]) -> dict[str, str]: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Ask every rank to stop the running call at its next step."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...


# ---- local processes -------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, calls: Connection, control: Connection, env: dict[str, str]) -> None:
    """A local rank: a control thread takes aborts while the main thread runs calls."""
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(os.environ.get("DITSERVE_LOCAL_THREADS", "1")))
    worker = RankWorker(rank, world)

    def control_loop() -> None:
        while True:
            try:
                message = control.recv()
            except (EOFError, OSError):
                return
            if message == "abort":
                worker.abort()

    threading.Thread(target=control_loop, daemon=True, name="ditserve-control").start()
    while True:
        try:
            data, reply = calls.recv()
        except (EOFError, OSError):
            break
        op, args = pickle.loads(data)
        if op == "exit":
            break
        try:
            result = getattr(worker, op)(*args) if op != "call" else worker.call(*args, reply=reply)
            # plain pickle: torch's multiprocessing reducer would send tensors as shared memory
            calls.send_bytes(pickle.dumps(("ok", result)))
        except RequestAborted as exc:
            calls.send_bytes(pickle.dumps(("aborted", str(exc))))
        except RequestError as exc:  # the request's fault (e.g. a LoRA that does not fit): the caller's 4xx
            calls.send_bytes(pickle.dumps(("request_error", exc)))
        except BaseException:
            calls.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    worker.shutdown()


class LocalExecutor(Executor):
    """``world_size`` persistent local processes in one torch.distributed group.

    Args:
        world_size: ranks.
        device: the config's ``device``; each rank's device and backend come from
            ``parallel.devices.rank_device`` (CPU: gloo; CUDA: rank i on GPU i, NCCL).
        timeout_s: rendezvous and collective timeout (not a request's deadline).
    """

    def __init__(self, world_size: int, *, device: str = "cpu", timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self.info: dict[str, str] = {}
        self.broken: str | None = None
        self._lock = threading.Lock()  # one call at a time: collectives of two calls must not interleave
        ctx = mp.get_context("spawn")
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self._calls: list[Connection] = []
        self._control: list[Connection] = []
        self._procs = []
        for rank in range(world_size):
            calls_parent, calls_child = ctx.Pipe()
            control_parent, control_child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(rank, world_size, calls_child, control_child, env),
                               daemon=True, name=f"ditserve-rank{rank}")
            proc.start()
            calls_child.close()
            control_child.close()
            self._calls.append(calls_parent)
            self._control.append(control_parent)
            self._procs.append(proc)
        try:
            port = self._run("open_store", ("127.0.0.1", timeout_s), ranks=[0], reply_rank=0, deadline=None) if world_size > 1 else 0
            self.placement = self._run("init_distributed", ("127.0.0.1", port, device, timeout_s), reply_rank=0,
                                       deadline=None)
        except BaseException:
            self.shutdown()
            raise

    def _load(self, config: Any, stages: list[str]) -> dict[str, str]:
        return self._run("load", (config, stages), reply_rank=0, deadline=None)

    def call_all(self, target: Target, *args: Any, reply_rank: int | None = 0, timeout_s: float | None = None,
                 **kwargs: Any) -> Any:
        return self._run("call", (target, args, kwargs), reply_rank=reply_rank, deadline=timeout_s)

    def _run(self, op: str, args: tuple, *, reply_rank: int | None, deadline: float | None,
             ranks: Sequence[int] | None = None) -> Any:
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        method = _name(args[0]) if op == "call" else op
        with self._lock:
            if self.broken:
                raise WorkerError(f"{method}: this executor is unusable ({self.broken}); start a new one")
            data = pickle.dumps((op, args))  # once, for every rank
            for rank in ranks:
                self._calls[rank].send((data, reply_rank is None or rank == reply_rank))
            results, errors, aborted = self._collect(ranks, method, deadline)
        refused = [e for e in errors if isinstance(e, RequestError)]
        if refused and len(refused) == len(errors):
            raise refused[0]  # every failing rank refused the request itself: the group is fine
        errors = [e if isinstance(e, str) else f"{e}" for e in errors]
        if errors:
            raise WorkerError(f"{method} failed on " + "\n".join(errors))
        if aborted:
            why = "the call was aborted" if deadline is None else f"no result within the request deadline of {deadline:g} s"
            raise RequestTimeoutError(f"{method}: {why}; the ranks were aborted")
        return [results[r] for r in ranks] if reply_rank is None else results[reply_rank]

    def _collect(self, ranks: list[int], method: str, deadline: float | None) -> tuple[dict, list[str], bool]:
        results: dict[int, Any] = {}
        errors: list[str | RequestError] = []
        aborted = False
        pending = {self._calls[r]: r for r in ranks}
        start = time.monotonic()
        grace_until: float | None = None
        while pending:
            now = time.monotonic()
            if deadline is not None and not aborted and now - start > deadline:
                aborted = True
                self.abort()
                grace_until = now + self.timeout_s + 5
            if errors and grace_until is None:
                # the others may wait in a collective for the failed rank until the group timeout
                grace_until = now + self.timeout_s + 5
            if grace_until is not None and now > grace_until:
                self.broken = f"rank(s) {sorted(pending.values())} did not finish {method}"
                errors.append(self.broken)
                break
            for conn in wait(list(pending), timeout=0.5):
                rank = pending.pop(conn)
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self.broken = f"rank {rank} exited (code {self._procs[rank].exitcode})"
                    errors.append(f"rank {rank}: process exited during {method}")
                    continue
                if status == "ok":
                    results[rank] = value
                elif status == "aborted":
                    aborted = True
                elif status == "request_error":
                    errors.append(value)
                else:
                    errors.append(f"rank {rank}:\n{value}")
        return results, errors, aborted

    def abort(self) -> None:
        for conn in self._control:
            try:
                conn.send("abort")
            except OSError:
                pass

    def shutdown(self) -> None:
        for conn in self._calls:
            try:
                conn.send((pickle.dumps(("exit", ())), False))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.broken = self.broken or "shut down"


_POOL: dict[tuple[str, int, str], LocalExecutor] = {}
_POOL_LOCK = threading.Lock()


def local_executor(world_size: int, device: str = "cpu", *, role: str = "dit",
                   timeout_s: float | None = None) -> LocalExecutor:
    """A persistent ``LocalExecutor`` of ``world_size`` ranks, shared by everything in this process
    that asks for the same role, size and device (tests, benchmarks, ``ditserve generate``):
    processes are spawned once, and each user ``load``s its own configuration. Roles keep a DiT
    world and a VAE group of the same size apart (both are loaded at once by ``ParallelEngine``)."""
    timeout_s = timeout_s or float(os.environ.get("DITSERVE_LOCAL_TIMEOUT_S", "120"))
    key = (role, world_size, device.split(":", 1)[0])
    with _POOL_LOCK:
        executor = _POOL.get(key)
        if executor is None or executor.broken:
            executor = _POOL[key] = LocalExecutor(world_size, device=device, timeout_s=timeout_s)
        return executor


def shutdown_local_executors() -> None:
    with _POOL_LOCK:
        for executor in _POOL.values():
            executor.shutdown()
        _POOL.clear()
