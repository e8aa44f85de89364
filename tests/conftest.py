"""Shared fixtures: tiny checkpoints built once per test session, no network, a private home."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded, in tests least of all

import pytest  # noqa: E402


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
