"""The model deployments: TextEncoder, Prior (models with an autoregressive prior only), DiT, VAE.

Each owns its Ray options (``deployment_options(cfg)``). The TextEncoder runs an ``Encoder`` stage
object in the replica (one bundle) and batches concurrent requests. The Prior runs a ``Prior``
stage object in its replica (one bundle, its own options and scaling: token-by-token decoding is a
different workload from the DiT's); its ``PriorTokens`` reach the DiT replica as an argument, which
joins them to the conditioning (``Encoded.with_prior``) before its ranks denoise. The DiT and VAE
replicas are coordinators: each reserves one placement group (bundle 0 for itself, one bundle per rank) and
starts a ``RayExecutor`` in it whose ranks run a ``Denoiser`` or a ``Decoder``; a request is one
``call_all`` (the whole loop runs in the ranks), answered by rank 0 alone, with the deployment's
``request_timeout_s`` as its deadline.

Progress and cancellation: ``DiT.denoise`` with a ``progress_key`` (a video job's id, or a
synchronous request's id) polls rank 0's step count on the ranks' control thread every
``PROGRESS_PERIOD_S`` and reports it to the ``Jobs`` deployment (video models). When Serve cancels
a coordinator's call (its caller cancelled it or went away), the executor aborts the ranks, waits
for them and re-raises (``ray_executor``); the DiT reports where they stopped.

A dead rank: a request that loses a worker (killed, OOM) fails with ``overload.StageUnavailable``
(HTTP 503 with ``Retry-After``; the log names the rank and its pid) and the coordinator rebuilds its
group in its own placement group while the next request waits for it, so one request fails, not
every request until Serve's health check replaces the replica.

LoRA across replicas: the Router sends a request with adapters to the DiT with the first adapter's
name as Serve's ``multiplexed_model_id``, and each DiT replica registers the adapters it served
with Serve's model multiplexing (``DiT.adapter``), so Serve routes the next request for an adapter
to a replica that holds it (see ``DiT`` for how the two LRUs stay the same).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Any

import ray
from ray import serve

from .config import AppConfig, StageOptions
from .executor import WorkerError
from .metrics import DitMetrics
from .overload import StageUnavailable
from .ray_executor import RayExecutor
from .schema import RequestError, ResolvedRequest
from .stages import Decoded, Denoised, Encoded, EncodedImages, Encoder, PriorTokens
from .stages import Prior as PriorStage

logger = logging.getLogger(__name__)

PROGRESS_PERIOD_S = 0.05  # how often the DiT reads rank 0's step count during a request with a progress key


def _request_id() -> str:
    return serve.context._get_serve_request_context().request_id


def _resources(opts: StageOptions) -> dict[str, float]:
    return {k: v for k, v in opts.custom_resources.items() if v > 0}


def _common_options(opts: StageOptions) -> dict[str, Any]:
    return {
        "max_ongoing_requests": opts.max_ongoing_requests,
        "max_queued_requests": opts.max_queued_requests,
        "autoscaling_config": opts.autoscaling.to_serve(),
        "health_check_period_s": opts.health_check_period_s,
        "health_check_timeout_s": opts.health_check_timeout_s,
    }


def _worker_group_options(opts: StageOptions, workers: int, gpu: bool, strategy: str) -> dict[str, Any]:
    """Bundle 0 holds the coordinator replica; bundles 1..N one rank each."""
    res = _resources(opts)
    coordinator = {"CPU": opts.num_cpus, **res}
    rank = {"CPU": opts.worker_cpus, **res, **({"GPU": opts.num_gpus} if gpu and opts.num_gpus else {})}
    return {
        **_common_options(opts),
        "ray_actor_options": {"num_cpus": opts.num_cpus, "resources": res},
        "placement_group_bundles": [coordinator] + [rank] * workers,
        "placement_group_strategy": strategy,
    }


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@serve.deployment(name="TextEncoder")
class TextEncoder:
    """Tokenizer(s) + text encoder(s); batches concurrent requests whose shapes allow it."""

    @staticmethod
    def deployment_options(cfg: AppConfig, gpu: bool) -> dict[str, Any]:
        opts = cfg.text_encoder
        return {
            **_common_options(opts),
            "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus if gpu else 0.0, "resources": _resources(opts)},
        }

    def __init__(self, cfg: AppConfig) -> None:
        self.encoder = Encoder(cfg.engine, prompt_cache_mb=cfg.text_encoder.prompt_cache_mb)
        self.encode.set_max_batch_size(cfg.encode_batch_size)
        self.encode.set_batch_wait_timeout_s(cfg.encode_batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode(self, reqs: list[ResolvedRequest]) -> list[Encoded]:
        return self.encoder.encode(reqs)

    def info(self) -> dict[str, Any]:
        return {"node_id": _node_id(), "model": self.encoder.spec.id}


@serve.deployment(name="Prior")
class Prior:
    """The autoregressive prior (e.g. GLM-Image's vision-language model): a request -> its prior
    tokens, generated with transformers' ``generate`` and the request's seed; one request at a time
    per replica (``stages.Prior``), off the replica's event loop."""

    @staticmethod
    def deployment_options(cfg: AppConfig, gpu: bool) -> dict[str, Any]:
        opts = cfg.prior
        return {
            **_common_options(opts),
            "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus if gpu else 0.0,
                                  "resources": _resources(opts)},
        }

    def __init__(self, cfg: AppConfig) -> None:
        self.prior = PriorStage(cfg.engine)

    async def generate(self, req: ResolvedRequest) -> PriorTokens:
        return await asyncio.to_thread(self.prior.generate, req)

    def info(self) -> dict[str, Any]:
        return {"node_id": _node_id(), "replica_id": serve.get_replica_context().replica_id.unique_id,
                "pid": os.getpid(), "model": self.prior.spec.id}


