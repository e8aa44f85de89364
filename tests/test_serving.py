"""The served graph (Router -> TextEncoder -> DiT -> VAE) on a 2-node Ray cluster: same images as
the in-process reference runner, over HTTP and handles, with placement as configured.

The app serves LoRA adapters with two DiT replicas (one app for every served test: each deploy
costs seconds): Serve's model multiplexing sends each adapter's requests to the replica that loaded
it, so it is loaded once per replica, not once per request; ``/v1/models`` lists the adapters of
``lora_dir`` (also ones added while serving) with the base model as parent; ``model: "<adapter>"``
works from a plain OpenAI body; bad adapters over HTTP are 4xx naming the field, and the app keeps
answering."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import ray
import torch
from diffusers import FluxPipeline, QwenImagePipeline
from lora_files import add_bad_entries, save_peft_lora
from PIL import Image
from ray import serve

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.deployments.app import build_app
from ditserve.deployments.config import AppConfig

pytestmark = pytest.mark.timeout(600)

APP = "serving-test"


def make_app_config(model: str, lora_dir: str, **overrides) -> AppConfig:
    """Text encoder pinned to node A (CPU only); two DiT replicas and the VAE, whose ranks take a
    (logical) GPU each on node B; LoRA adapters from ``lora_dir``, two per replica; DiT request
    batching on (up to 4), so concurrent requests that can share a forward are denoised together;
    callers route to the DiT replica with the least queued cost (routing.py), after LoRA multiplexing."""
    base = dict(
        engine={"model": model, "device": "cpu", "dtype": "float32",
                "lora": {"lora_dir": lora_dir, "max_loras_per_replica": 2, "max_loras_per_request": 2}},
        accelerator="gpu",
        distributed_timeout_s=60,
        text_encoder={"num_cpus": 0.1, "num_gpus": 0, "custom_resources": {"node_a": 0.01}, "max_ongoing_requests": 16},
        dit={"autoscaling": {"min_replicas": 2, "max_replicas": 2}, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
             "request_router": "least_cost"},
    )
    return AppConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_qwen, tiny_flux):
    """Adapters X and Y of the served model, one of another family, and bad entries."""
    root = tmp_path_factory.mktemp("served-loras")
    save_peft_lora(QwenImagePipeline, tiny_qwen, root / "x", seed=3)
    save_peft_lora(QwenImagePipeline, tiny_qwen, root / "y", seed=4, rank=2, alpha=1)
    save_peft_lora(FluxPipeline, tiny_flux, root / "flux-style", seed=1)
    add_bad_entries(root)
    return root


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_qwen, lora_dir):
    handle = serve.run(build_app(make_app_config(str(tiny_qwen), str(lora_dir))), name=APP, route_prefix="/")
    yield {"handle": handle, "url": ray_cluster["url"], "model": str(tiny_qwen),
           "dit": serve.get_deployment_handle("DiT", APP)}
    serve.delete(APP)


@pytest.fixture(scope="module")
def reference(tiny_qwen):
    return Engine(EngineConfig(model=str(tiny_qwen), device="cpu", dtype="float32"))


def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/images/generations", data=data,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _reference_pixels(reference: Engine, **fields) -> tuple[np.ndarray, object]:
    # The served ranks compute with one thread (OMP_NUM_THREADS=1); so does the reference here:
    # a VAE conv summed in another order can move one pixel's rounding by 1 in 9,216.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = reference.generate(GenerationRequest(**fields))
    finally:
        torch.set_num_threads(threads)
    return np.stack([np.asarray(im) for im in result.images]), result


REQ = dict(prompt="a red circle on a blue background", size="64x48", num_inference_steps=4, seed=7)


def test_handle_matches_reference_runner(served, reference):
    expected, ref = _reference_pixels(reference, **REQ)
    result = served["handle"].generate.remote(GenerationRequest(**REQ), "np", True).result()
    assert result.seed == 7 and result.model == served["model"]
    assert float((result.latents - ref.latents).abs().max()) <= 1e-4
    assert np.array_equal(np.stack(result.images), expected)
    assert set(result.timings) >= {"queue", "encode", "prepare", "denoise", "decode", "postprocess", "total"}
    assert result.request_id


def test_handle_with_cfg_and_n_images(served, reference):
    fields = dict(REQ, negative_prompt="blurry", true_cfg_scale=3.0, n=2)
    expected, _ = _reference_pixels(reference, **fields)
    result = served["handle"].generate.remote(GenerationRequest(**fields)).result()
    assert len(result.images) == 2 and result.images[0].size == (64, 48)
    assert np.array_equal(np.stack([np.asarray(im) for im in result.images]), expected)


def test_http_matches_reference_runner(served, reference):
    expected, _ = _reference_pixels(reference, **REQ)
    status, body, headers = _post(served["url"], {**REQ, "model": served["model"]}, {"x-request-id": "my-req-1"})
    assert status == 200, body
    assert np.array_equal(_pixels(body["data"][0]["b64_json"]), expected[0])
    assert body["request_id"] == "my-req-1" and headers.get("x-request-id") == "my-req-1"
    assert body["size"] == "64x48" and body["seed"] == 7 and body["output_format"] == "png"
    assert set(body["timings"]) >= {"queue", "encode", "denoise", "decode", "postprocess", "total"}


def test_eight_concurrent_http_requests_each_match_their_reference(served, reference):
    # Prompts of equal and different token counts, so the text encoder batches some of them, and
    # the DiT replicas (max_batch_size 4) denoise those of equal text shapes together.
    prompts = ["a red circle", "a blue square", "a green star on black", "a cat", "a dog", "a red circle",
               "a small yellow triangle in the top left", "a white cross"]
    bodies = [dict(REQ, prompt=p, seed=100 + i) for i, p in enumerate(prompts)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: _post(served["url"], b), bodies))
    for body, (status, reply, _) in zip(bodies, replies):
        assert status == 200, reply
        expected, _ = _reference_pixels(reference, **body)
        # Texts batched in the encoder can differ from a lone encode in the last float bits
        # (~1e-7); after rounding to uint8 that is at most one level on a few pixels.
        diff = np.abs(_pixels(reply["data"][0]["b64_json"]).astype(int) - expected[0].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (body, diff.max(), (diff > 0).mean())
    assert len({r[1]["request_id"] for r in replies}) == 8
    # every request was counted by the replica that denoised it, with the size of its batch (which
    # sizes form depends on arrival times; test_batching checks batches themselves)
    stats = served["dit"].broadcast("batch_stats").results()
    counted = sum(n for s in stats for n in s["requests_by_batch_size"].values())
    assert counted >= 8 and all(1 <= int(size) <= 4 for s in stats for size in s["requests_by_batch_size"])


def test_http_cache_request_matches_reference_and_reports_stats(served, reference):
    cache = {"backend": "cache_dit", "config": {"residual_diff_threshold": 9.0, "max_warmup_steps": 1}}
    fields = dict(REQ, num_inference_steps=6, cache=cache)
    expected, ref = _reference_pixels(reference, **fields)
    status, body, _ = _post(served["url"], fields)
    assert status == 200, body
    assert np.array_equal(_pixels(body["data"][0]["b64_json"]), expected[0])
    assert body["cache"] == ref.cache and body["cache"]["decisions"] == {"cond": "CSSSCS"}
    status, plain, _ = _post(served["url"], dict(REQ, num_inference_steps=6))  # the next request: no cache
    assert status == 200 and plain["cache"] is None


def test_placement_dit_group_on_one_node_encoder_on_its_own(served, ray_cluster):
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    encoder = serve.get_deployment_handle("TextEncoder", APP).info.remote().result()
    dit = serve.get_deployment_handle("DiT", APP).info.remote().result()
    vae = serve.get_deployment_handle("VAE", APP).info.remote().result()
    assert "node_a" in nodes[encoder["node_id"]]
    for stage in (dit, vae):
        # STRICT_PACK: the coordinator and every rank on one node, the one with the GPUs.
        assert {stage["node_id"], *stage["worker_node_ids"]} == {stage["node_id"]}
        assert "node_b" in nodes[stage["node_id"]]
        assert stage["backend"] == "gloo"
    pgs = [pg for pg in ray.util.placement_group_table().values()
           if pg["state"] == "CREATED" and f"{APP}#DiT" in pg["name"]]
    assert len(pgs) == 2  # one per DiT replica
    for pg in pgs:
        assert pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 2  # coordinator + 1 rank
        assert len(set(pg["bundles_to_node_id"].values())) == 1
        assert pg["bundles"][1].get("GPU") == 1.0


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (dict(REQ, size="70x48"), 422, "size", "width 70 is not a multiple of 16"),
        (dict(REQ, num_inference_steps=500), 422, "num_inference_steps", "less than or equal to 200"),
        (dict(REQ, prompt=""), 422, "prompt", "must not be empty"),
        (dict(REQ, n=11), 422, "n", "less than or equal to 10"),
        (dict(REQ, model="nope/nope"), 404, "model", "unknown model 'nope/nope'"),
        (dict(REQ, response_format="url"), 422, "response_format", "b64_json"),
        (dict(REQ, output_compression=50), 422, "output_compression", "jpeg and webp only"),
        (dict(REQ, lora={"name": "nope"}), 404, "lora.name", "unknown adapter 'nope'; known adapters: binary, "
         "corrupt, flux-style, x, y"),
        (dict(REQ, cache={"backend": "tea_cache", "config": {"rel_l1_thresh": -1}}), 422, "cache.config.rel_l1_thresh",
         "greater than or equal to 0"),
        (dict(REQ, cache={"backend": "cache_dit", "config": {"Fn_compute_blocks": 2}}), 422,
         "cache.config.Fn_compute_blocks", "must be less than the model's 2 transformer blocks"),
        (b"{not json", 400, "body", "invalid JSON"),
        (b"[1, 2]", 400, "body", "must be a JSON object"),
        (b'{"prompt": "' + b"x" * 1_100_000 + b'"}', 413, "body", "exceeds"),
    ],
)
def test_http_errors_in_openai_shape(served, body, status, param, message):
    code, reply, _ = _post(served["url"], body)
    assert code == status
    assert reply["error"]["param"] == param and message in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_http_jpeg_and_webp(served):
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        status, reply, _ = _post(served["url"], dict(REQ, output_format=fmt, output_compression=80))
        assert status == 200 and base64.b64decode(reply["data"][0]["b64_json"]).startswith(magic)


def test_models_health_and_unknown_routes(served):
    with urllib.request.urlopen(served["url"] + "/v1/models") as resp:
        models = json.loads(resp.read())
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [served["model"], "binary", "corrupt", "flux-style", "x", "y"]
    with urllib.request.urlopen(served["url"] + "/health") as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(served["url"] + "/v1/nothing")
    assert info.value.code == 404 and "error" in json.loads(info.value.read())


def test_bad_handle_request_raises_naming_the_field(served):
    from ditserve.deployments import RequestError

    with pytest.raises(RequestError, match="size: height 40 is not a multiple of 16"):
        served["handle"].generate.remote(GenerationRequest(prompt="x", size="64x40")).result()
    # the replica is still serving
    assert served["handle"].generate.remote(GenerationRequest(**REQ)).result().seed == 7


def _get(url: str, method: str = "GET") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method)) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_openapi_lists_the_routes_with_our_schemas(served):
    status, spec = _get(served["url"] + "/openapi.json")
    assert status == 200 and {"/v1/images/generations", "/v1/models", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[-1]
    assert set(spec["components"]["schemas"][name]["properties"]) >= set(GenerationRequest.model_fields) | {
        "output_format", "output_compression", "response_format", "user"}


def test_wrong_method_and_unknown_route_keep_openai_shape(served):
    for path, method, code in (("/v1/images/generations", "GET", 405), ("/health", "POST", 405),
                               ("/v1/nothing", "GET", 404)):
        status, reply = _get(served["url"] + path, method)
        assert status == code and set(reply["error"]) == {"message", "type", "param", "code"}, reply
        assert reply["error"]["type"] == "invalid_request_error"


def test_fastapi_validation_error_names_the_field(served):
    status, reply, _ = _post(served["url"], dict(REQ, lora={"name": "x", "scale": 9}))
    assert status == 422 and reply["error"]["param"] == "lora.scale"
    assert "less than or equal to 4" in reply["error"]["message"]
    status, reply, _ = _post(served["url"], dict(REQ, colour="red"))
    assert status == 422 and reply["error"]["param"] == "colour" and "unknown field" in reply["error"]["message"]


def test_http_request_id_is_honoured_and_echoed(served):
    status, body, headers = _post(served["url"], REQ, {"x-request-id": "my-req-2"})
    assert status == 200, body
    assert body["request_id"] == "my-req-2" and headers.get("x-request-id") == "my-req-2"
    assert body["usage"] == {"images": 1, "num_inference_steps": 4} and body["cache"] is None


# ---- LoRA --------------------------------------------------------------------------------------

LORA_REQ = dict(REQ, num_inference_steps=2)


def _reply_pixels(reply: dict) -> np.ndarray:
    return _pixels(reply["data"][0]["b64_json"])


def _models(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/v1/models") as resp:
        return json.loads(resp.read())["data"]


def test_alternating_adapters_load_once_per_replica_that_serves_them(served):
    replies = []
    for name in ["x", "y"] * 4:
        status, reply, _ = _post(served["url"], dict(LORA_REQ, lora={"name": name}))
        assert status == 200, reply
        assert reply["lora"]["adapters"] == [name]
        replies.append(reply)
    # every X request drew the same image (whichever replica), and Y another one
    for i, reply in enumerate(replies):
        assert np.array_equal(_reply_pixels(reply), _reply_pixels(replies[i % 2]))
    assert not np.array_equal(_reply_pixels(replies[0]), _reply_pixels(replies[1]))

    stats = served["dit"].broadcast("lora_stats").results()
    assert len({s["replica_id"] for s in stats}) == 2
    # multiplexing: all requests for an adapter went to one replica (the one Serve knew held it) ...
    for name in ("x", "y"):
        assert sum(1 for s in stats if s["requests"].get(name)) == 1, stats
    for s in stats:
        served_here = set(s["requests"])
        # ... which loaded it once from lora_dir and hit it for every later request
        assert s["loads"] == len(served_here) and s["restores"] == 0 and s["evictions"] == 0, stats
        assert s["hits"] == sum(s["requests"].values()) - s["loads"], stats
        assert set(s["on_device"]) == served_here, stats


def test_models_list_adapters_read_at_request_time(served, lora_dir):
    base = served["model"]
    cards = {c["id"]: c for c in _models(served["url"])}
    assert cards[base]["parent"] is None and cards[base]["root"] == base
    assert set(cards) == {base, "x", "y", "flux-style", "binary", "corrupt"}
    for name in ("x", "y", "flux-style"):
        assert cards[name]["parent"] == cards[name]["root"] == base and cards[name]["object"] == "model"
    shutil.copytree(lora_dir / "x", lora_dir / "z")  # dropped in while serving
    try:
        assert "z" in {c["id"] for c in _models(served["url"])}
        status, reply, _ = _post(served["url"], dict(LORA_REQ, lora={"name": "z", "scale": 0.5}))
        assert status == 200 and reply["lora"]["adapters"] == ["z"], reply
    finally:
        shutil.rmtree(lora_dir / "z")
    assert "z" not in {c["id"] for c in _models(served["url"])}


def test_openai_body_selects_an_adapter_by_model(served):
    # what the openai client sends for images.generate(model="x", prompt=..., size=..., n=1)
    status, reply, _ = _post(served["url"], {"model": "x", "prompt": LORA_REQ["prompt"], "size": "64x48", "n": 1,
                                          "response_format": "b64_json"})
    assert status == 200, reply
    assert reply["model"] == served["model"] and reply["lora"]["adapters"] == ["x"]
    fields = dict(LORA_REQ, seed=reply["seed"], num_inference_steps=reply["usage"]["num_inference_steps"])
    status, same, _ = _post(served["url"], dict(fields, lora={"name": "x", "scale": 1.0}))
    assert status == 200 and np.array_equal(_reply_pixels(same), _reply_pixels(reply))
    status, base, _ = _post(served["url"], fields)
    assert status == 200 and base["lora"] is None and not np.array_equal(_reply_pixels(base), _reply_pixels(reply))


@pytest.mark.parametrize(("lora", "status", "param", "message"), [
    ({"name": "nope"}, 404, "lora.name", "unknown adapter 'nope'; known adapters: binary, corrupt, flux-style, x, y"),
    ({"name": "../x"}, 422, "lora.name", "not an adapter name"),
    ({"name": "/etc/passwd"}, 422, "lora.name", "not an adapter name"),
    ({"name": "binary"}, 422, "lora.name", "only .safetensors adapters are loaded"),
    ({"name": "corrupt"}, 422, "lora.name", "not a readable safetensors file"),
    ({"name": "flux-style"}, 422, "lora.name", "does not fit this model"),
    ([{"name": "x"}, {"name": "y"}, {"name": "x", "scale": 0.5}], 422, "lora", "name one adapter twice"),
    ([{"name": "x"}, {"name": "y"}, {"name": "corrupt"}], 422, "lora", "exceed max_loras_per_request=2"),
    ({"name": "x", "scale": 4.5}, 422, "lora.scale", "less than or equal to 4"),
], ids=["unknown", "dotdot", "absolute", "bin", "corrupt", "other-family", "twice", "too-many", "scale"])
def test_bad_adapters_are_4xx_naming_the_field_and_the_app_keeps_serving(served, lora, status, param, message):
    code, reply, _ = _post(served["url"], dict(LORA_REQ, lora=lora))
    assert code == status, reply
    assert reply["error"]["param"] == param and message in reply["error"]["message"], reply
    assert reply["error"]["type"] == "invalid_request_error"
    pair = [{"name": "x", "scale": 0.7}, {"name": "y", "scale": 0.5}]
    code, good, _ = _post(served["url"], dict(LORA_REQ, lora=pair))
    assert code == 200 and good["lora"]["adapters"] == ["x", "y"], good
