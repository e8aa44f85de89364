"""Start (or join) a Ray cluster and serve the app: ``ditserve run``."""

from __future__ import annotations

import logging
import os
import time

import ray
from ray import serve

from ditserve.deployments import AppConfig, build_app

from .serve_config import APP_NAME

logger = logging.getLogger(__name__)


def run_server(cfg: AppConfig, *, host: str, port: int, blocking: bool = True) -> int:
    """Join the cluster at ``RAY_ADDRESS`` (or start a local one) and deploy the app.

    Returns when the app is running unless ``blocking``; then serves until interrupted.
    """
    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False if not address else None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    print(f"ditserve is serving {cfg.engine.model} at {url}  (POST {url}/v1/images/generations)", flush=True)
    if not blocking:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
