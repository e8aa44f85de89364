"""How the app meets a cluster: Serve config files round-trip, `ditserve run`, autoscaling."""

from __future__ import annotations

import concurrent.futures
import time
import urllib.parse

import pytest
import yaml
from PIL import Image
from ray import serve
from ray.serve.exceptions import RequestCancelledError
from ray.serve.schema import ServeDeploySchema

from ditserve.cluster.cli import main
from ditserve.cluster.serve_config import APP_NAME
from ditserve.cluster.server import run_server
from ditserve.deployments import GenerationRequest
from ditserve.deployments.app import build_app
from ditserve.deployments.config import AppConfig

pytestmark = pytest.mark.timeout(600)

def _wait_running(app: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.5)
    raise TimeoutError(f"app {app} not RUNNING after {timeout_s}s: {serve.status().applications.get(app)}")

def test_config_file_round_trips_and_serves(ray_cluster, tiny_qwen, tmp_path, capsys):
    port = urllib.parse.urlparse(ray_cluster["url"]).port
    assert main(["config", "--model", str(tiny_qwen), "--accelerator", "gpu", "--host", "127.0.0.1",
                 "--port", str(port), "--dit-max-replicas", "2"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "serve.yaml").write_text(text)

    config = ServeDeploySchema.model_validate(yaml.safe_load(text))  # what `serve deploy` checks
    app = config.applications[0]
    assert app.import_path == "ditserve.deployments.app:build_app"
    cfg = AppConfig.model_validate(app.args)
    assert cfg.engine.model == str(tiny_qwen) and cfg.dit.autoscaling.max_replicas == 2

    # Deploy the file as `serve deploy serve.yaml` does, then call it over HTTP via the CLI.
    serve.context._get_global_client().deploy_apps(config, _blocking=False)
    try:
        _wait_running(APP_NAME)
        out = tmp_path / "remote.png"
        assert main(["generate", "--server", ray_cluster["url"], "--prompt", "a red circle", "--size", "64x32",
                     "--num-inference-steps", "2", "--seed", "3", "--output", str(out)]) == 0
        with Image.open(out) as image:
            assert image.size == (64, 32) and image.format == "PNG"
        assert "seed=3" in capsys.readouterr().out
        assert main(["generate", "--server", ray_cluster["url"], "--prompt", "x", "--size", "65x32",
                     "--output", str(tmp_path / "bad.png")]) == 2
        assert "422: size: width 65 is not a multiple of 16" in capsys.readouterr().err
    finally:
        serve.delete(APP_NAME)

def test_run_server_joins_the_running_cluster(ray_cluster, tiny_flux):
    cfg = AppConfig(engine={"model": str(tiny_flux), "device": "cpu"}, accelerator="gpu")
    port = urllib.parse.urlparse(ray_cluster["url"]).port
    assert run_server(cfg, host="127.0.0.1", port=port, blocking=False) == 0
    try:
        handle = serve.get_app_handle(APP_NAME)
        result = handle.generate.remote(GenerationRequest(prompt="a star", size="64x64", num_inference_steps=2,
                                                          seed=1, guidance_scale=4.0)).result()
        assert result.images[0].size == (64, 64) and result.model == str(tiny_flux)
    finally:
        serve.delete(APP_NAME)

def _dit_replicas(app: str) -> int:
    dep = serve.status().applications[app].deployments["DiT"]
    return dep.replica_states.get("RUNNING", 0)

def test_dit_autoscales_up_under_a_burst_and_back_down(ray_cluster, tiny_qwen):
    app = "autoscale-test"
    fast = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
            "downscale_delay_s": 2, "look_back_period_s": 1, "metrics_interval_s": 0.25}
    cfg = AppConfig.model_validate({
        "engine": {"model": str(tiny_qwen), "device": "cpu"},
        "accelerator": "gpu",
        "text_encoder": {"num_cpus": 0.1, "num_gpus": 0, "max_ongoing_requests": 16},
        "dit": {"autoscaling": fast},
    })
    handle = serve.run(build_app(cfg), name=app, route_prefix=None)
    try:
        assert _dit_replicas(app) == 1
        # ~2 s of denoising each: a burst long enough for a second replica to start; once it runs,
        # the rest of the burst is cancelled (the ranks stop at their next step), which is what
        # lets the deployment scale back down without computing the whole burst
        req = GenerationRequest(prompt="a cat", size="256x256", num_inference_steps=200, seed=0)
        responses = [handle.generate.remote(req) for _ in range(16)]
        peak = 1
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(r.result) for r in responses]
            while not all(f.done() for f in futures) and peak < 2:
                peak = max(peak, _dit_replicas(app))
                time.sleep(0.25)
            for response, future in zip(responses, futures):
                if not future.done():
                    response.cancel()
            answered, cancelled = set(), 0
            for future in futures:
                try:  # any other error fails the test
                    answered.add(future.result().request_id)
                except RequestCancelledError:
                    cancelled += 1
        assert len(answered) + cancelled == 16  # each answered once, with its own id, or cancelled by us
        assert peak == 2, "the DiT deployment did not scale up to 2 replicas under the burst"
        deadline = time.time() + 90
        while _dit_replicas(app) != 1 and time.time() < deadline:
            time.sleep(0.5)
        assert _dit_replicas(app) == 1, "the DiT deployment did not scale back down to 1 replica"
    finally:
        serve.delete(app)

