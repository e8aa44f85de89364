"""The one check every family's layout tests share: N local ranks give the single-rank reference
(fp32, latents and images within 1e-4), every rank ends with bit-identical latents (collective
decisions may rely on it), and sequence-parallel ranks did talk."""

from __future__ import annotations

import torch

from ditserve.deployments import EngineConfig
from ditserve.deployments.local import run_local
from ditserve.parallel import ParallelConfig


def layout_ids(degrees: dict) -> str:
    return "_".join(f"{k.split('_')[0]}{v}" for k, v in degrees.items())


def run_and_compare(model: str, degrees: dict, requests: list, references: list, **engine) -> list[list[dict]]:
    """Run ``requests`` on the layout ``degrees`` and assert it equals ``references``; returns
    every rank's results for further checks.

    Args:
        engine: further ``EngineConfig`` fields of the layout (e.g. ``offload``).
    """
    config = EngineConfig(model=model, device="cpu", parallel=ParallelConfig(**degrees), **engine)
    ranks = run_local(config, requests)
    assert len(ranks) == config.parallel.world_size
    for rank, results in enumerate(ranks):
        for ref, got in zip(references, results):
            assert float((got["latents"] - ref.latents).abs().max()) <= 1e-4, (rank, degrees)
            assert float(abs(got["images"] - ref.images).max()) <= 1e-4, (rank, degrees)
    for results in ranks[1:]:
        for a, b in zip(ranks[0], results):
            assert torch.equal(a["latents"], b["latents"])
    if config.parallel.sp_degree > 1:
        assert all(r["bytes_sent"] > 0 for r in ranks[0])
    return ranks


def serve_and_compare(name: str, engine: dict, requests: list, references: list, check=None, *,
                      app: dict | None = None, route_prefix: str | None = None,
                      max_changed_fraction: float = 1.0) -> None:
    """Deploy the graph for ``engine`` (``EngineConfig`` fields; the session's simulated cluster) as
    app ``name``, and assert every request answered through the handle equals its in-process
    ``references`` entry (latents within 1e-4, images within one uint8 level, on at most
    ``max_changed_fraction`` of the values); ``check(name)`` runs once the app is up (placement
    assertions). ``app``: further ``AppConfig`` fields (a stage's options); ``route_prefix``: serve it
    over HTTP there too."""
    import numpy as np
    from ray import serve

    from ditserve.deployments.app import build_app
    from ditserve.deployments.config import AppConfig

    cfg = AppConfig.model_validate({
        "engine": {"device": "cpu", **engine},
        "accelerator": "gpu",
        "distributed_timeout_s": 60,
        "text_encoder": {"num_cpus": 0.1, "num_gpus": 0},
        **(app or {}),
    })
    handle = serve.run(build_app(cfg), name=name, route_prefix=route_prefix)
    try:
        if check is not None:
            check(name)
        for req, ref in zip(requests, references):
            got = handle.generate.remote(req, "np", True).result()
            assert float((got.latents - ref.latents).abs().max()) <= 1e-4, name
            diff = np.abs(np.stack(got.images).astype(int) - (ref.images * 255).round().astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() <= max_changed_fraction, name
    finally:
        serve.delete(name)
