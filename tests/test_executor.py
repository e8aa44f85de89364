"""The executor contract: one verb to every rank, one reply; a request's deadline apart from the
collective timeout; one decision of device and backend per rank, used by both executors."""

from __future__ import annotations

import pytest
import torch

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, ParallelEngine
from ditserve.deployments.executor import RequestTimeoutError, WorkerError, local_executor
from ditserve.parallel import ParallelConfig
from ditserve.parallel.devices import rank_device

pytestmark = pytest.mark.timeout(300)


# ---- device and backend: one function for every rank (bug: auto + 2 ranks on a GPU box) -------------

@pytest.mark.parametrize(("device", "world", "local_rank", "gpus", "expected"), [
    ("cpu", 2, 1, 4, ("cpu", "gloo")),              # cpu stays cpu, even where CUDA is visible
    ("auto", 1, 0, 0, ("cpu", "gloo")),
    ("auto", 2, 1, 0, ("cpu", "gloo")),
    ("auto", 2, 1, 2, ("cuda:1", "nccl")),          # was: every local rank on cuda:0 over gloo
    ("auto", 1, 0, 1, ("cuda:0", "nccl")),
    ("cuda", 4, 3, 4, ("cuda:3", "nccl")),
    ("cuda", 2, 0, 1, ("cuda:0", "nccl")),          # a Ray actor sees its own GPU as cuda:0
    ("cuda:1", 1, 0, 2, ("cuda:1", "nccl")),
])
def test_rank_device_decides_device_and_backend_together(device, world, local_rank, gpus, expected):
    got = rank_device(device, world_size=world, local_rank=local_rank, visible_gpus=gpus)
    assert (str(got.device), got.backend) == expected


@pytest.mark.parametrize(("device", "world", "local_rank", "gpus", "message"), [
    ("cuda", 2, 0, 0, "device='cuda': no CUDA GPU is visible"),
    ("auto", 4, 2, 2, "4 ranks need one GPU each .* sees 2; lower the parallel degrees or use device='cpu'"),
    ("cuda:1", 2, 0, 2, "pins every one of the 2 ranks to one GPU; use device='cuda'"),
    ("cuda:3", 1, 0, 2, "only 2 GPU"),
    ("tpu", 1, 0, 0, "device='tpu' is not a device ditserve runs on"),
])
def test_rank_device_refuses_what_cannot_run(device, world, local_rank, gpus, message):
    with pytest.raises(ValueError, match=message):
        rank_device(device, world_size=world, local_rank=local_rank, visible_gpus=gpus)


# ---- the verb ----------------------------------------------------------------------------------------


def _rank_and_size(worker, scale: int) -> tuple[int, int]:
    return worker.rank * scale, worker.world_size


def _fail_on_rank_1(worker) -> int:
    if worker.rank == 1:
        raise RuntimeError("boom")
    return worker.rank


def test_only_the_reply_rank_answers():
    executor = local_executor(2, role="functions")
    assert executor.call_all(_rank_and_size, 10, reply_rank=1) == (10, 2)
    assert executor.call_all(_rank_and_size, 10) == (0, 2)
    assert executor.call_all(_rank_and_size, 10, reply_rank=None) == [(0, 2), (10, 2)]


def test_a_failing_rank_is_named_and_the_executor_stays_usable():
    executor = local_executor(2, role="functions")
    with pytest.raises(WorkerError, match="(?s)_fail_on_rank_1 failed on rank 1:.*RuntimeError: boom"):
        executor.call_all(_fail_on_rank_1)
    assert executor.call_all(_rank_and_size, 1, reply_rank=None) == [(0, 2), (1, 2)]


# ---- a request's deadline is not the collective timeout ---------------------------------------------


def test_request_deadline_aborts_every_rank_and_the_group_serves_the_next_request(tiny_qwen):
    config = EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(ulysses_degree=2))
    engine = ParallelEngine(config, request_timeout_s=0.5)
    slow = GenerationRequest(prompt="a cat", size="128x128", num_inference_steps=200, seed=0)
    with pytest.raises(RequestTimeoutError, match="request deadline of 0.5 s; the ranks were aborted"):
        engine.generate(slow)
    # both ranks stopped at the same step (the abort is all-reduced), so no collective is left
    # half-done and the same processes serve the next request exactly
    engine.request_timeout_s = None
    quick = GenerationRequest(prompt="a cat", size="64x64", num_inference_steps=2, seed=3)
    got = engine.generate(quick, output_type="np")
    ref = Engine(EngineConfig(model=str(tiny_qwen), device="cpu")).generate(quick, output_type="np")
    assert float((got.latents - ref.latents).abs().max()) <= 1e-4


def test_requests_longer_than_the_collective_timeout_complete(tiny_qwen, monkeypatch):
    """The collective timeout bounds one collective, not a request: a request of many steps that
    runs longer than it completes (it used to fail while the ranks kept computing)."""
    from ditserve.deployments.executor import LocalExecutor

    executor = LocalExecutor(2, device="cpu", timeout_s=2.0)
    try:
        config = EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(ring_degree=2))
        executor.load(config, ["denoise"])
        engine = Engine(config.model_copy(update={"parallel": ParallelConfig()}), ["encode"])
        req = engine.resolve(GenerationRequest(prompt="a cat", size="384x384", num_inference_steps=200, seed=0))
        from ditserve.deployments.stages import Encoded

        import time

        start = time.perf_counter()
        denoised = executor.call_all("denoise", req, Encoded(engine.encode(req), ()), "long")
        elapsed = time.perf_counter() - start
        assert elapsed > 2.0, f"precondition: the request ({elapsed:.2f} s) must outlast the 2 s collective timeout"
        assert torch.isfinite(denoised.latents).all()
    finally:
        executor.shutdown()
