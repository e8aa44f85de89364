"""Overload, deadlines, disconnects and a dead worker on one served tiny Qwen-Image app (one deploy
for the file: each costs tens of seconds), and the pure overload rules (``deployments/overload.py``)
without a cluster.

The served app has a DiT queue of 2 (bound: 2 queued + 1 running per Router replica), a 60 s cap on
``timeout_s`` and a cost budget. In order: 3x the bound at once gets only 200s (each the reference
image) and 429s naming the DiT, no replica restarted; ``timeout_s`` gets a 504 and the ranks stop;
caps are 422s naming the field; a client that disconnects frees the ranks within two steps (rank
0's step counter) and is counted as cancelled; a DiT rank SIGKILLed mid-request gives that request a
503 (Retry-After, no pid in the body), the log names the dead rank, the group is rebuilt in the same
replica and the next request is the reference image (a dead VAE worker: the same); the open-loop
load client (``benchmarks/load.py``) at a rate above capacity gets an answer for every request.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import pathlib
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from ditserve.deployments.config import AppConfig
from ditserve.deployments.overload import (
    Admission,
    StageBusy,
    check_cost,
    check_timeout,
    request_cost,
    stage_bounds,
)
from ditserve.deployments.schema import GenerationRequest, RequestError, resolve_request

pytestmark = pytest.mark.timeout(600)

APP = "reliability-test"
QUICK = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "seed": 0}
# ~25 s of denoising on one core: a timeout, disconnect or kill lands inside the denoising loop
LONG = {"prompt": "a long one", "size": "1024x1024", "num_inference_steps": 200, "seed": 1}
BUDGET = 1024 * 1024 * 200  # LONG fits (one CFG branch: no negative prompt); two of it do not


# ---- without a cluster ---------------------------------------------------------------------------


def test_stage_bounds_take_each_stages_queue_and_what_its_replicas_hold():
    cfg = AppConfig.model_validate({"dit": {"max_queued_requests": 2, "autoscaling": {"max_replicas": 3}},
                                    "vae": {"max_queued_requests": -1}})
    bounds = stage_bounds(cfg)
    assert bounds == {"text_encoder": 64 + 16, "dit": 2 + 3}  # the VAE is unbounded; no prior
    assert "prior" in stage_bounds(cfg, with_prior=True)


def test_admission_refuses_past_the_smallest_bound_naming_its_stage():
    gate = Admission({"text_encoder": 5, "dit": 2})
    with gate.admit(), gate.admit():
        with pytest.raises(StageBusy, match=r"^DiT: queue full .*dit.max_queued_requests"):
            with gate.admit():
                pass
    assert gate.in_flight == 0 and gate.refused == 1
    with gate.admit():  # a slot frees when a request ends, even one that failed
        pass
    unbounded = Admission({})
    with unbounded.admit(), unbounded.admit():
        assert unbounded.in_flight == 2


def test_timeout_above_the_cap_is_a_422_naming_timeout_s():
    assert check_timeout(None, 10) is None and check_timeout(5, 10) == 5
    with pytest.raises(RequestError, match="max_timeout_s=10") as err:
        check_timeout(11, 10)
    assert err.value.field == "timeout_s" and err.value.status == 422


def test_cost_counts_n_pixels_frames_steps_and_cfg_branches(tiny_qwen):
    from ditserve.deployments.served import describe_served_model
    from ditserve.deployments import EngineConfig

    spec = describe_served_model(EngineConfig(model=str(tiny_qwen), device="cpu")).spec
    one = resolve_request(GenerationRequest(prompt="x", size="64x32", num_inference_steps=3), spec)
    assert request_cost(one) == 1 * 64 * 32 * 1 * 3 * (2 if one.negative_prompt is not None else 1)
    cfg = resolve_request(GenerationRequest(prompt="x", size="64x32", num_inference_steps=3, n=2,
                                            negative_prompt="blur", true_cfg_scale=4.0), spec)
    assert request_cost(cfg) == 2 * 64 * 32 * 3 * 2
    defaults = {"steps": spec.num_inference_steps, "pixels": spec.default_width * spec.default_height, "frames": 1}
    check_cost(cfg, request_cost(cfg), defaults)  # at the budget: accepted
    check_cost(cfg, None, defaults)  # no budget
    big_n = resolve_request(GenerationRequest(prompt="x", size="64x32", num_inference_steps=3, n=10), spec)
    with pytest.raises(RequestError, match=r"max_request_cost=100\b.*lower n") as err:
        check_cost(big_n, 100, defaults)
    assert err.value.field == "n"
    many_steps = resolve_request(GenerationRequest(prompt="x", size="64x32", num_inference_steps=200), spec)
    with pytest.raises(RequestError) as err:
        check_cost(many_steps, 100, defaults)
    assert err.value.field == "num_inference_steps"


def test_error_bodies_name_a_served_folder_by_its_name_not_its_path():
    from ditserve.deployments.security import host_paths, redact_paths

    pairs = host_paths("/srv/models/qwen-tiny", "/srv/loras")
    message = "size: width 65 is not a multiple of 16 for model /srv/models/qwen-tiny; /srv/loras/x.safetensors"
    assert redact_paths(message, pairs) == "size: width 65 is not a multiple of 16 for model qwen-tiny; " \
                                           "lora_dir/x.safetensors"
    assert host_paths("Qwen/Qwen-Image", None) == []  # a registry id is not a path


# ---- served --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_qwen):
    from ray import serve

    from ditserve.deployments.app import build_app

    cfg = AppConfig.model_validate({
        "engine": {"model": str(tiny_qwen), "device": "cpu", "dtype": "float32"},
        "accelerator": "gpu",
        "distributed_timeout_s": 10,
        "text_encoder": {"num_cpus": 0.1, "num_gpus": 0},
        "dit": {"max_queued_requests": 2},
        "max_timeout_s": 60,
        "max_request_cost": BUDGET,
    })
    handle = serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield {"handle": handle, "url": ray_cluster["url"], "dit": serve.get_deployment_handle("DiT", APP),
           "model": str(tiny_qwen)}
    serve.delete(APP)


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + "/v1/images/generations", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), {k.lower(): v for k, v in exc.headers.items()}


def _image(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))))


def test_served_overload_deadline_caps_disconnect_and_dead_worker(served):
    """One served scenario, in order (each step leaves the app idle for the next)."""
    url, dit = served["url"], served["dit"]
    status, answer, _ = _post(url, QUICK)
    assert status == 200, answer
    reference = _image(answer)
    before = dit.info.remote().result()

    # 1. overload: 3x the DiT bound (2 queued + 1 running) at once -> only 200s and 429s
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda _: _post(url, QUICK), range(9)))
    statuses = sorted(s for s, _, _ in answers)
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
    for status, answer, headers in answers:
        if status == 200:
            assert (_image(answer) == reference).all()
        else:
            assert answer["error"]["message"].startswith("DiT: queue full") and headers.get("retry-after") == "1"
            assert answer["error"]["type"] == "rate_limit_error"
    after = dit.info.remote().result()
    assert (after["replica_id"], after["worker_pids"], after["rebuilds"]) == \
        (before["replica_id"], before["worker_pids"], 0)

    # 2. timeout_s: 504 naming it; the ranks were stopped (cancelled), the next request is served
    status, answer, _ = _post(url, {**LONG, "timeout_s": 3.0})  # past the encode even on a loaded machine
    assert status == 504 and answer["error"]["param"] == "timeout_s", answer
    (at, stopped), = _cancels(dit, 1)
    assert stopped < LONG["num_inference_steps"]

    # 3. caps: timeout_s above max_timeout_s, a cost above max_request_cost -> 422 naming the field
    status, answer, _ = _post(url, {**QUICK, "timeout_s": 61})
    assert status == 422 and answer["error"]["param"] == "timeout_s"
    assert "max_timeout_s=60" in answer["error"]["message"]
    status, answer, _ = _post(url, {**LONG, "n": 2})
    assert status == 422 and answer["error"]["param"] == "size", answer  # furthest above the default
    assert f"max_request_cost={BUDGET}" in answer["error"]["message"]

    status, answer, _ = _post(url, {**QUICK, "size": "72x64"})  # off the grid: names the model, not its path
    assert status == 422 and answer["error"]["param"] == "size" and served["model"] not in answer["error"]["message"]
    assert served["model"].rstrip("/").rsplit("/", 1)[-1] in answer["error"]["message"], answer

    # 4. a client that goes away: the ranks stop within two steps, the next request starts at once
    router = served["handle"]
    cancelled = router.info.remote().result()["requests"].get("cancelled", 0)
    with pytest.raises(OSError):  # socket.timeout / URLError: the client gives up and closes
        _post(url, LONG, timeout=4.0)  # inside LONG's ~25 s of denoising
    status, answer, _ = _post(url, QUICK)  # queued behind the abandoned one until its ranks stop
    assert status == 200 and (_image(answer) == reference).all()
    at, stopped = _cancels(dit, 2)[-1]
    assert 1 <= at <= stopped <= at + 2 < LONG["num_inference_steps"], (at, stopped)
    assert router.info.remote().result()["requests"].get("cancelled", 0) == cancelled + 1

    # 5. a DiT rank killed mid-request: 503 + Retry-After without internals, the log names the rank,
    #    the group is rebuilt in the same replica and the next request is the reference image
    pid = before["worker_pids"][0]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(zip(("status", "answer", "headers"), _post(url, LONG))))
    thread.start()
    time.sleep(1.5)  # let it reach the denoising loop (either way the request loses its rank)
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert result["status"] == 503, result
    message = result["answer"]["error"]["message"]
    assert message.startswith("DiT lost a worker") and str(pid) not in message
    assert result["headers"]["retry-after"] == "1"
    status, answer, _ = _post(url, QUICK)
    assert status == 200 and (_image(answer) == reference).all()
    rebuilt = dit.info.remote().result()
    assert rebuilt["replica_id"] == before["replica_id"] and rebuilt["rebuilds"] == 1
    assert pid not in rebuilt["worker_pids"]
    assert _logged(f"rank(s) [0] (pid [{pid}]) died mid-request"), "no log line names the dead rank"

    #    the same for a VAE worker (killed between requests: the next request finds it dead)
    from ray import serve

    vae = serve.get_deployment_handle("VAE", APP)
    vae_before = vae.info.remote().result()
    os.kill(vae_before["worker_pids"][0], signal.SIGKILL)
    status, answer, headers = _post(url, QUICK)
    assert status == 503 and answer["error"]["message"].startswith("VAE lost a worker"), answer
    status, answer, _ = _post(url, QUICK)
    assert status == 200 and (_image(answer) == reference).all()
    assert vae.info.remote().result()["rebuilds"] == 1

    # 6. the open-loop load client above capacity: every request answered (200 or 429), none lost
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    from load import run_load

    report = run_load(url, rate=20, duration_s=1.0, body=QUICK, timeout_s=60)
    assert report["lost"] == 0 and report["invalid"] == 0 and report["5xx"] == 0, report
    assert report["sent"] == report["answered"] == 20 and set(report["statuses"]) <= {"200", "429"}, report
    assert report["after_status"] == 200 and report["p99_s"] is not None


def _cancels(dit, count: int) -> list[tuple[int, int]]:
    """The DiT group's cancels once there are ``count`` (the entry lands when the ranks have stopped)."""
    for _ in range(100):
        cancels = dit.cancels.remote().result()
        if len(cancels) >= count:
            return cancels
        time.sleep(0.1)
    raise AssertionError(f"the DiT ranks recorded {len(cancels)} cancels, expected {count}")


