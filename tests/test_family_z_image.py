"""Z-Image (Tongyi-MAI/Z-Image-Turbo): the adapter equals ``ZImagePipeline`` on a tiny checkpoint,
with and without CFG; request validation follows the pipeline's guidance rule (CFG when
guidance_scale > 0); a checkpoint with another layer/head count loads and runs."""

from __future__ import annotations

import pytest
from layouts import layout_ids, run_and_compare
import torch
from diffusers import ZImagePipeline

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.deployments.schema import RequestError, resolve_request
from ditserve.models import get_spec
from ditserve.models.tiny import make_tiny

PROMPT, SEED, STEPS = "a red circle on a blue background", 1234, 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("z-image", tmp_path_factory.mktemp("tiny-z-image"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    pipe = ZImagePipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_matches(engine, pipe, fields, pipe_kwargs):
    ours = engine.generate(
        GenerationRequest(prompt=PROMPT, size="80x64", num_inference_steps=STEPS, seed=SEED, **fields), output_type="pt"
    )
    common = dict(prompt=PROMPT, width=80, height=64, num_inference_steps=STEPS, **pipe_kwargs)
    ref_latents = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    ref_images = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images
    assert ours.latents.shape == ref_latents.shape
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, 64, 80)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4
    return ours


# (request fields, the same as ZImagePipeline kwargs); the pipeline's own default guidance is 5.0,
# the registry's (Turbo's) 0.0
CASES = [
    ({}, {"guidance_scale": 0.0}),
    ({"n": 2}, {"guidance_scale": 0.0, "num_images_per_prompt": 2}),
    ({"guidance_scale": 3.0}, {"guidance_scale": 3.0}),  # CFG with the pipeline's empty negative prompt
    ({"guidance_scale": 0.5, "negative_prompt": "blurry, dark", "n": 2},
     {"guidance_scale": 0.5, "negative_prompt": "blurry, dark", "num_images_per_prompt": 2}),
]


@pytest.mark.parametrize(("fields", "pipe_kwargs"), CASES)
def test_matches_diffusers_pipeline(engine, pipeline, fields, pipe_kwargs):
    _assert_matches(engine, pipeline, fields, pipe_kwargs)


def test_cfg_changes_the_result(engine):
    req = dict(prompt="a cat", size="64x64", num_inference_steps=2, seed=3)
    plain = engine.generate(GenerationRequest(**req), output_type="pt").latents
    guided = engine.generate(GenerationRequest(guidance_scale=2.0, negative_prompt="a dog", **req), output_type="pt").latents
    assert (plain - guided).abs().max().item() > 1e-3


def test_requests_follow_the_pipeline_guidance_rule():
    spec = get_spec("Tongyi-MAI/Z-Image-Turbo")
    assert (spec.num_inference_steps, spec.guidance_scale) == (9, 0.0)
    plain = resolve_request(GenerationRequest(prompt="x"), spec)
    assert plain.negative_prompt is None and plain.params.guidance_scale == 0.0
    cfg = resolve_request(GenerationRequest(prompt="x", guidance_scale=0.5), spec)
    assert cfg.negative_prompt == "" and cfg.params.guidance_scale == 0.5
    neg = resolve_request(GenerationRequest(prompt="x", guidance_scale=4.0, negative_prompt="dark"), spec)
    assert neg.negative_prompt == "dark"
    with pytest.raises(RequestError) as err:
        resolve_request(GenerationRequest(prompt="x", negative_prompt="dark"), spec)
    assert err.value.field == "negative_prompt" and "guidance_scale > 0" in err.value.message
    with pytest.raises(RequestError) as err:
        resolve_request(GenerationRequest(prompt="x", true_cfg_scale=4.0), spec)
    assert err.value.field == "true_cfg_scale"


def test_other_layer_and_head_count_loads_and_runs(tmp_path):
    from ditserve.models.tiny.z_image import z_image_pipeline

    torch.manual_seed(1)
    pipe = z_image_pipeline(n_layers=3, n_heads=2)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    pipe = ZImagePipeline.from_pretrained(tmp_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32"))
    config = engine.adapter.transformer.config
    assert (config.n_layers, config.n_heads) == (3, 2)
    _assert_matches(engine, pipe, {"guidance_scale": 1.5}, {"guidance_scale": 1.5})


# ---- caches ---------------------------------------------------------------------------------------

CACHE_STEPS = 8
CACHE_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=CACHE_STEPS, seed=1)


@pytest.mark.parametrize("cfg", [{}, {"guidance_scale": 2.0}], ids=["plain", "cfg"])
@pytest.mark.parametrize("cache", [
    {"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
    {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}},
], ids=["tea_cache", "cache_dit"])
def test_zero_threshold_equals_uncached(engine, cache, cfg):
    plain = engine.generate(GenerationRequest(**CACHE_BASE, **cfg), output_type="np")
    cached = engine.generate(GenerationRequest(**CACHE_BASE, **cfg, cache=cache), output_type="np")
    assert torch.equal(plain.latents, cached.latents)
    assert cached.cache["calls_cached"] == 0
    assert cached.cache["blocks_evaluated"] == cached.cache["blocks_total"] == CACHE_STEPS * 2


@pytest.mark.parametrize("cfg", [{}, {"guidance_scale": 2.0}], ids=["plain", "cfg"])
def test_block_evaluations_drop_as_configured(engine, cfg):
    blocks = 2  # the tiny transformer's main layers
    branch = "cond+uncond" if cfg else "cond"  # both CFG branches run in one call
    plain = engine.generate(GenerationRequest(**CACHE_BASE, **cfg), output_type="np")
    db = {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}
    cases = [
        ({"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}, "CSSSSSSC", 0),  # first/last always run
        ({"backend": "cache_dit", "config": db}, "CCSSCSSC", 1),  # Fn_compute_blocks=1 runs when skipping
    ]
    for cache, pattern, per_skip in cases:
        out = engine.generate(GenerationRequest(**CACHE_BASE, **cfg, cache=cache), output_type="np")
        stats = out.cache
        assert stats["decisions"] == {branch: pattern}, cache
        skipped = pattern.count("S")
        assert stats["blocks_total"] == CACHE_STEPS * blocks
        assert stats["blocks_evaluated"] == (CACHE_STEPS - skipped) * blocks + skipped * per_skip, cache
        assert not torch.equal(out.latents, plain.latents)  # skipping changed something


# ---- parallel -------------------------------------------------------------------------------------

PAR_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=3)  # 15 image tokens: uneven shards
LONG_NEGATIVE = " ".join(["blurry, dark, low quality, watermark, text"] * 8)  # pads to another length
PAR_REQUESTS = [
    GenerationRequest(seed=1, **PAR_BASE),  # no negative branch: CFG-parallel must not deadlock
    GenerationRequest(seed=2, guidance_scale=2.0, negative_prompt="blurry", **PAR_BASE),  # one batched call
    GenerationRequest(seed=3, guidance_scale=1.5, negative_prompt=LONG_NEGATIVE, **PAR_BASE),  # one call per branch
]
PAR_LAYOUTS = [
    {"ulysses_degree": 2},
    {"ring_degree": 2},
    {"cfg_parallel_size": 2},
    {"ulysses_degree": 2, "cfg_parallel_size": 2},
    {"tensor_parallel_size": 2},
    {"ring_degree": 2, "tensor_parallel_size": 2},
]


@pytest.fixture(scope="module")
def par_references(engine):
    return [engine.generate(r, output_type="np") for r in PAR_REQUESTS]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("degrees", PAR_LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(checkpoint, par_references, degrees):
    run_and_compare(str(checkpoint), degrees, PAR_REQUESTS, par_references)


def test_long_negative_prompt_matches_the_pipeline(engine, pipeline):
    # captions padding to different lengths run one call per branch; the pipeline batches them
    # with an attention mask: equal to float rounding
    _assert_matches(engine, pipeline, {"guidance_scale": 1.5, "negative_prompt": LONG_NEGATIVE},
                    {"guidance_scale": 1.5, "negative_prompt": LONG_NEGATIVE})


def test_layouts_the_heads_do_not_allow_are_refused(checkpoint):
    from ditserve.parallel import ParallelConfig

    with pytest.raises(ValueError, match=r"ulysses_degree=3 must divide num_heads=4 .*\(try \[1, 2, 4\]\)"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", parallel=ParallelConfig(ulysses_degree=3)))


def test_tensor_parallel_degrees_follow_the_head_count():
    from ditserve.parallel import ParallelConfig
    from ditserve.parallel.apply import check_parallel

    # Z-Image-Turbo's transformer: 30 heads ("TP=2 only" among the degrees 2, 4, 8 a node has)
    turbo = {"n_heads": 30, "n_kv_heads": 30, "dim": 3840}
    check_parallel(ParallelConfig(tensor_parallel_size=2), turbo, model="z", cfg_ok=True, sp_ok=True, tp_ok=True)
    for size in (4, 8):
        with pytest.raises(ValueError, match=rf"tensor_parallel_size={size} must divide num_heads=30 .*"
                                             r"\(try \[1, 2, 3, 5, 6, 10, 15, 30\]\)"):
            check_parallel(ParallelConfig(tensor_parallel_size=size), turbo, model="z", cfg_ok=True, sp_ok=True,
                           tp_ok=True)


@pytest.mark.timeout(300)
def test_vae_patch_parallel_decode_matches_one_worker(checkpoint, par_references):
    from ditserve.deployments.local import run_local_decode

    config = EngineConfig(model=str(checkpoint), device="cpu", vae={"vae_patch_parallel_size": 2})
    items = [(PAR_REQUESTS[0], par_references[0].latents), (PAR_REQUESTS[1], par_references[1].latents)]
    workers = run_local_decode(config, items)
    assert len(workers) == 2
    for rank, results in enumerate(workers):
        for ref, got in zip(par_references, results):
            assert got["images"].shape == ref.images.shape
            assert float(abs(got["images"] - ref.images).max()) <= 1e-4, rank
            assert got["bytes_sent"] > 0  # the workers did talk


@pytest.mark.timeout(300)
@pytest.mark.parametrize("degrees", [{"ulysses_degree": 2}, {"tensor_parallel_size": 2}], ids=["ulysses2", "tp2"])
def test_parallel_ranks_take_the_single_rank_cache_decisions(engine, checkpoint, degrees):
    from ditserve.deployments.local import run_local
    from ditserve.parallel import ParallelConfig

    # thresholds at which the tiny model takes mixed decisions, so a rank-local metric would diverge
    db = {"backend": "cache_dit", "config": {"residual_diff_threshold": 0.8, "max_warmup_steps": 1,
                                             "max_continuous_cached_steps": -1}}
    tea = {"backend": "tea_cache", "config": {"rel_l1_thresh": 0.3}}
    requests = [GenerationRequest(**CACHE_BASE, guidance_scale=2.0, cache=db), GenerationRequest(**CACHE_BASE, cache=tea)]
    references = [engine.generate(r, output_type="np") for r in requests]
    for ref in references:  # precondition: the metric matters
        assert all("S" in d and d.count("C") > 1 for d in ref.cache["decisions"].values()), ref.cache
    config = EngineConfig(model=str(checkpoint), device="cpu", parallel=ParallelConfig(**degrees))
    for rank, results in enumerate(run_local(config, requests)):
        for ref, got in zip(references, results):
            assert got["cache"]["decisions"] == ref.cache["decisions"], (rank, degrees)
            assert float((got["latents"] - ref.latents).abs().max()) <= 1e-4, (rank, degrees)

