"""Stable Diffusion 3.5 (family "sd3"): our runner equals StableDiffusion3Pipeline on a tiny
checkpoint (with and without classic CFG), other configs load, and the request fields of classic
CFG resolve as the pipeline decides."""

from __future__ import annotations

import pytest
from layouts import layout_ids, run_and_compare, serve_and_compare
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.deployments.schema import RequestError, resolve_request
from ditserve.models import get_spec
from ditserve.models.sd3 import SD3Adapter

PROMPT, SEED, STEPS = "a red circle on a blue background", 1234, 3


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from ditserve.models.tiny import make_tiny

    return make_tiny("sd3", tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def engine(tiny_sd3):
    return Engine(EngineConfig(model=str(tiny_sd3), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(tiny_sd3):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, **kwargs):
    common = dict(prompt=PROMPT, width=80, height=64, num_inference_steps=STEPS, **kwargs)
    latents = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    images = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images
    return latents, images


# (request fields, the same as StableDiffusion3Pipeline kwargs)
CASES = [
    ({}, {"guidance_scale": 3.5}),  # the model's default: CFG on, negative prompt "" (the pipeline's)
    ({"guidance_scale": 5.0, "negative_prompt": "blurry", "n": 2}, {"guidance_scale": 5.0, "negative_prompt": "blurry", "num_images_per_prompt": 2}),
    ({"guidance_scale": 1.0}, {"guidance_scale": 1.0}),  # CFG off: one branch
    ({"guidance_scale": 0.0}, {"guidance_scale": 0.0}),  # SD3.5 Large Turbo's setting
]


@pytest.mark.parametrize(("fields", "pipe_kwargs"), CASES, ids=["default", "cfg5_negative_n2", "cfg1_off", "cfg0_turbo"])
def test_runner_matches_diffusers_pipeline(engine, pipeline, fields, pipe_kwargs):
    ours = engine.generate(
        GenerationRequest(prompt=PROMPT, size="80x64", num_inference_steps=STEPS, seed=SEED, **fields), output_type="pt"
    )
    ref_latents, ref_images = _reference(pipeline, **pipe_kwargs)
    assert ours.latents.shape == ref_latents.shape == (fields.get("n", 1), 4, 8, 10)  # unpacked (B, C, H, W)
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, 64, 80)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4


def test_guidance_changes_the_result(engine):
    req = dict(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=3)
    plain = engine.generate(GenerationRequest(guidance_scale=1.0, **req), output_type="pt").latents
    guided = engine.generate(GenerationRequest(guidance_scale=4.0, negative_prompt="a dog", **req), output_type="pt").latents
    assert (plain - guided).abs().max().item() > 1e-3


def test_checkpoint_with_another_config_loads_and_runs(tiny_sd3, pipeline, tmp_path):
    # other layer and head counts (no dual-attention block), re-saved by diffusers' own save_pretrained
    config = {k: v for k, v in pipeline.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(1)
    other = SD3Transformer2DModel.from_config(
        {**config, "num_layers": 3, "num_attention_heads": 2, "caption_projection_dim": 32, "dual_attention_layers": ()}
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, transformer=other, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    engine = Engine(EngineConfig(model=str(saved), device="cpu", dtype="float32"))
    assert engine.spec.family == "sd3"
    ours = engine.generate(
        GenerationRequest(prompt=PROMPT, size="80x64", num_inference_steps=STEPS, seed=SEED, guidance_scale=3.5), output_type="pt"
    )
    ref_latents, _ = _reference(pipe, guidance_scale=3.5)
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4


def test_registry_defaults_follow_the_model_cards():
    for model_id, steps, scale in [
        ("stabilityai/stable-diffusion-3.5", 28, 3.5),
        ("stabilityai/stable-diffusion-3.5-large", 28, 3.5),
        ("stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
        ("stabilityai/stable-diffusion-3.5-medium", 40, 4.5),
    ]:
        spec = get_spec(model_id)
        assert (spec.family, spec.num_inference_steps, spec.guidance_scale) == ("sd3", steps, scale)
        assert spec.size_multiple == 16


def test_classic_cfg_request_fields():
    large, turbo = get_spec("stabilityai/stable-diffusion-3.5-large"), get_spec("stabilityai/stable-diffusion-3.5-large-turbo")
    r = resolve_request(GenerationRequest(prompt="a cat"), large)
    assert (r.params.guidance_scale, r.negative_prompt) == (3.5, "")  # CFG on, the pipeline's "" negative
    r = resolve_request(GenerationRequest(prompt="a cat", negative_prompt="dark", guidance_scale=2.0), large)
    assert (r.params.guidance_scale, r.negative_prompt) == (2.0, "dark")
    r = resolve_request(GenerationRequest(prompt="a cat"), turbo)
    assert (r.params.guidance_scale, r.negative_prompt) == (0.0, None)  # CFG off: one branch
    with pytest.raises(RequestError, match="guidance_scale > 1"):
        resolve_request(GenerationRequest(prompt="a cat", negative_prompt="dark"), turbo)
    with pytest.raises(RequestError, match="use guidance_scale"):
        resolve_request(GenerationRequest(prompt="a cat", true_cfg_scale=4.0), large)


def test_adapter_declares_classic_batched_cfg_and_unpacked_latents():
    from ditserve.models.contract import CFGEvaluation, LatentLayout

    assert SD3Adapter.cfg_evaluation is CFGEvaluation.BATCHED
    assert SD3Adapter.latent_layout is LatentLayout.SPATIAL


def test_make_tiny_cli_and_builtin_entry(tmp_path):
    from ditserve.cluster.cli import main
    from ditserve.models import resolve_model

    out = tmp_path / "cli-sd3"
    assert main(["make-tiny", "--family", "sd3", "--out", str(out)]) == 0
    assert resolve_model(out).spec.family == "sd3"
    spec = get_spec("ditserve/tiny-sd3")
    assert spec.builtin and spec.family == "sd3" and spec.guidance_scale == 3.5


# ---- caches ---------------------------------------------------------------------------------------

CACHE_STEPS = 6
CACHE_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=CACHE_STEPS, seed=1)


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no_cfg", "batched_cfg"])
@pytest.mark.parametrize("cache", [
    {"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
    {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}},
], ids=["tea_cache", "cache_dit"])
def test_zero_threshold_equals_uncached(engine, cache, guidance):
    plain = engine.generate(GenerationRequest(**CACHE_BASE, guidance_scale=guidance), output_type="np")
    cached = engine.generate(GenerationRequest(**CACHE_BASE, guidance_scale=guidance, cache=cache), output_type="np")
    assert torch.equal(plain.latents, cached.latents)
    assert cached.cache["calls_cached"] == 0
    assert cached.cache["blocks_evaluated"] == cached.cache["blocks_total"]
    # batched CFG: one transformer call per step carries both branches, so one decision per step
    assert set(cached.cache["decisions"]) == ({"cond+uncond"} if guidance > 1 else {"cond"})


def test_block_evaluations_drop_as_configured(engine):
    # the tiny transformer has 2 blocks; the last is context_pre_only (returns no text stream), and
    # both caches' skipped ranges end with it
    blocks = 2
    plain = engine.generate(GenerationRequest(**CACHE_BASE, guidance_scale=4.0), output_type="np")
    db = {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}
    cases = [
        ({"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}, "CSSSSC", 0),  # first/last always run
        ({"backend": "cache_dit", "config": {**db, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0}}, "CCSSCS", 1),
        ({"backend": "cache_dit", "config": {**db, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0,
                                             "enable_taylorseer": True}}, "CCSSCS", 1),
    ]
    for cache, pattern, per_skip in cases:
        out = engine.generate(GenerationRequest(**CACHE_BASE, guidance_scale=4.0, cache=cache), output_type="np")
        stats = out.cache
        assert stats["decisions"] == {"cond+uncond": pattern}, cache
        skipped = pattern.count("S")
        assert stats["blocks_total"] == CACHE_STEPS * blocks
        assert stats["blocks_evaluated"] == (CACHE_STEPS - skipped) * blocks + skipped * per_skip, cache
        assert not torch.equal(out.latents, plain.latents)  # skipping changed something


# ---- parallel -------------------------------------------------------------------------------------

# 80x48 -> 5x3 = 15 image tokens (uneven shards); the tiny transformer's first block has
# SD3.5-Medium's image-only attn2 beside the joint attention, so both attention kinds are split.
PAR_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=3)
PAR_REQUESTS = [
    GenerationRequest(seed=1, guidance_scale=4.0, negative_prompt="blurry", **PAR_BASE),
    GenerationRequest(seed=2, guidance_scale=1.0, **PAR_BASE),  # one branch: CFG-parallel must not deadlock
]
PAR_LAYOUTS = [
    {"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_parallel_size": 2},
    {"ulysses_degree": 2, "ring_degree": 2}, {"ulysses_degree": 2, "cfg_parallel_size": 2},
    {"tensor_parallel_size": 2}, {"ring_degree": 2, "tensor_parallel_size": 2},
]


@pytest.fixture(scope="module")
def par_references(engine):
    return [engine.generate(r, output_type="np") for r in PAR_REQUESTS]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("degrees", PAR_LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(tiny_sd3, par_references, degrees):
    run_and_compare(str(tiny_sd3), degrees, PAR_REQUESTS, par_references)


@pytest.mark.parametrize(("degrees", "message"), [
    ({"tensor_parallel_size": 3}, r"tensor_parallel_size=3 must divide num_heads=4"),
    ({"ulysses_degree": 8}, r"ulysses_degree=8 must divide num_heads=4"),
])
def test_layouts_the_heads_do_not_allow_are_refused(tiny_sd3, degrees, message):
    from ditserve.parallel import ParallelConfig

    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(model=str(tiny_sd3), device="cpu", parallel=ParallelConfig(**degrees)), stages=["denoise"])


def test_tensor_parallel_shards_are_cut_at_load_and_heads_follow(tiny_sd3):
    import fnmatch

    from diffusers.models.attention_processor import Attention

    from ditserve.parallel import Group
    from ditserve.parallel.tensor import ColumnParallelLinear, RowParallelLinear, load_tensor_parallel_transformer

    full = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    plan = SD3Adapter.tensor_plan()
    plan_names = {n for n, _ in full.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in plan)}
    # every attention and MLP linear of every block (attn2 in block 0; no text out/MLP in the last)
    assert "transformer_blocks.0.attn2.to_q" in plan_names and "transformer_blocks.1.ff_context.net.2" not in plan_names
    shard = load_tensor_parallel_transformer(SD3Transformer2DModel, tiny_sd3 / "transformer", torch.float32,
                                             Group((0, 1), 1, None), plan)
    mods = dict(shard.named_modules())
    assert all(isinstance(mods[n], (ColumnParallelLinear, RowParallelLinear)) for n in plan_names)
    from ditserve.models.adapter import count_local_heads

    count_local_heads(shard, Attention, lambda m: m.inner_dim // m.heads)  # as SD3Adapter does
    assert {m.heads for m in shard.modules() if isinstance(m, Attention)} == {2}  # 4 heads over 2 ranks


# ---- VAE patch parallel ---------------------------------------------------------------------------

VAE_ITEMS = [dict(size="80x48", n=1, seed=1), dict(size="48x96", n=2, seed=2)]  # split by columns / rows


def _vae_decodes(engine: Engine) -> list:
    out = []
    for item in VAE_ITEMS:
        width, height = (int(v) for v in item["size"].split("x"))
        req = engine.resolve(GenerationRequest(prompt="x", size=item["size"], n=item["n"], seed=item["seed"]))
        latents = torch.randn(item["n"], 4, height // 8, width // 8, generator=torch.Generator().manual_seed(item["seed"]))
        out.append(engine.postprocess(engine.decode(req, latents), output_type="np"))
    return out


def _vae_worker(path: str) -> dict:
    import torch.distributed as dist

    from ditserve.parallel.groups import Group

    group = Group((0, 1), dist.get_rank(), dist.group.WORLD)
    engine = Engine(EngineConfig(model=path, device="cpu", vae={"vae_patch_parallel_size": 2}), ["decode"], vae_group=group)
    sent = group.sent
    decodes = _vae_decodes(engine)
    return {"decodes": decodes, "bytes": group.sent - sent}


@pytest.mark.timeout(300)
def test_vae_patch_parallel_decode_matches_single_worker(tiny_sd3):
    import numpy as np

    from ditserve.deployments.local import run_processes

    single = _vae_decodes(Engine(EngineConfig(model=str(tiny_sd3), device="cpu"), ["decode"]))
    for result in run_processes(2, _vae_worker, str(tiny_sd3)):
        for ref, got in zip(single, result["decodes"]):
            assert got.shape == ref.shape
            assert float(np.abs(got - ref).max()) <= 1e-4
        assert result["bytes"] > 0


# ---- served -----------------------------------------------------------------------------------------


def test_cli_generate_with_classic_cfg(tiny_sd3, tmp_path, capsys):
    from PIL import Image

    from ditserve.cluster.cli import main

    out = tmp_path / "sd3.png"
    code = main(["generate", "--model", str(tiny_sd3), "--prompt", "a star", "--negative-prompt", "blurry",
                 "--guidance-scale", "4.5", "--size", "64x48", "--num-inference-steps", "2", "--output", str(out)])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (64, 48)


def test_served_graph_with_cfg_parallel_matches_reference(ray_cluster, tiny_sd3, par_references):
    serve_and_compare("sd3-test", {"model": str(tiny_sd3), "parallel": {"cfg_parallel_size": 2}}, PAR_REQUESTS,
                      par_references)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("degrees", [{"ulysses_degree": 2}, {"tensor_parallel_size": 2}], ids=["ulysses2", "tp2"])
def test_parallel_ranks_take_the_single_rank_cache_decisions(tiny_sd3, engine, degrees):
    from ditserve.deployments.local import run_local
    from ditserve.parallel import ParallelConfig

    base = dict(prompt=PROMPT, size="80x48", num_inference_steps=8, seed=1)
    db = {"backend": "cache_dit", "config": {"residual_diff_threshold": 0.45, "max_warmup_steps": 1,
                                             "max_continuous_cached_steps": -1}}
    requests = [GenerationRequest(**base, guidance_scale=4.0, cache=db),
                GenerationRequest(**base, guidance_scale=1.0, cache={"backend": "tea_cache", "config": {"rel_l1_thresh": 0.1}})]
    references = [engine.generate(r, output_type="np") for r in requests]
    for ref in references:  # precondition: the metric matters (mixed decisions)
        assert all("S" in d and d.count("C") > 1 for d in ref.cache["decisions"].values()), ref.cache
    ranks = run_local(EngineConfig(model=str(tiny_sd3), device="cpu", parallel=ParallelConfig(**degrees)), requests)
    for rank, results in enumerate(ranks):
        for ref, got in zip(references, results):
            assert got["cache"]["decisions"] == ref.cache["decisions"], (rank, degrees)
            assert float((got["latents"] - ref.latents).abs().max()) <= 1e-4, (rank, degrees)
