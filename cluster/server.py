"""Start (or join) a Ray cluster and serve the app: ``ditserve run``, and its orderly stop.

On SIGTERM (what Kubernetes, systemd and docker send) or SIGINT, ``ditserve run`` drains: the
Router stops taking requests (503 with ``Retry-After``; ``/health`` too, so a load balancer moves
on), in-flight requests get up to ``AppConfig.shutdown_grace_s`` to finish, then Serve is shut down
and the process exits 0. Ray's own driver handler (``sys.exit(15)`` and its dump) is replaced.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import ray
from ray import serve

from ditserve.deployments import AppConfig, api_key_digests, build_app

from .serve_config import APP_NAME

logger = logging.getLogger(__name__)


def run_server(cfg: AppConfig, *, host: str, port: int, blocking: bool = True) -> int:
    """Join the cluster at ``RAY_ADDRESS`` (or start a local one) and deploy the app.

    Returns when the app is running unless ``blocking``; then serves until SIGTERM or SIGINT,
    drains (``shutdown_gracefully``) and returns 0.
    """
    api_key_digests(cfg.api_key, cfg.api_key_file)  # an unreadable key file fails here, not in a replica
    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False if not address else None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    print(f"ditserve is serving {cfg.engine.model} at {url}  (POST {url}/v1/images/generations)", flush=True)
    if not blocking:
        return 0
    stop = threading.Event()
    install_stop_handlers(stop)
    while not stop.wait(1.0):
        pass
    router = serve.get_app_handle(APP_NAME)
    shutdown_gracefully(cfg.shutdown_grace_s, lambda: router.drain.remote().result(timeout_s=5), stop=stop)
    return 0


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (the first one drains; a second one during the drain
    cuts it short). Replaces Ray's driver handler, which exits 15 with a dump."""
    count = 0

    def _handler(signum: int, frame: object) -> None:
        nonlocal count
        count += 1
        stop.set()
        if count == 1:
            logger.warning("%s: draining, then shutting down", signal.Signals(signum).name)
        else:
            stop.force = True  # type: ignore[attr-defined]

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)


def shutdown_gracefully(grace_s: float, drain: Callable[[], int], *, stop: threading.Event | None = None,
                        poll_s: float = 0.5, shutdown: Callable[[], None] = serve.shutdown) -> bool:
    """Wait until ``drain()`` (the Router's: it stops new requests and returns those in flight)
    reports none, at most ``grace_s`` seconds (or until a second signal), then ``shutdown()``.

    Returns:
        whether every in-flight request finished within the grace period.
    """
    deadline = time.monotonic() + grace_s
    drained = False
    while True:
        try:
            left = drain()
        except Exception as exc:  # noqa: BLE001 - a dead Router has nothing left to drain
            logger.warning("drain: the Router did not answer (%s); shutting down", type(exc).__name__)
            break
        if left == 0:
            drained = True
            break
        if time.monotonic() >= deadline or getattr(stop, "force", False):
            logger.warning("drain: %d request(s) still in flight after %.0f s; shutting down", left, grace_s)
            break
        time.sleep(poll_s)
    shutdown()
    return drained
