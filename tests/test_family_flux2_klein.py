"""FLUX.2-klein (family ``flux2-klein``): the runner equals ``Flux2KleinPipeline`` (latents and
pixels; the step-distilled checkpoint without CFG whatever guidance_scale says, the undistilled one
with classic CFG); a re-saved checkpoint with other block/head counts loads and runs."""

from __future__ import annotations

import json

import pytest
from layouts import layout_ids, run_and_compare
import torch
from diffusers import Flux2KleinPipeline

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

PROMPT, SEED, STEPS, WIDTH, HEIGHT = "a red circle on a blue background", 1234, 3, 80, 64


def _save(pipe, path, overrides: dict):
    """Save a tiny pipeline as ``make_tiny`` does, with registry overrides in ditserve.json."""
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "ditserve.json").write_text(json.dumps(overrides))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The make-tiny checkpoint (step-distilled, like klein-4B) and an undistilled one (klein-base:
    classic CFG, 50 steps, guidance 4.0 by default)."""
    from ditserve.models.tiny.flux2_klein import flux2_klein_pipeline

    root = tmp_path_factory.mktemp("flux2-klein")
    distilled = make_tiny("flux2-klein", root / "distilled")
    torch.manual_seed(1)
    base = _save(flux2_klein_pipeline(distilled=False), root / "base",
                 dict(guidance="cfg", guidance_scale=4.0, num_inference_steps=50, default_width=128,
                      default_height=128, min_size=16, max_size=1024))
    return {"distilled": distilled, "base": base}


@pytest.fixture(scope="module")
def engines(checkpoints):
    return {k: Engine(EngineConfig(model=str(p), device="cpu", dtype="float32")) for k, p in checkpoints.items()}


@pytest.fixture(scope="module")
def pipelines(checkpoints):
    out = {}
    for k, p in checkpoints.items():
        pipe = Flux2KleinPipeline.from_pretrained(p, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out[k] = pipe
    return out


CASES = [
    # the distilled checkpoint ignores guidance_scale (one call per step), as the pipeline does
    ("distilled", {}, {}),
    ("distilled", {"guidance_scale": 4.0, "n": 2}, {"guidance_scale": 4.0, "num_images_per_prompt": 2}),
    # the undistilled one runs classic CFG (negative "") at guidance_scale > 1, none at 1
    ("base", {}, {"guidance_scale": 4.0}),
    ("base", {"guidance_scale": 2.5, "n": 2}, {"guidance_scale": 2.5, "num_images_per_prompt": 2}),
    ("base", {"guidance_scale": 1.0}, {"guidance_scale": 1.0}),
]


@pytest.mark.parametrize(("kind", "fields", "pipe_kwargs"), CASES)
def test_runner_matches_diffusers_pipeline(engines, pipelines, kind, fields, pipe_kwargs):
    engine = engines[kind]
    ours = engine.generate(
        GenerationRequest(prompt=PROMPT, size=f"{WIDTH}x{HEIGHT}", num_inference_steps=STEPS, seed=SEED, **fields),
        output_type="pt",
    )
    common = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, **pipe_kwargs)
    pipe = pipelines[kind]
    ref_latents = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    ref_images = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images

    # the pipeline's "latent" output is the VAE's input (unpacked, batch-norm undone, unpatchified)
    latents = engine.adapter.final_latents(ours.latents, HEIGHT, WIDTH)
    assert latents.shape == ref_latents.shape
    assert (latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, HEIGHT, WIDTH)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4


def test_cfg_changes_the_base_result_and_is_ignored_when_distilled(engines):
    req = dict(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=3)
    base = engines["base"]
    plain = base.generate(GenerationRequest(guidance_scale=1.0, **req), output_type="pt").latents
    guided = base.generate(GenerationRequest(guidance_scale=4.0, **req), output_type="pt").latents
    assert (plain - guided).abs().max().item() > 1e-3
    distilled = engines["distilled"]
    a = distilled.generate(GenerationRequest(**req), output_type="pt").latents
    b = distilled.generate(GenerationRequest(guidance_scale=4.0, **req), output_type="pt").latents
    assert torch.equal(a, b)


def test_request_fields_follow_the_guidance_kind(engines):
    # distilled (guidance "none"): a negative prompt has no branch to enter
    with pytest.raises(RequestError) as err:
        engines["distilled"].resolve(GenerationRequest(prompt="x", negative_prompt="blurry"))
    assert err.value.field == "negative_prompt"
    # classic CFG: the default guidance_scale turns CFG on with the empty negative prompt
    resolved = engines["base"].resolve(GenerationRequest(prompt="x"))
    assert resolved.params.guidance_scale == 4.0 and resolved.negative_prompt == ""
    assert resolved.params.num_inference_steps == 50
    with pytest.raises(RequestError) as err:
        engines["base"].resolve(GenerationRequest(prompt="x", true_cfg_scale=4.0))
    assert err.value.field == "true_cfg_scale"


def test_resaved_checkpoint_with_other_config_loads_and_runs(tmp_path):
    from ditserve.models.tiny.flux2_klein import flux2_klein_pipeline

    torch.manual_seed(2)
    path = _save(flux2_klein_pipeline(n_layers=2, n_single_layers=1, n_heads=2), tmp_path / "other", {})
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    transformer = engine.adapter.transformer
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 1
    assert transformer.config.num_attention_heads == 2
    out = engine.generate(GenerationRequest(prompt="x", size="32x48", num_inference_steps=2, seed=0), output_type="np")
    assert out.images.shape == (1, 48, 32, 3)
    assert engine.spec.num_inference_steps == 4  # klein-4B's default (step-distilled)


# ---- caches (double-stream blocks, then single-stream blocks on the joined sequence) -------------

CACHE_STEPS = 8
CACHE_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=CACHE_STEPS, seed=1)


def _cached(engine, cache=None, **extra):
    return engine.generate(GenerationRequest(**CACHE_BASE, **extra, cache=cache), output_type="np")


@pytest.mark.parametrize("cache", [
    {"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
    {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}},
], ids=["tea_cache", "cache_dit"])
@pytest.mark.parametrize("kind", ["distilled", "base"])
def test_zero_threshold_equals_uncached(engines, kind, cache):
    engine = engines[kind]
    plain, cached = _cached(engine), _cached(engine, cache)
    assert torch.equal(plain.latents, cached.latents)
    assert cached.cache["calls_cached"] == 0
    assert cached.cache["blocks_evaluated"] == cached.cache["blocks_total"]
    if kind == "base":  # CFG: both branches ran through the hooks
        assert set(cached.cache["decisions"]) == {"cond", "uncond"}


def test_block_evaluations_drop_as_configured(engines):
    engine = engines["distilled"]
    blocks = 3  # one double-stream + two single-stream blocks
    plain = _cached(engine)
    db = {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}
    cases = [
        ({"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}, "CSSSSSSC", 0),  # first/last always run
        ({"backend": "cache_dit", "config": db}, "CCSSCSSC", 1),
    ]
    for cache, pattern, per_skip in cases:
        out = _cached(engine, cache)
        stats = out.cache
        assert stats["decisions"] == {"cond": pattern}, cache
        skipped = pattern.count("S")
        assert stats["blocks_total"] == CACHE_STEPS * blocks
        assert stats["blocks_evaluated"] == (CACHE_STEPS - skipped) * blocks + skipped * per_skip, cache
        assert not torch.equal(out.latents, plain.latents)  # skipping changed something


# ---- parallel: every rank equals one rank ----------------------------------------------------------

# 80x48 -> 15 image tokens: uneven shards on purpose; the undistilled checkpoint runs CFG by default
PAR_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=2)
PAR_REQUESTS = [
    GenerationRequest(seed=1, **PAR_BASE),  # CFG (guidance 4.0, negative "")
    GenerationRequest(seed=2, guidance_scale=1.0, **PAR_BASE),  # one branch: CFG-parallel must not deadlock
]
LAYOUTS = [
    {"ulysses_degree": 2},
    {"ring_degree": 2},
    {"cfg_parallel_size": 2},
    {"tensor_parallel_size": 2},
    {"ulysses_degree": 2, "cfg_parallel_size": 2},
]


@pytest.fixture(scope="module")
def par_references(engines):
    return [engines["base"].generate(r, output_type="np") for r in PAR_REQUESTS]


@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(checkpoints, par_references, degrees):
    ranks = run_and_compare(str(checkpoints["base"]), degrees, PAR_REQUESTS, par_references)
    # the ranks did talk (SP all-to-all / ring, TP all-reduce, CFG gather) on the CFG request
    assert all(r[0]["bytes_sent"] > 0 for r in ranks), degrees
    if degrees.get("tensor_parallel_size", 1) > 1:
        assert all(r["bytes_sent"] > 0 for r in ranks[0])


def test_tensor_parallel_degree_the_heads_do_not_allow_is_refused(checkpoints):
    from ditserve.parallel import ParallelConfig

    with pytest.raises(ValueError, match="tensor_parallel_size=8 must divide num_heads=4"):
        Engine(EngineConfig(model=str(checkpoints["base"]), device="cpu",
                            parallel=ParallelConfig(tensor_parallel_size=8)))


# ---- VAE patch parallel (AutoencoderKLFlux2: exact) -------------------------------------------------

@pytest.mark.parametrize("tiled", [False, True], ids=["exact", "tiled"])
def test_vae_patch_parallel_decode_matches_one_worker(checkpoints, engines, tiled):
    """Exact mode: M=2 workers equal one worker's plain decode; tiled: M=2 workers equal one
    worker's tiled decode."""
    from ditserve.deployments.local import run_local_decode

    tiling = {"vae_use_tiling": True, "vae_tile_size": 32} if tiled else {}
    engine = engines["distilled"]
    if tiled:
        engine = Engine(EngineConfig(model=str(checkpoints["distilled"]), device="cpu", vae=tiling))
    # 80x48: split by columns (10 latent columns); 48x96 with n=2: by rows, a batch
    items = []
    for size, n, seed in (("80x48", 1, 1), ("48x96", 2, 2)):
        width, height = (int(v) for v in size.split("x"))
        tokens = (height // 16) * (width // 16)
        channels = engine.adapter.transformer.config.in_channels
        latents = torch.randn(n, tokens, channels, generator=torch.Generator().manual_seed(seed))
        items.append((GenerationRequest(prompt="x", size=size, n=n, seed=seed), latents))
    refs = [engine.postprocess(engine.decode(engine.resolve(r), lat), output_type="np") for r, lat in items]
    config = EngineConfig(model=str(checkpoints["distilled"]), device="cpu",
                          vae={"vae_patch_parallel_size": 2, **tiling})
    workers = run_local_decode(config, items)
    assert len(workers) == 2
    for results in workers:
        for ref, got in zip(refs, results):
            assert got["images"].shape == ref.shape
            assert float(abs(got["images"] - ref).max()) <= 1e-4
            assert got["bytes_sent"] > 0  # the workers did talk (halos, norms, K/V, bands / tiles)


def test_packed_tensor_parallel_shards_keep_a_slice_of_every_block(checkpoints):
    from diffusers import Flux2Transformer2DModel

    from ditserve.parallel import Group
    from ditserve.parallel.tensor import ColumnParallelLinear, load_tensor_parallel_transformer

    path = checkpoints["base"] / "transformer"
    full = Flux2Transformer2DModel.from_pretrained(path)
    fused = full.single_transformer_blocks[0].attn.to_qkv_mlp_proj  # Q | K | V | gate | up
    swiglu = full.transformer_blocks[0].ff.linear_in  # gate | up (proportions [1, 1])
    for rank in range(2):
        shard = load_tensor_parallel_transformer(Flux2Transformer2DModel, path, torch.float32, Group((0, 1), rank, None))
        for name, linear, blocks in (
            ("single_transformer_blocks.0.attn.to_qkv_mlp_proj", fused, fused._tp_packed_col_blocks),
            ("transformer_blocks.0.ff.linear_in", swiglu, [swiglu.out_features // 2] * 2),
        ):
            local = shard.get_submodule(name)
            assert isinstance(local, ColumnParallelLinear)
            parts, offset = [], 0
            for block in blocks:
                half = block // 2
                parts.append(linear.weight[offset + rank * half: offset + (rank + 1) * half])
                offset += block
            assert torch.equal(local.weight, torch.cat(parts))


def test_cache_under_ulysses_takes_the_single_rank_decisions(checkpoints, engines):
    """The joined single-stream blocks split at the local text length on every rank; decisions
    are reduced over the group, so every rank caches as one rank does."""
    from ditserve.deployments.local import run_local
    from ditserve.parallel import ParallelConfig

    caches = [{"backend": "cache_dit", "config": {"residual_diff_threshold": 1.0, "max_warmup_steps": 1,
                                                  "max_continuous_cached_steps": -1}},
              {"backend": "tea_cache", "config": {"rel_l1_thresh": 0.3}}]
    requests = [GenerationRequest(**CACHE_BASE, cache=c) for c in caches]
    references = [engines["base"].generate(r, output_type="np") for r in requests]
    for ref in references:  # precondition: the metric matters (mixed decisions)
        assert all("S" in d and d.count("C") > 1 for d in ref.cache["decisions"].values()), ref.cache
    config = EngineConfig(model=str(checkpoints["base"]), device="cpu", parallel=ParallelConfig(ulysses_degree=2))
    for rank, results in enumerate(run_local(config, requests)):
        for ref, got in zip(references, results):
            assert got["cache"]["decisions"] == ref.cache["decisions"], rank
            assert float((got["latents"] - ref.latents).abs().max()) <= 1e-4, rank
