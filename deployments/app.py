"""The app builder: ``AppConfig`` (or its dict) -> the bound Serve graph. It starts nothing.

``build_app`` is the ``import_path`` target of the Serve config files ``ditserve config`` writes
(``ditserve.deployments.app:build_app``, with the config as the app's ``args``). Everything that
needs the outside world happens here, once, before binding: the cluster's resources are read
(``placement.observe_cluster``) to decide GPUs and check placement, and the checkpoint is read
into the ``ServedModel`` summary bound to the Router (which never opens a model file itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from .config import AppConfig
from .jobs import Jobs
from .placement import check_placement, observe_cluster, uses_gpu
from .router import Router
from .served import describe_served_model
from .serving import VAE, DiT, Prior, TextEncoder

IMPORT_PATH = "ditserve.deployments.app:build_app"


def build_app(args: AppConfig | Mapping[str, Any] | None = None) -> Application:
    """Bind Router(TextEncoder, DiT, VAE, and Prior for a model with an autoregressive prior, and Jobs
    for a video model) for one config; each deployment sets its own options.

    Raises:
        ValueError: a layout no node of the running cluster can hold, or that the model cannot run.
    """
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(dict(args or {}))
    cluster = observe_cluster()
    gpu = uses_gpu(cfg, cluster)
    check_placement(cfg, gpu, cluster)
    served = describe_served_model(cfg.engine)  # runs check_support: every start-up refusal
    encoder = TextEncoder.options(**TextEncoder.func_or_class.deployment_options(cfg, gpu)).bind(cfg)
    dit = DiT.options(**DiT.func_or_class.deployment_options(cfg, gpu)).bind(cfg, gpu)
    vae = VAE.options(**VAE.func_or_class.deployment_options(cfg, gpu)).bind(cfg, gpu)
    prior = Prior.options(**Prior.func_or_class.deployment_options(cfg, gpu)).bind(cfg) if served.prior else None
    jobs = None
    if served.spec.modality.value == "video":  # /v1/videos: the job store, shared by every Router replica
        jobs = Jobs.options(**Jobs.func_or_class.deployment_options(cfg)).bind(cfg, served, encoder, dit, vae, prior)
    return Router.options(**Router.func_or_class.deployment_options(cfg)).bind(cfg, served, encoder, dit, vae, prior,
                                                                               jobs=jobs)
