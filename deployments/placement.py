"""Where the app's replicas can go: the builder's start-up checks against the running cluster.

``AppConfig`` is pure data; this module is the one place that asks Ray what the cluster has
(``observe_cluster``) and decides, from the config and that answer, whether ranks take GPUs
(``uses_gpu``) and whether every DiT/VAE replica fits on one node (``check_placement``). Both
checks take the cluster's resources as an argument, so they are plain functions of their inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from .config import AppConfig


@dataclasses.dataclass(frozen=True)
class ClusterResources:
    """What the running Ray cluster offers: one resource dict per alive node, and the totals."""

    nodes: Sequence[Mapping[str, float]]
    totals: Mapping[str, float]


def observe_cluster() -> ClusterResources | None:
    """The resources of the cluster this process is connected to (``None``: Ray not initialized)."""
    import ray

    if not ray.is_initialized():
        return None
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return ClusterResources(nodes, dict(ray.cluster_resources()))


def uses_gpu(cfg: AppConfig, cluster: ClusterResources | None) -> bool:
    """Whether DiT/VAE ranks and the text encoder take GPUs: ``accelerator``, or for ``auto`` whether
    the cluster has GPUs (without a cluster: whether this process sees CUDA)."""
    if cfg.accelerator != "auto":
        return cfg.accelerator == "gpu"
    if cluster is not None:
        return cluster.totals.get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def check_placement(cfg: AppConfig, gpu: bool, cluster: ClusterResources | None) -> None:
    """Refuse, before deploying, a DiT or VAE replica that no node of the cluster can hold (its
    bundles are STRICT_PACKed onto one node). Nothing to check without a cluster or STRICT_PACK."""
    if cluster is None or cfg.placement_strategy != "STRICT_PACK":
        return
    nodes = cluster.nodes
    groups = (
        ("DiT world", cfg.dit_world_size, cfg.dit, cfg.engine.parallel.describe(), "lower the degrees"),
        ("VAE group", cfg.vae_world_size, cfg.vae, f"vae_patch_parallel_size {cfg.vae_world_size}",
         "lower vae_patch_parallel_size"),
    )
    for name, world, opts, layout, fix in groups:
        need_gpu = world * opts.num_gpus if gpu else 0.0
        need_cpu = opts.num_cpus + world * opts.worker_cpus
        if not any(r.get("GPU", 0) >= need_gpu and r.get("CPU", 0) >= need_cpu for r in nodes):
            most_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
            most_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
            raise ValueError(
                f"the {name} of {world} ranks ({layout}) needs {need_gpu:g} GPUs and {need_cpu:g} CPUs on one "
                f"node (placement_strategy=STRICT_PACK); the largest node has {most_gpu:g} GPUs and "
                f"{most_cpu:g} CPUs: {fix} or use placement_strategy=PACK"
            )
