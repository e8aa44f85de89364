"""Serve config files for ``serve deploy`` and KubeRay ``RayService`` (``serveConfigV2``).

The app config travels as the application's ``args`` to ``build_app``: one source of truth for
placement, resources and scaling, validated again by the cluster when it builds the app.
"""

from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from ditserve.deployments import IMPORT_PATH, AppConfig

APP_NAME = "ditserve"


def serve_config(cfg: AppConfig, *, host: str = "0.0.0.0", port: int = 8000) -> dict:
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": cfg.model_dump(mode="json"),
            }
        ],
    }
    ServeDeploySchema.model_validate(config)  # what `serve deploy` will check
    return config


def serve_config_yaml(cfg: AppConfig, *, host: str = "0.0.0.0", port: int = 8000) -> str:
    header = (
        "# ditserve Serve config: `serve deploy serve.yaml` on a running Ray cluster (RAY_ADDRESS),\n"
        "# or paste under a KubeRay RayService's spec.serveConfigV2. Edit `args` to change the app.\n"
    )
    return header + yaml.safe_dump(serve_config(cfg, host=host, port=port), sort_keys=False)
