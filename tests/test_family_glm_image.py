"""GLM-Image (family ``glm-image``): the runner equals ``GlmImagePipeline`` (the prior's tokens,
latents and pixels; classic CFG at the default guidance 1.5 and without CFG at guidance 1); the
registry carries the pipeline's defaults; a re-saved checkpoint with other block/head counts loads
and runs; served, the prior runs in its own replica (another node than the DiT's ranks), a request
equals the in-process runner with a ``prior`` stage in its timings, and a request that makes the
prior fail gets a clean 500 while the next one succeeds."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import GlmImagePipeline
from family_checks import check_caches, check_lora_refused
from layouts import layout_ids, run_and_compare, serve_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models.tiny.glm_image import FAULT_TOKEN, glm_image_pipeline

pytestmark = pytest.mark.timeout(600)

PROMPT, SEED, STEPS, SIZE = "a sign that says 'open' on a door", 1234, 2, 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread in this module: the toy prior decodes 261 tokens one by one, each a few tiny
    ops, which two threads on a shared two-core machine spend mostly synchronizing (8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny checkpoint, with a tokenizer token the prior's embedding table lacks (FAULT_TOKEN)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("glm-image") / "tiny"
    glm_image_pipeline(fault_token=True).save_pretrained(path, safe_serialization=True)
    (path / "ditserve.json").write_text(json.dumps({"num_inference_steps": STEPS}))
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    pipe = GlmImagePipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


REQUEST = dict(prompt=PROMPT, size=f"{SIZE}x{SIZE}", seed=SEED)


@pytest.fixture(scope="module")
def reference_prior(pipeline):
    """The pipeline's prior tokens for PROMPT at SEED (the same for every guidance scale)."""
    return pipeline.generate_prior_tokens(PROMPT, SIZE, SIZE, device=torch.device("cpu"),
                                          generator=torch.Generator("cpu").manual_seed(SEED))[0]


@pytest.fixture(scope="module")
def ours(engine):
    """Our runner's results at the default guidance 1.5 (CFG) and at 1.0 (no CFG)."""
    return {g: engine.generate(GenerationRequest(guidance_scale=g, **REQUEST), output_type="pt") for g in (1.5, 1.0)}


