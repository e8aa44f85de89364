"""The three model deployments: TextEncoder, DiT, VAE.

Each owns its Ray options (``deployment_options(cfg)``). The TextEncoder runs its engine in the
replica (one bundle) and batches concurrent requests. The DiT and VAE replicas are coordinators:
each reserves one placement group (bundle 0 for itself, one bundle per rank) and starts a
``WorkerGroup`` in it; a request is one ``call_all`` (the whole loop runs in the workers).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve

from .config import AppConfig, StageOptions
from .engine import Decoded, Denoised, Encoded, Engine
from .schema import ResolvedRequest
from .worker_group import WorkerGroup

logger = logging.getLogger(__name__)


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
        self.engine = Engine(cfg.engine, stages=["encode"])
        self.encode.set_max_batch_size(cfg.encode_batch_size)
        self.encode.set_batch_wait_timeout_s(cfg.encode_batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode(self, reqs: list[ResolvedRequest]) -> list[Encoded]:
        return self.engine.run_encode(reqs)

    def info(self) -> dict[str, Any]:
        return {"node_id": _node_id(), "model": self.engine.spec.id}


class _GroupCoordinator:
    """A replica that coordinates one worker group in its own placement group."""

    stage: str
    method: str

    def __init__(self, cfg: AppConfig, gpu: bool, workers: int, opts: StageOptions) -> None:
        self.group = WorkerGroup(
            workers,
            cfg.engine,
            [self.stage],
            num_cpus=opts.worker_cpus,
            num_gpus=opts.num_gpus if gpu else 0.0,
            resources=_resources(opts),
            placement_group=ray.util.get_current_placement_group(),
            timeout_s=cfg.distributed_timeout_s,
        )
        logger.info("%s worker group ready: %s", type(self).__name__, self.group.info)

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        # every rank ends with the same result; rank 0's is returned
        return (await self.group.call_all_async(self.method, *args, **kwargs))[0]

    def check_health(self) -> None:
        self.group.check_health()

    def info(self) -> dict[str, Any]:
        return {
            "node_id": _node_id(),
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "worker_node_ids": self.group.node_ids(),
            "worker_pids": self.group.pids(),
            **self.group.info,
        }


@serve.deployment(name="DiT")
class DiT(_GroupCoordinator):
    """Coordinator of one DiT worker group (one torch.distributed world); one request at a time."""

    stage, method = "denoise", "run_denoise"

    @staticmethod
    def deployment_options(cfg: AppConfig, gpu: bool) -> dict[str, Any]:
        return _worker_group_options(cfg.dit, cfg.dit_world_size, gpu, cfg.placement_strategy)

    def __init__(self, cfg: AppConfig, gpu: bool) -> None:
        super().__init__(cfg, gpu, cfg.dit_world_size, cfg.dit)

    async def denoise(self, req: ResolvedRequest, encoded: Encoded) -> Denoised:
        return await self._call(req, encoded, _request_id())


@serve.deployment(name="VAE")
class VAE(_GroupCoordinator):
    """Coordinator of the VAE workers (``vae_patch_parallel_size``, one torch.distributed group):
    latents -> uint8 images; every worker gets the full latents, decodes its patch (or tiles) and
    ends with the merged image; rank 0's is returned."""

    stage, method = "decode", "run_decode"

    @staticmethod
    def deployment_options(cfg: AppConfig, gpu: bool) -> dict[str, Any]:
        return _worker_group_options(cfg.vae, cfg.vae_world_size, gpu, cfg.placement_strategy)

    def __init__(self, cfg: AppConfig, gpu: bool) -> None:
        super().__init__(cfg, gpu, cfg.vae_world_size, cfg.vae)

    async def decode(self, req: ResolvedRequest, denoised: Denoised, return_latents: bool = False) -> Decoded:
        return await self._call(req, denoised, return_latents=return_latents)