def _logged(text: str) -> bool:
    """Whether any log file of this Ray session holds ``text`` (replica logs and worker stderr)."""
    import ray

    logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for _ in range(20):  # log files are flushed asynchronously
        for path in logs.rglob("*"):
            if path.is_file() and path.suffix in (".log", ".err", ".out"):
                try:
                    if text in path.read_text(errors="replace"):
                        return True
                except OSError:
                    continue
        time.sleep(0.5)
    return False


# ---- path confinement (no cluster) ----------------------------------------------------------------


def test_model_component_that_links_out_of_the_folder_is_refused(tmp_path, tiny_qwen):
    import shutil

    from ditserve.models.loading import CheckpointError, load_component, read_checkpoint

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen, model)
    outside = tmp_path / "outside"
    shutil.move(str(model / "scheduler"), outside)
    (model / "scheduler").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="resolves outside the model folder"):
        load_component(read_checkpoint(model), "scheduler", object, dtype=None)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "../../etc": ["diffusers", "X"]}))
    with pytest.raises(CheckpointError, match="'../../etc' is not a plain name"):
        read_checkpoint(model)


def test_registered_model_linked_out_of_the_models_dir_is_refused(tmp_path, tiny_qwen, monkeypatch):
    from ditserve.models.families import _local_copy
    from ditserve.models.registry import ModelNotFoundError

    root = tmp_path / "models"
    (root / "Qwen").mkdir(parents=True)
    (root / "Qwen" / "Qwen-Image").symlink_to(tiny_qwen, target_is_directory=True)
    monkeypatch.setenv("DITSERVE_MODELS_DIR", str(root))
    with pytest.raises(ModelNotFoundError, match="resolves outside"):
        _local_copy("Qwen/Qwen-Image")