class _GroupCoordinator:
    """A replica that coordinates one executor's ranks in its own placement group."""

    stage: str
    method: str

    def __init__(self, cfg: AppConfig, gpu: bool, workers: int, opts: StageOptions) -> None:
        self.request_timeout_s = cfg.request_timeout_s
        self.health_check_timeout_s = opts.health_check_timeout_s
        self._new_executor = lambda: RayExecutor(
            workers,
            cfg.engine,
            [self.stage],
            num_cpus=opts.worker_cpus,
            num_gpus=opts.num_gpus if gpu else 0.0,
            resources=_resources(opts),
            placement_group=ray.util.get_current_placement_group(),
            timeout_s=cfg.distributed_timeout_s,
            startup_timeout_s=max(cfg.distributed_timeout_s, 300.0),
        )
        self.executor = self._new_executor()
        self._rebuilding: asyncio.Future | None = None  # the group being rebuilt after a rank died
        self.rebuilds = 0
        self.pids = [pid for _, pid in ray.get([a.where.remote() for a in self.executor.actors])]
        logger.info("%s ranks ready: %s", type(self).__name__, self.executor.info)

    async def _call(self, *args: Any, method: str | None = None) -> Any:
        """Every rank computes; rank 0 alone sends its result back. A rank that died mid-request
        fails the request with ``StageUnavailable`` (503 with Retry-After: choosing to fail fast
        rather than retry, because the group has to be rebuilt first, which takes as long as a
        load) and the group is rebuilt in this replica, in the same placement group, while the
        next request waits for it; the log names the dead rank and its pid."""
        if self._rebuilding is not None:
            await asyncio.shield(self._rebuilding)
        try:
            return await self.executor.call_all_async(method or self.method, *args, timeout_s=self.request_timeout_s)
        except WorkerError:
            dead = await self._dead_ranks()
            if not dead:
                raise
            name = type(self).__name__
            logger.error("request %s: %s rank(s) %s (pid %s) died mid-request; rebuilding the group", _request_id(),
                         name, dead, [self.pids[r] for r in dead], exc_info=True)
            self._rebuild()
            raise StageUnavailable(name, f"rank(s) {dead} died mid-request; the worker group is being rebuilt") \
                from None

    async def _dead_ranks(self) -> list[int]:
        async def alive(actor: Any) -> bool:
            try:
                await asyncio.wait_for(actor.ping.remote(), timeout=self.health_check_timeout_s)
                return True
            except Exception:  # noqa: BLE001 - dead (RayActorError) or not answering
                return False

        states = await asyncio.gather(*[alive(a) for a in self.executor.actors])
        return [rank for rank, ok in enumerate(states) if not ok]

    def _rebuild(self) -> None:
        old = self.executor

        def build() -> None:
            old.kill()  # frees the ranks' bundles of this replica's placement group for the new ranks
            self.executor = self._new_executor()
            self.pids = [pid for _, pid in ray.get([a.where.remote() for a in self.executor.actors])]
            self.rebuilds += 1
            logger.info("%s group rebuilt: ranks %s", type(self).__name__, self.pids)

        self._rebuilding = asyncio.ensure_future(asyncio.to_thread(build))
        self._rebuilding.add_done_callback(lambda f: setattr(self, "_rebuilding", None) if not f.exception() else None)

    async def check_health(self) -> None:
        # answered from the ranks' control threads, so a long request does not fail it; while the
        # group is rebuilt the replica is healthy, unless the rebuild failed (then Serve replaces it)
        if self._rebuilding is not None:
            if not self._rebuilding.done():
                return
            self._rebuilding.result()
        await self.executor.check_health(timeout_s=self.health_check_timeout_s)

    async def info(self) -> dict[str, Any]:
        where = await self.executor.where()
        return {
            "node_id": _node_id(),
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "worker_node_ids": [node for node, _ in where],
            "worker_pids": [pid for _, pid in where],
            "rebuilds": self.rebuilds,
            **self.executor.info,
        }