def test_prior_tokens_match_the_pipeline(engine, reference_prior):
    assert reference_prior.shape == (1, (SIZE // 16) ** 2)  # the 2x2 target grid upsampled to the 4x4 patches
    assert torch.equal(engine.prior_tokens(engine.resolve(GenerationRequest(**REQUEST))), reference_prior)
    other = engine.prior_tokens(engine.resolve(GenerationRequest(**{**REQUEST, "seed": SEED + 1})))
    assert not torch.equal(other, reference_prior)  # the request's seed drives the prior


@pytest.mark.parametrize("guidance_scale", [1.5, 1.0], ids=["cfg-default", "no-cfg"])
def test_runner_matches_diffusers_pipeline(ours, pipeline, reference_prior, guidance_scale):
    """Latents and pixels equal the pipeline's; the pipeline is given its own prior tokens (which
    the test above shows equal ours: its prior does not draw from the generator, so this is the
    run it does by itself, without generating them a second time)."""
    last = {}

    def keep(pipe, i, t, kwargs):
        last["latents"] = kwargs["latents"]
        return {}

    ref_images = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                          generator=torch.Generator("cpu").manual_seed(SEED), prior_token_ids=reference_prior,
                          output_type="pt", callback_on_step_end=keep).images
    got = ours[guidance_scale]
    assert got.latents.shape == last["latents"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert (got.latents - last["latents"]).abs().max().item() <= 1e-4
    assert (got.images - ref_images).abs().max().item() <= 1e-4
    assert got.timings["prior"] > 0 and got.timings["encode"] > 0


def test_cfg_changes_the_result(ours):
    assert (ours[1.5].latents - ours[1.0].latents).abs().max().item() > 1e-3


def test_registry_defaults_are_the_pipelines(engine):
    import inspect

    from ditserve.models.registry import get_spec

    spec = get_spec("THUDM/glm-4-vision")
    call = inspect.signature(GlmImagePipeline.__call__).parameters
    assert spec.num_inference_steps == call["num_inference_steps"].default == 50
    assert spec.guidance_scale == call["guidance_scale"].default == 1.5
    assert spec.size_multiple == engine.spec.size_multiple == 32  # VAE 8 x patch 2 x 2: the prior's 1/32 grid
    resolved = engine.resolve(GenerationRequest(prompt="x"))
    assert resolved.params.guidance_scale == 1.5 and resolved.negative_prompt == ""
    assert get_spec("ditserve/tiny-glm-image").family == "glm-image"


def test_resaved_checkpoint_with_other_config_loads_and_runs(tmp_path):
    torch.manual_seed(2)
    path = tmp_path / "other"
    glm_image_pipeline(n_layers=1, n_heads=2, prior_layers=2).save_pretrained(path, safe_serialization=True)
    (path / "ditserve.json").write_text(json.dumps({}))
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    assert len(engine.adapter.transformer.transformer_blocks) == 1
    assert engine.adapter.transformer.config.num_attention_heads == 2
    assert engine.adapter.components["vision_language_encoder"].config.text_config.num_hidden_layers == 2
    out = engine.generate(GenerationRequest(prompt="x", size="32x64", num_inference_steps=2, seed=0), output_type="np")
    assert out.images.shape == (1, 64, 32, 3)
    assert engine.spec.num_inference_steps == 50  # GLM-Image's default


# ---- parallel: every rank equals one rank (each rank's runner runs the prior too) -------------------

PAR_BASE = dict(prompt=PROMPT, size="96x64", num_inference_steps=2)
PAR_REQUESTS = [
    GenerationRequest(seed=1, **PAR_BASE),  # CFG (guidance 1.5, negative "" with the prior dropped)
    GenerationRequest(seed=2, guidance_scale=1.0, **PAR_BASE),  # one branch: CFG-parallel must not deadlock
]
LAYOUTS = [{"cfg_parallel_size": 2}, {"ulysses_degree": 2}, {"ring_degree": 2}, {"tensor_parallel_size": 2}]


@pytest.fixture(scope="module")
def par_references(engine):
    return [engine.generate(r, output_type="np") for r in PAR_REQUESTS]


@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(checkpoint, par_references, degrees):
    ranks = run_and_compare(str(checkpoint), degrees, PAR_REQUESTS, par_references)
    assert all(r[0]["bytes_sent"] > 0 for r in ranks), degrees  # the ranks did talk on the CFG request


def test_parallel_engine_runs_the_prior_in_process(checkpoint, par_references):
    """``ditserve generate`` with degrees (ParallelEngine): the prior and the encoder here, the DiT
    ranks on the local executor; equal to the reference runner."""
    from ditserve.deployments.local import ParallelEngine
    from ditserve.parallel import ParallelConfig

    config = EngineConfig(model=str(checkpoint), device="cpu", parallel=ParallelConfig(cfg_parallel_size=2))
    got = ParallelEngine(config).generate(PAR_REQUESTS[0], output_type="np")
    assert float((got.latents - par_references[0].latents).abs().max()) <= 1e-4
    assert got.timings["prior"] > 0


def test_declared_features_compose_on_one_batch(checkpoint, engine):
    """Ring 2, layerwise offload, both caches and the VAE patch parallel over two workers (the prior
    and encoder in process) equal the cache alone on one rank, cache decisions included."""
    import numpy as np

    from ditserve.deployments import OffloadConfig
    from ditserve.deployments.local import ParallelEngine
    from ditserve.parallel import ParallelConfig
    from ditserve.parallel.vae import VaeConfig

    base = dict(prompt=PROMPT, size="64x64", num_inference_steps=3, seed=7)
    tea = {"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}
    db = {"backend": "cache_dit", "config": {"residual_diff_threshold": 9.0, "max_warmup_steps": 1,
                                             "max_continuous_cached_steps": 2}}
    requests = [GenerationRequest(**base, cache=tea), GenerationRequest(**base, cache=db, guidance_scale=1.0)]
    refs = [engine.generate(r, output_type="np") for r in requests]
    assert all("S" in d for ref in refs for d in ref.cache["decisions"].values())
    parallel = ParallelEngine(EngineConfig(
        model=str(checkpoint), device="cpu", dtype="float32", parallel=ParallelConfig(ring_degree=2),
        offload=OffloadConfig(enable_layerwise_offload=True), vae=VaeConfig(vae_patch_parallel_size=2),
    ))
    for request, ref in zip(requests, refs):
        got = parallel.generate(request, output_type="np")
        assert float((got.latents - ref.latents).abs().max()) <= 1e-4
        assert np.abs(np.stack(got.images) * 255 - (ref.images * 255).round()).max() <= 1.0 + 1e-3
        assert got.cache["decisions"] == ref.cache["decisions"], got.cache


def test_refusals_at_start_up(checkpoint, tmp_path):
    """Degrees the heads do not allow, and LoRA (GlmImagePipeline has no LoRA loader to read
    adapters with), refused at start-up with the reason."""
    from ditserve.parallel import ParallelConfig

    check_lora_refused(GlmImagePipeline, checkpoint, tmp_path)
    model = dict(model=str(checkpoint), device="cpu")
    for options, reason in (
        (dict(parallel=ParallelConfig(tensor_parallel_size=8)), "tensor_parallel_size=8 must divide num_heads=4"),
        (dict(parallel=ParallelConfig(ulysses_degree=8)), "ulysses_degree=8"),
    ):
        with pytest.raises(ValueError, match=reason):
            Engine(EngineConfig(**model, **options))


def test_vae_patch_parallel_decode_matches_one_worker(checkpoint, engine):
    """Exact mode (AutoencoderKL's plan) on GLM-Image's decode (per-channel mean/std): 2 workers
    equal one worker's plain decode."""
    from ditserve.deployments.local import run_local_decode

    items = []
    for size, n, seed in (("96x64", 1, 1), ("64x128", 2, 2)):  # split by columns; by rows, a batch
        width, height = (int(v) for v in size.split("x"))
        latents = torch.randn(n, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))
        items.append((GenerationRequest(prompt="x", size=size, n=n, seed=seed), latents))
    refs = [engine.postprocess(engine.decode(engine.resolve(r), lat), output_type="np") for r, lat in items]
    workers = run_local_decode(EngineConfig(model=str(checkpoint), device="cpu", vae={"vae_patch_parallel_size": 2}),
                               items)
    assert len(workers) == 2
    for results in workers:
        for ref, got in zip(refs, results):
            assert got["images"].shape == ref.shape
            assert float(abs(got["images"] - ref).max()) <= 1e-4
            assert got["bytes_sent"] > 0


def test_offload_and_fp8(checkpoint, engine, tmp_path):
    """Model-level offload of the prior, the glyph encoder and the VAE with layerwise offload of the
    DiT (from disk) equals resident; FP8 runs end to end close to the unquantized path, with the
    embedders, modulation and output layers left unquantized."""
    import numpy as np

    from ditserve.deployments import OffloadConfig, QuantizationConfig
    from ditserve.features import quantization as fp8
    from ditserve.features.offload import layerwise_offload_of, model_offload_of

    req = GenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=7)
    plain = engine.generate(req, output_type="np")
    config = OffloadConfig(enable_cpu_offload=True, enable_layerwise_offload=True, offload_blocks_per_group=1,
                           offload_device="disk", offload_disk_dir=str(tmp_path))
    offloaded = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", offload=config))
    out = offloaded.generate(req, output_type="np")
    assert torch.equal(out.latents, plain.latents) and (out.images == plain.images).all()
    prior = model_offload_of([offloaded.adapter.components["vision_language_encoder"]])
    assert len(prior) == 1 and prior[0].onloads == 1 and not prior[0].weights.materialized
    layerwise = layerwise_offload_of(offloaded.adapter.transformer)
    assert 0 < layerwise.max_blocks_materialized <= 2 and layerwise.blocks_materialized == 0

    quant = Engine(EngineConfig(model=str(checkpoint), device="cpu", quant=QuantizationConfig(quantization="fp8")))
    got = quant.generate(req, output_type="np")
    names = fp8.quantized_names(quant.adapter.transformer)
    assert names and not any(n.startswith(("proj_out", "norm_out", "image_projector")) or ".norm1." in n
                             for n in names)
    assert np.isfinite(got.images).all()
    rel = float((got.latents - plain.latents).norm() / plain.latents.norm())
    assert 0 < rel < 0.05, rel


def test_cli_lists_the_model_and_has_prior_flags(capsys):
    from ditserve.cluster import cli

    assert cli.main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("THUDM/glm-4-vision"))
    assert " yes " in row and ("cache_dit,cfg_parallel,fp8,layerwise_offload,sequence_parallel,tea_cache,"
                               "tensor_parallel,vae_patch_parallel") in row
    args = cli.build_parser().parse_args(["config", "--model", "ditserve/tiny-glm-image", "--prior-num-cpus", "0.3",
                                          "--prior-max-replicas", "2", "--prior-max-ongoing-requests", "2"])
    cfg = cli._app_config(args)
    assert cfg.prior.num_cpus == 0.3 and cfg.prior.autoscaling.max_replicas == 2
    assert cfg.prior.max_ongoing_requests == 2


