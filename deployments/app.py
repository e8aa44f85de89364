"""The app builder: ``AppConfig`` (or its dict) -> the bound Serve graph. It starts nothing.

``build_app`` is the ``import_path`` target of the Serve config files ``ditserve config`` writes
(``ditserve.deployments.app:build_app``, with the config as the app's ``args``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from .config import AppConfig
from .attach import check_support
from .router import Router
from .serving import VAE, DiT, TextEncoder

IMPORT_PATH = "ditserve.deployments.app:build_app"


def build_app(args: AppConfig | Mapping[str, Any] | None = None) -> Application:
    """Bind Router(TextEncoder, DiT, VAE) for one config; each deployment sets its own options."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(dict(args or {}))
    gpu = cfg.uses_gpu()
    cfg.check_placement(gpu)
    check_support(cfg.engine)
    encoder = TextEncoder.options(**TextEncoder.func_or_class.deployment_options(cfg, gpu)).bind(cfg)
    dit = DiT.options(**DiT.func_or_class.deployment_options(cfg, gpu)).bind(cfg, gpu)
    vae = VAE.options(**VAE.func_or_class.deployment_options(cfg, gpu)).bind(cfg, gpu)
    return Router.options(**Router.func_or_class.deployment_options(cfg)).bind(cfg, encoder, dit, vae)