def _lora_store_state(worker: Any) -> dict[str, Any] | None:
    """Runs in a DiT rank (``RankWorker``): its LoRA store's counters and what it holds."""
    store = getattr(worker.stage.adapter, "lora_store", None)
    if store is None:
        return None
    return {**store.stats.as_dict(), "on_device": list(store.on_device), "on_cpu": list(store.on_cpu)}


@serve.deployment(name="DiT")
class DiT(_GroupCoordinator):
    """Coordinator of one DiT worker group (one torch.distributed world); one request, or with
    ``dit.max_batch_size`` > 1 one batch of requests (``Denoiser.denoise_batch``), at a time.

    LoRA and Serve's model multiplexing: ``adapter`` is a ``@serve.multiplexed`` method, made in
    ``__init__`` because its capacity is the deployment's ``lora.max_loras_per_replica``. Its
    "model" is only a token (the adapter's name): the ranks' ``LoraStore`` does the real loading,
    inside the request, with an LRU of the same capacity, so what Serve believes this replica holds
    (and reports to every caller's router) is what its ranks hold. ``denoise`` touches the token of
    each of the request's adapters, in the request's order, once the ranks have answered: for every
    request that succeeds both LRUs see the same adapters in the same order (one request at a time),
    so Serve evicts its least recently used token when the store evicts that adapter from the device
    (the token holds nothing: Serve's eviction frees nothing here), and an adapter that failed to load
    is never advertised. A failed request may still have touched the store's order (its good
    adapters); the cost of that drift is at most one misrouted request that reloads an adapter.
    Serve routes on the device LRU only: the ranks' CPU tier (``max_cpu_loras``) is a faster reload.
    """

    stage, method = "denoise", "denoise"

    @staticmethod
    def deployment_options(cfg: AppConfig, gpu: bool) -> dict[str, Any]:
        options = _worker_group_options(cfg.dit, cfg.dit_world_size, gpu, cfg.placement_strategy)
        # batching: the requests of a batch must all be inside the replica to meet there; the
        # replica still runs one executor call (a request or a batch) at a time
        options = {**options, "max_ongoing_requests": cfg.dit.max_batch_size}
        if cfg.dit.request_router == "least_cost":
            from ray.serve.config import RequestRouterConfig

            from .routing import ROUTER_PATH

            options["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER_PATH)
        return options

    def __init__(self, cfg: AppConfig, gpu: bool) -> None:
        super().__init__(cfg, gpu, cfg.dit_world_size, cfg.dit)
        self.metrics = DitMetrics()
        self.max_batch_size = cfg.dit.max_batch_size
        self._one_call = asyncio.Lock()  # a batch and a request that runs alone never share the ranks
        self._denoise_batch.set_max_batch_size(cfg.dit.max_batch_size)
        self._denoise_batch.set_batch_wait_timeout_s(cfg.dit.batch_wait_timeout_s)
        self._jobs: Any = None  # the Jobs deployment's handle, made at the first progress report
        self.lora_requests: collections.Counter[str] = collections.Counter()  # served requests per adapter
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # served requests by their batch's size

        # a fresh function per replica: Serve keeps the LRU on the decorated function object
        async def adapter(model_id: str) -> str:
            return model_id

        self.adapter = serve.multiplexed(max_num_models_per_replica=cfg.engine.lora.max_loras_per_replica)(adapter)

    async def denoise(self, req: ResolvedRequest, encoded: Encoded, prior: PriorTokens | None = None,
                      images: EncodedImages | None = None, progress_key: str | None = None) -> Denoised:
        # prior: an autoregressive prior's tokens (GLM-Image); images: the input images' latents
        # (editing), from the VAE's encode; progress_key: report rank 0's steps to the Jobs deployment
        if self.max_batch_size > 1 and prior is None and images is None and progress_key is None:
            # batching on: the request meets others in ``_denoise_batch`` (a job reporting progress,
            # an editing request or a prior's tokens run alone, below)
            denoised = await self._denoise_batch((req, encoded, _request_id()))
            if isinstance(denoised, RequestError):  # refused on its own account; its batch-mates ran
                raise denoised
        else:
            async with self._one_call:
                denoised = await self._denoise_alone(req, encoded, prior, images, progress_key)
        batch = next((r.batch for r in reversed(denoised.reports) if r.stage == "denoise"), None)
        size = batch["size"] if batch else 1
        self.batch_sizes[size] += 1
        self.metrics.batched(req.model, size)
        if req.lora:
            for lora in req.lora:
                await self.adapter(lora.name)
                self.lora_requests[lora.name] += 1
            report = next((r.lora for r in reversed(denoised.reports) if r.stage == "denoise"), None)
            self.metrics.lora_report(req.model, report)
        return denoised

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.01)
    async def _denoise_batch(self, items: list[tuple[ResolvedRequest, Encoded, str]]) -> list[Denoised]:
        """The requests Serve gathered (up to ``max_batch_size``), as one call of the ranks'
        ``Denoiser.denoise_batch``: those that can share a forward are denoised as one batch."""
        async with self._one_call:
            return await self._call(items, method="denoise_batch")  # a dead rank: 503 and a rebuild, as alone

    async def _denoise_alone(self, req: ResolvedRequest, encoded: Encoded, prior: PriorTokens | None,
                             images: EncodedImages | None, progress_key: str | None) -> Denoised:
        extra = (None, images) if images is not None else ()
        watcher = asyncio.ensure_future(self._watch(progress_key)) if progress_key else None
        before = self.executor.stopping  # a previous cancel's stop: not this call's
        try:
            denoised = await self._call(req, encoded.with_prior(prior), _request_id(), *extra)
        except asyncio.CancelledError:
            if progress_key and self.executor.stopping is not before:
                # from a task of its own: Serve may cancel this one again before the ranks have stopped
                asyncio.ensure_future(self._report_stop(progress_key, self.executor.stopping))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if progress_key:
            self._report(progress_key, steps_done=req.params.num_inference_steps)
        return denoised

    async def _report_stop(self, key: str, stopping: asyncio.Future | None) -> None:
        """Once the cancelled call's ranks have stopped: where the cancel reached them and where they stopped."""
        if stopping is not None:
            at, stopped = await stopping
            self._report(key, steps_done=stopped, cancelled_at_step=at, stopped_at_step=stopped)

    def cancels(self) -> list[tuple[int, int]]:
        """The latest cancels of this replica's group (at most 100), oldest first: (steps rank 0 had
        finished when the cancel arrived, steps when every rank had stopped). Tests, operators: how
        fast a disconnect or a timeout freed the ranks. A cancelled call's handler may end before
        its ranks have stopped; the entry appears when they have."""
        return list(self.executor.cancels)

    def _report(self, key: str, **progress: int) -> None:
        """Send progress to the Jobs deployment (fire and forget: a lost report only delays progress)."""
        try:
            if self._jobs is None:
                self._jobs = serve.get_deployment_handle("Jobs", serve.get_replica_context().app_name)
            self._jobs.report.remote(key, **progress)
        except Exception:  # noqa: BLE001 - an app without Jobs (image models): progress has nowhere to go
            logger.debug("progress of %s not reported", key, exc_info=True)

    async def _watch(self, key: str) -> None:
        """Report rank 0's step count under ``key`` while the call runs (0 at once: the job is running)."""
        last = -1
        while True:
            try:
                steps = await self.executor.progress() if last >= 0 else 0
            except Exception:  # noqa: BLE001 - a rank gone: the call itself fails and says so
                return
            if steps != last:
                self._report(key, steps_done=steps)
                last = steps
            await asyncio.sleep(PROGRESS_PERIOD_S)

    async def batch_stats(self) -> dict[str, Any]:
        """This replica's requests by the size of the batch they were denoised in
        (``requests_by_batch_size``; 1: alone) and its ``replica_id`` (tests, operators:
        ``handle.broadcast("batch_stats")``)."""
        return {"replica_id": serve.get_replica_context().replica_id.unique_id,
                "requests_by_batch_size": dict(self.batch_sizes)}

    async def lora_stats(self) -> dict[str, Any]:
        """This replica's adapters: rank 0's store counters (``loads``, ``hits``, ``restores``,
        ``evictions``, ``load_s``) and what it holds (``on_device``, ``on_cpu``), the requests it
        served per adapter (``requests``) and the ``replica_id`` (tests, operators:
        ``handle.broadcast("lora_stats")`` asks every replica)."""
        state = await self.executor.call_all_async(_lora_store_state, timeout_s=self.health_check_timeout_s)
        return {"replica_id": serve.get_replica_context().replica_id.unique_id,
                "requests": dict(self.lora_requests), **(state or {})}


@serve.deployment(name="VAE")
class VAE(_GroupCoordinator):
    """Coordinator of the VAE workers (``vae_patch_parallel_size``, one torch.distributed group):
    latents -> uint8 images; every worker gets the full latents, decodes its patch (or tiles) and
    ends with the merged image; rank 0's is returned."""

    stage, method = "decode", "decode"

    @staticmethod
    def deployment_options(cfg: AppConfig, gpu: bool) -> dict[str, Any]:
        return _worker_group_options(cfg.vae, cfg.vae_world_size, gpu, cfg.placement_strategy)

    def __init__(self, cfg: AppConfig, gpu: bool) -> None:
        super().__init__(cfg, gpu, cfg.vae_world_size, cfg.vae)

    async def decode(self, req: ResolvedRequest, denoised: Denoised, return_latents: bool = False) -> Decoded:
        return await self._call(req, denoised, return_latents)

    async def encode(self, req: ResolvedRequest) -> EncodedImages:
        """Input images -> their latents (editing): every worker encodes whole (patch parallel splits
        decode only), rank 0 answers."""
        return await self._call(req, method="encode")
