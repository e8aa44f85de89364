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
