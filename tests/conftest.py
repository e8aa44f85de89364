"""Shared fixtures: tiny checkpoints built once per test session, no network, a private home."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded, in tests least of all
# Serve handles keep background threads; after ray.shutdown() one of them must not silently
# reconnect the driver (Ray's auto-connect), or tearing the test cluster down fails.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

import pytest  # noqa: E402
from compat_plugin import configure as _configure_compat, pytest_addoption  # noqa: E402,F401


def pytest_configure(config):
    _configure_compat(config)


@pytest.fixture(scope="session", autouse=True)
def _ditserve_home(tmp_path_factory):
    """Built-in models are built into a session-private home, never the user's cache."""
    home = tmp_path_factory.mktemp("ditserve-home")
    old = os.environ.get("DITSERVE_HOME")
    os.environ["DITSERVE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DITSERVE_HOME", None)
    else:
        os.environ["DITSERVE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from ditserve.models.tiny import make_tiny

    return make_tiny("qwen-image", tmp_path_factory.mktemp("tiny-qwen-image"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from ditserve.models.tiny import make_tiny

    return make_tiny("flux", tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_qwen, tiny_flux):
    return {"qwen-image": tiny_qwen, "flux": tiny_flux}


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session: two nodes simulated on this machine.

    Node A ("node_a") has CPUs only; node B ("node_b") also has 4 logical GPUs, so GPU-placed
    stages use exactly the production resource specs (torch stays on the CPU: logical GPUs only
    set CUDA_VISIBLE_DEVICES). Serve's HTTP proxy listens on a free port of 127.0.0.1.
    """
    import socket

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Load reports every 0.5 s instead of 10 s, so autoscaling reacts within a test.
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": {"node_a": 10}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, num_gpus=4, resources={"node_b": 10})
    ray.init(address=cluster.address, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield {"cluster": cluster, "url": f"http://127.0.0.1:{port}"}
    serve.shutdown()
    # The driver's Serve handles keep a metrics-push thread that outlives ray.shutdown and logs a
    # traceback every interval. On Python 3.11, formatting a traceback parses source with `ast`,
    # which is not thread-safe against the main thread's own compiles (pytest's late imports):
    # a run once ended in "SystemError: AST constructor recursion depth mismatch" after all tests
    # passed. Silence Serve's logger before the cluster goes, so that thread formats nothing.
    logging.getLogger("ray.serve").disabled = True
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _local_executors():
    """The persistent local executors (one per role and world size) live for the whole session:
    every multi-rank test loads its configuration into the same processes."""
    yield
    from ditserve.deployments.executor import shutdown_local_executors

    shutdown_local_executors()