# ---- served: the prior in its own replica -----------------------------------------------------------

def _post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/v1/images/generations", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_prior_runs_in_its_own_replica(ray_cluster, checkpoint, engine):
    """The graph with a Prior deployment pinned to the CPU-only node A (``prior.custom_resources``)
    while the DiT's rank takes a GPU of node B: a request equals the in-process runner (prior
    included), its timings name the prior stage, and a prompt the prior cannot embed (FAULT_TOKEN,
    an IndexError inside ``generate``) gets a clean 500 while the next request succeeds."""
    from ray import serve

    request = GenerationRequest(**REQUEST)  # CFG at the default 1.5
    reference = engine.generate(request, output_type="np")
    url = ray_cluster["url"] + "/glm"

    def check(name):
        assert "Prior" in serve.status().applications[name].deployments
        prior = serve.get_deployment_handle("Prior", name).info.remote().result()
        dit = serve.get_deployment_handle("DiT", name).info.remote().result()
        assert prior["node_id"] not in dit["worker_node_ids"] and prior["pid"] not in dit["worker_pids"]
        got = serve.get_app_handle(name).generate.remote(request, "np").result()
        assert got.timings["prior"] > 0 and {"encode", "denoise", "decode"} <= set(got.timings)
        status, body = _post(url, {"prompt": f"a {FAULT_TOKEN} sign", "size": "64x64", "seed": 1})
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "IndexError" in body["error"]["message"], body
        status, body = _post(url, {"prompt": PROMPT, "size": "64x64", "seed": 1})
        assert status == 200 and len(body["data"]) == 1

    serve_and_compare("glm-image-test", {"model": str(checkpoint)}, [request], [reference], check,
                      app={"prior": {"num_cpus": 0.1, "num_gpus": 0, "custom_resources": {"node_a": 0.01}}},
                      route_prefix="/glm")


# ---- caches (dual-stream blocks called positionally, returning the image stream first) --------------


def test_caches(engine):
    check_caches(engine, dict(prompt=PROMPT, size="64x64", seed=1), blocks=2)
