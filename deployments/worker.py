"""One rank, Ray-free: join the group → load a stage object → answer calls.

Both executors drive the same ``RankWorker`` (``executor.LocalExecutor`` in a spawned process,
``ray_executor.RayExecutor`` inside a Ray actor), through the same named steps as vLLM's workers:
``open_store`` (rank 0), ``init_distributed``, ``load``, then ``call`` per request. Only the
reply rank returns its result; the others return ``None``, so a replica never receives N copies
of the same latents.

``abort()`` may arrive from another thread while a call runs (the executors deliver it on a
control channel that does not wait behind the call). The denoising loop asks ``aborted()`` once
per step, and that answer is all-reduced over the world, so every rank stops at the same step.
``progress()`` (also from the control thread) is the number of denoising steps the running (or
last) call has finished on this rank, so a coordinator can follow a request without touching it.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ditserve.parallel.devices import RankDevice, rank_device, visible_gpus

logger = logging.getLogger(__name__)

#: what ``call`` runs: a method name of the loaded stage object, or a function ``fn(worker, *args)``
Target = str | Callable[..., Any]


class RequestAborted(RuntimeError):
    """The request was aborted (its deadline passed or it was cancelled) at a step boundary."""


class RankWorker:
    """One rank of a DiT world or VAE group.

    Args:
        rank: global rank in the group.
        world_size: ranks in the group.
        local_rank: index among the ranks that share this machine's visible GPUs (the local
            executor: the rank; a Ray actor sees only its own GPU: 0).
    """

    def __init__(self, rank: int, world_size: int, local_rank: int | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.placement: RankDevice | None = None
        self.stage: Any = None
        self.groups: Any = None
        self.vae_group: Any = None
        self._store: Any = None
        self._abort = threading.Event()
        self._steps_done = 0  # denoising steps of the running (or last) call; read from the control thread
        self._aborted_call = -1  # an abort may arrive before its call starts here: it still applies
        self._call_id = 0  # the executor's id of the running (or last) call, so progress is never a stale call's

    # ---- start-up -------------------------------------------------------------------------------

    def open_store(self, host: str, timeout_s: float) -> int:
        """Rank 0 only: the rendezvous store on a free port of this machine; returns the port."""
        self._store = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return self._store.port

    def init_distributed(self, host: str, port: int, device: str, timeout_s: float) -> dict[str, str]:
        """Decide this rank's device and backend (``parallel.devices.rank_device``) and join the
        group; ``timeout_s`` bounds the rendezvous and every collective."""
        self.placement = rank_device(device, world_size=self.world_size, local_rank=self.local_rank,
                                     visible_gpus=visible_gpus())
        if self.placement.device.type == "cuda":
            torch.cuda.set_device(self.placement.device)
        if self.world_size > 1:
            timeout = datetime.timedelta(seconds=timeout_s)
            if self._store is None:
                self._store = dist.TCPStore(host, port, self.world_size, is_master=False, timeout=timeout)
            dist.init_process_group(self.placement.backend, store=self._store, rank=self.rank,
                                    world_size=self.world_size, timeout=timeout)
        return {"backend": self.placement.backend, "device": str(self.placement.device)}

    def load(self, config: Any, stages: Sequence[str]) -> dict[str, str]:
        """Build the stage object of ``stages`` for ``config`` (replacing any loaded before: a
        persistent executor serves one configuration after another)."""
        from .stages import build_stage

        assert self.placement is not None, "init_distributed first"
        config = config.model_copy(update={"device": str(self.placement.device)})
        self.stage = None
        self.stage, self.groups, self.vae_group = build_stage(config, stages, aborted=self.aborted,
                                                              on_step=self._stepped)
        return {"model": self.stage.spec.id, "device": str(self.placement.device),
                "dtype": str(config.torch_dtype()), "backend": self.placement.backend}

    # ---- requests -------------------------------------------------------------------------------

    def call(self, target: Target, args: tuple, kwargs: dict, reply: bool, call_id: int = 0) -> Any:
        """Run ``stage.<target>(*args, **kwargs)`` (or ``target(self, *args, **kwargs)``); the
        result goes back only when ``reply``. ``call_id`` tags the call's progress."""
        self._abort.clear()
        self._steps_done = 0
        self._call_id = call_id
        if call_id and self._aborted_call == call_id:  # aborted before it started (see abort)
            self._abort.set()
        try:
            fn = getattr(self.stage, target) if isinstance(target, str) else (lambda *a, **k: target(self, *a, **k))
            result = fn(*args, **kwargs)
        except RequestAborted:
            raise
        except Exception:
            name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
            logger.exception("rank %d: %s failed; the other ranks of this group may block until the collective "
                             "timeout", self.rank, name)
            raise
        return result if reply else None

    def abort(self, call_id: int | None = None) -> int:
        """Ask the running call (or, given, call ``call_id``, even if it has not started here yet) to
        stop at its next step (thread-safe). Returns the steps that call had finished here when the
        abort landed (0: not started here yet)."""
        if call_id is None:
            self._abort.set()
            return self._steps_done
        self._aborted_call = call_id  # written before _call_id is read; call() does the reverse
        if self._call_id == call_id:
            self._abort.set()
            return self._steps_done
        return 0

    def aborted(self) -> bool:
        """Whether any rank was asked to abort; every rank gets the same answer."""
        flag = self._abort.is_set()
        if self.world_size > 1 and dist.is_initialized():
            # collective: one rank's abort stops every rank at the same step, or the others would
            # wait in the next collective for a partner that has left
            value = torch.tensor([int(flag)], device=self.placement.device if self.placement.backend == "nccl" else "cpu")
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flag = bool(value.item())
        return flag

    def _stepped(self, steps_done: int) -> None:
        self._steps_done = steps_done  # an int store: atomic under the GIL, read by progress()

    def progress(self) -> tuple[int, int]:
        """(call id, denoising steps it has finished on this rank) of the running or last call (thread-safe)."""
        return self._call_id, self._steps_done

    def ping(self) -> int:
        return self.rank

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        self.stage = None
        if dist.is_initialized():
            dist.destroy_process_group()
