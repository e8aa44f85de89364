"""Ovis-Image (family ``ovis-image``): the runner equals ``OvisImagePipeline`` (latents and pixels,
classic CFG at the default guidance 5.0 with the empty negative prompt, with a given negative prompt
and n=2, and without CFG at guidance 1); the registry carries the pipeline's defaults; a re-saved
checkpoint with other block/head counts loads and runs; caches (threshold 0 equals uncached,
evaluations drop); CFG-parallel, Ulysses, Ring and tensor parallel at degree 2 equal one rank; exact VAE patch
parallel decode equals one worker; layerwise offload equals resident; FP8 runs; LoRA is refused at start-up
(the pipeline has no LoRA loader)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import OvisImagePipeline
from family_checks import check_caches, check_lora_refused
from layouts import layout_ids, run_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

PROMPT, SEED, STEPS, WIDTH, HEIGHT = "a red circle on a blue background", 1234, 3, 80, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("ovis-image", tmp_path_factory.mktemp("ovis-image") / "tiny")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    pipe = OvisImagePipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    ({}, {}),  # the pipeline's default guidance 5.0: CFG with negative ""
    ({"guidance_scale": 3.0, "negative_prompt": "blurry", "n": 2},
     {"guidance_scale": 3.0, "negative_prompt": "blurry", "num_images_per_prompt": 2}),
    ({"guidance_scale": 1.0}, {"guidance_scale": 1.0}),  # no CFG: one call per step
]


@pytest.mark.parametrize(("fields", "pipe_kwargs"), CASES, ids=["cfg-default", "cfg-negative-n2", "no-cfg"])
def test_runner_matches_diffusers_pipeline(engine, pipeline, fields, pipe_kwargs):
    ours = engine.generate(
        GenerationRequest(prompt=PROMPT, size=f"{WIDTH}x{HEIGHT}", num_inference_steps=STEPS, seed=SEED, **fields),
        output_type="pt",
    )
    common = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, **pipe_kwargs)
    ref_latents = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    ref_images = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images
    assert ours.latents.shape == ref_latents.shape  # packed tokens, as the pipeline's "latent" output
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, HEIGHT, WIDTH)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4


def test_cfg_changes_the_result(engine):
    req = dict(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=3)
    plain = engine.generate(GenerationRequest(guidance_scale=1.0, **req), output_type="pt").latents
    guided = engine.generate(GenerationRequest(guidance_scale=5.0, **req), output_type="pt").latents
    assert (plain - guided).abs().max().item() > 1e-3


def test_registry_defaults_are_the_pipelines(engine):
    import inspect

    from ditserve.models.registry import get_spec

    spec = get_spec("OvisAI/Ovis-Image")
    call = inspect.signature(OvisImagePipeline.__call__).parameters
    assert spec.num_inference_steps == call["num_inference_steps"].default == 50
    assert spec.guidance_scale == call["guidance_scale"].default == 5.0
    assert (spec.default_width, spec.default_height) == (1024, 1024)  # default_sample_size 128 x VAE scale 8
    resolved = engine.resolve(GenerationRequest(prompt="x"))
    assert resolved.params.guidance_scale == 5.0 and resolved.negative_prompt == ""
    assert get_spec("ditserve/tiny-ovis-image").family == "ovis-image"


def test_resaved_checkpoint_with_other_config_loads_and_runs(tmp_path):
    from ditserve.models.tiny.ovis_image import ovis_image_pipeline

    torch.manual_seed(2)
    path = tmp_path / "other"
    ovis_image_pipeline(n_layers=2, n_single_layers=1, n_heads=2).save_pretrained(path, safe_serialization=True)
    (path / "ditserve.json").write_text(json.dumps({}))
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    transformer = engine.adapter.transformer
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 1
    assert transformer.config.num_attention_heads == 2
    out = engine.generate(GenerationRequest(prompt="x", size="32x48", num_inference_steps=2, seed=0), output_type="np")
    assert out.images.shape == (1, 48, 32, 3)
    assert engine.spec.num_inference_steps == 50  # Ovis-Image's default


def test_lora_is_refused_at_start_up(checkpoint, tmp_path):
    check_lora_refused(OvisImagePipeline, checkpoint, tmp_path)


# ---- caches (double-stream blocks, then single-stream blocks taking and returning both streams) ---

def test_caches(engine):
    check_caches(engine, dict(prompt=PROMPT, size="64x48", seed=1), blocks=3)  # one double-stream + two single-stream blocks


# ---- parallel: every rank equals one rank ----------------------------------------------------------

# 80x48 -> 15 image tokens: uneven Ulysses shards on purpose
PAR_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=2)
PAR_REQUESTS = [
    GenerationRequest(seed=1, **PAR_BASE),  # CFG (guidance 5.0, negative "")
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
    if degrees.get("tensor_parallel_size", 1) > 1:
        assert all(r["bytes_sent"] > 0 for r in ranks[0])


def test_tensor_parallel_shards_and_refuses_degrees_the_heads_do_not_allow(checkpoint):
    from ditserve.parallel import Group, ParallelConfig
    from ditserve.parallel.tensor import ColumnParallelLinear, load_tensor_parallel_transformer
    from diffusers import OvisImageTransformer2DModel

    from ditserve.models.ovis_image import OvisImageAdapter

    path = checkpoint / "transformer"
    full = OvisImageTransformer2DModel.from_pretrained(path)
    swiglu = full.single_transformer_blocks[0].proj_mlp  # mlp | gate
    half = swiglu.out_features // 4
    shard = load_tensor_parallel_transformer(OvisImageTransformer2DModel, path, torch.float32, Group((0, 1), 1, None),
                                             plan=OvisImageAdapter.tp_plan)
    local = shard.get_submodule("single_transformer_blocks.0.proj_mlp")
    assert isinstance(local, ColumnParallelLinear)  # rank 1 keeps the second half of each packed block
    assert torch.equal(local.weight, torch.cat([swiglu.weight[half:2 * half], swiglu.weight[3 * half:]]))
    with pytest.raises(ValueError, match="tensor_parallel_size=8 must divide num_heads=4"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", parallel=ParallelConfig(tensor_parallel_size=8)))


def test_vae_patch_parallel_decode_matches_one_worker(checkpoint, engine):
    """Exact mode (AutoencoderKL's plan): M=2 workers equal one worker's plain decode."""
    from ditserve.deployments.local import run_local_decode

    items = []
    for size, n, seed in (("80x48", 1, 1), ("48x96", 2, 2)):  # split by columns; by rows, a batch
        width, height = (int(v) for v in size.split("x"))
        tokens = (height // 16) * (width // 16)
        latents = torch.randn(n, tokens, engine.adapter.transformer.config.in_channels,
                              generator=torch.Generator().manual_seed(seed))
        items.append((GenerationRequest(prompt="x", size=size, n=n, seed=seed), latents))
    refs = [engine.postprocess(engine.decode(engine.resolve(r), lat), output_type="np") for r, lat in items]
    config = EngineConfig(model=str(checkpoint), device="cpu", vae={"vae_patch_parallel_size": 2})
    workers = run_local_decode(config, items)
    assert len(workers) == 2
    for results in workers:
        for ref, got in zip(refs, results):
            assert got["images"].shape == ref.shape
            assert float(abs(got["images"] - ref).max()) <= 1e-4
            assert got["bytes_sent"] > 0  # the workers did talk


# ---- offload and FP8 (through the feature table) --------------------------------------------------

def test_offloaded_output_equals_resident(checkpoint, engine, tmp_path):
    from ditserve.deployments import OffloadConfig
    from ditserve.features.offload import layerwise_offload_of, model_offload_of

    req = GenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=7)
    plain = engine.generate(req, output_type="np")
    # model-level for the text encoder and VAE, layerwise for the DiT: groups of two blocks from disk
    config = OffloadConfig(enable_cpu_offload=True, enable_layerwise_offload=True, offload_blocks_per_group=2,
                           offload_device="disk", offload_disk_dir=str(tmp_path))
    offloaded = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", offload=config))
    out = offloaded.generate(req, output_type="np")
    assert torch.equal(out.latents, plain.latents) and (out.images == plain.images).all()
    offloads = model_offload_of([offloaded.adapter.components[n] for n in offloaded.adapter.stage_components["decode"]])
    assert len(offloads) == 1 and offloads[0].onloads == 1 and not offloads[0].weights.materialized
    layerwise = layerwise_offload_of(offloaded.adapter.transformer)
    assert 0 < layerwise.max_blocks_materialized <= 2 * config.offload_blocks_per_group
    assert layerwise.blocks_materialized == 0  # none between requests


def test_fp8_runs_end_to_end_close_to_unquantized(checkpoint, engine):
    import numpy as np

    from ditserve.deployments import QuantizationConfig
    from ditserve.features import quantization as fp8

    req = GenerationRequest(prompt=PROMPT, size="64x64", num_inference_steps=2, seed=3)
    ref = engine.generate(req, output_type="np")
    quant = Engine(EngineConfig(model=str(checkpoint), device="cpu", quant=QuantizationConfig(quantization="fp8")))
    got = quant.generate(req, output_type="np")
    names = fp8.quantized_names(quant.adapter.transformer)
    assert names and "proj_out" not in names and not any(".norm1." in n for n in names)
    assert np.isfinite(got.images).all()
    rel = float((got.latents - ref.latents).norm() / ref.latents.norm())
    assert 0 < rel < 0.05, rel  # quantized (not bit-equal), and close to the unquantized path


def test_declared_features_compose_on_one_batch(checkpoint, engine):
    """Ulysses 2, layerwise offload, both caches and the VAE patch parallel over two
    workers equal the cache alone on one rank (cache decisions included)."""
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
        model=str(checkpoint), device="cpu", dtype="float32",
        parallel=ParallelConfig(ulysses_degree=2),
        offload=OffloadConfig(enable_layerwise_offload=True), vae=VaeConfig(vae_patch_parallel_size=2),
    ))
    for request, ref in zip(requests, refs):
        got = parallel.generate(request, output_type="np")
        assert float((got.latents - ref.latents).abs().max()) <= 1e-4
        assert np.abs(np.stack(got.images) * 255 - (ref.images * 255).round()).max() <= 1.0 + 1e-3
        decisions = got.cache["decisions"]
        assert decisions and all(ref.cache["decisions"][b] == d for b, d in decisions.items()), got.cache