def test_worker_that_cannot_be_placed_fails_with_a_clear_message(ray_cluster, tiny_qwen):
    from ditserve.deployments import EngineConfig
    from ditserve.deployments.executor import WorkerError
    from ditserve.deployments.ray_executor import RayExecutor

    with pytest.raises(WorkerError, match=r"start: rank\(s\) \[0\] did not answer within 3s"):
        RayExecutor(1, EngineConfig(model=str(tiny_qwen)), ["decode"], num_cpus=0.1, num_gpus=0,
                    resources={"no_such_node": 1}, placement_group=None, timeout_s=3)

def test_long_request_completes_then_a_dead_worker_gets_its_replica_replaced(ray_cluster, tiny_qwen):
    """One app (each deploy costs tens of seconds), two lifecycle facts in order:

    1. A request that runs for longer than twice the health-check timeout and longer than the
       collective timeout completes, on the same DiT replica and ranks: health pings are answered
       from the ranks' control threads, and a request's deadline is request_timeout_s (none here),
       not distributed_timeout_s.
    2. Then a DiT rank is SIGKILLed: the health check fails, the replica is replaced, and the next
       request gives the same image as before."""
    import os
    import signal

    app = "health-test"
    cfg = AppConfig.model_validate({
        "engine": {"model": str(tiny_qwen), "device": "cpu"},
        "accelerator": "gpu",
        "distributed_timeout_s": 2,
        "text_encoder": {"num_cpus": 0.1, "num_gpus": 0},
        "dit": {"health_check_period_s": 1, "health_check_timeout_s": 1},
    })
    handle = serve.run(build_app(cfg), name=app, route_prefix=None)
    try:
        dit = serve.get_deployment_handle("DiT", app)
        info = dit.info.remote().result()
        long = GenerationRequest(prompt="a cat", size="640x640", num_inference_steps=200, seed=0)
        result = handle.generate.remote(long, "np").result(timeout_s=300)
        assert result.timings["denoise"] > 2.0, f"precondition: denoising took only {result.timings['denoise']:.2f} s"
        after = dit.info.remote().result()
        assert (after["replica_id"], after["worker_pids"]) == (info["replica_id"], info["worker_pids"])

        req = GenerationRequest(prompt="a cat", size="64x64", num_inference_steps=2, seed=0)
        before = handle.generate.remote(req, "np").result()
        os.kill(info["worker_pids"][0], signal.SIGKILL)  # a crashed rank
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if dit.info.remote().result(timeout_s=10)["replica_id"] != info["replica_id"]:
                    break
            except Exception:  # the old replica is going away
                pass
            time.sleep(1)
        else:
            pytest.fail("the DiT replica with a dead worker was not replaced")
        _wait_running(app)
        again = handle.generate.remote(req, "np").result()
        assert (again.images[0] == before.images[0]).all()
    finally:
        serve.delete(app)


def test_ray_ranks_abort_past_the_request_deadline_and_serve_the_next(ray_cluster, tiny_qwen):
    """The served executor's deadline: past request_timeout_s the coordinator aborts the ranks
    through their control threads, they stop at the same step, and the same actors serve the next
    request exactly. And (the same group: each start costs seconds) a group's errors name the rank."""
    import asyncio

    from ditserve.deployments import Engine, EngineConfig
    from ditserve.deployments.executor import RequestTimeoutError, WorkerError
    from ditserve.deployments.ray_executor import RayExecutor
    from ditserve.deployments.stages import Encoded
    from ditserve.parallel import ParallelConfig

    config = EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(ulysses_degree=2))
    group = RayExecutor(2, config, ["denoise"], num_cpus=0.1, num_gpus=0, resources={}, placement_group=None,
                        timeout_s=60)
    reference = Engine(EngineConfig(model=str(tiny_qwen), device="cpu"))

    def inputs(**fields):
        req = reference.resolve(GenerationRequest(prompt="a cat", seed=0, **fields))
        return req, Encoded(reference.encode(req), ())

    try:
        assert group.info["backend"] == "gloo"
        asyncio.run(group.check_health())
        with pytest.raises(RequestTimeoutError, match="request deadline of 0.5 s"):
            asyncio.run(group.call_all_async("denoise", *inputs(size="256x256", num_inference_steps=200), "slow",
                                             timeout_s=0.5))
        req, encoded = inputs(size="64x64", num_inference_steps=2)
        got = asyncio.run(group.call_all_async("denoise", req, encoded, "quick", timeout_s=60))
        ref = reference.denoise(req, encoded.cond)
        assert float((got.latents - ref).abs().max()) <= 1e-4
        with pytest.raises(WorkerError, match="no_such_method failed on rank 0"):
            group.call_all("no_such_method")
    finally:
        group.kill()
