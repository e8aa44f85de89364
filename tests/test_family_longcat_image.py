"""LongCat-Image (family ``longcat-image``): the runner equals ``LongCatImagePipeline`` with
``enable_prompt_rewrite=False`` (latents and pixels, classic CFG with the pipeline's cfg renorm at
the default guidance 4.5 and the empty negative prompt, with a given negative prompt and n=2, and
without CFG at guidance 1); the registry carries the pipeline's defaults; a re-saved checkpoint
with other block/head counts loads and runs; caches (threshold 0 equals uncached, evaluations
drop); CFG-parallel, Ulysses, Ring and tensor parallel at degree 2 equal one rank; layerwise
offload equals resident; FP8 runs; LoRA is refused at start-up (the pipeline has no LoRA loader);
the served graph equals the in-process runner; the shared tiny Qwen2.5-VL processor (no torchvision)
feeds an image to its encoder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LongCatImagePipeline
from family_checks import check_caches, check_lora_refused
from layouts import layout_ids, run_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

# a quoted word: the pipeline tokenizes quoted text character by character
PROMPT, SEED, STEPS, WIDTH, HEIGHT = "a red circle with the word 'hello' on blue", 1234, 2, 80, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("longcat-image", tmp_path_factory.mktemp("longcat-image") / "tiny")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    # the tiny checkpoint saves no text_processor (used only by prompt rewriting, off below)
    pipe = LongCatImagePipeline.from_pretrained(checkpoint, dtype=torch.float32, text_processor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    ({}, {}),  # the pipeline's default guidance 4.5: CFG with negative "" and cfg renorm
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
    common = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, enable_prompt_rewrite=False,
                  **pipe_kwargs)
    ref_latents = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    ref_images = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images
    assert ours.latents.shape == ref_latents.shape  # packed tokens, as the pipeline's "latent" output
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, HEIGHT, WIDTH)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4


def test_cfg_renorm_is_applied(engine):
    """The combination is scaled down to the conditional norm, never up (renorm min 0, max 1)."""
    cond = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    uncond = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    got = engine.adapter.combine_cfg(cond, uncond, 2.0)
    assert torch.allclose(got[0], torch.tensor([[3.0, 4.0]]))  # plain CFG 6,8 (norm 10) renormed to norm 5
    assert torch.allclose(got[1], torch.tensor([[0.0, 0.0]]))  # plain CFG 0 is below the cond norm: kept


def test_registry_defaults_and_resaved_checkpoint_with_other_config(engine, tmp_path):
    import inspect

    from ditserve.models.registry import get_spec
    from ditserve.models.tiny.longcat_image import longcat_image_pipeline

    spec = get_spec("meituan-longcat/LongCat-Image")
    call = inspect.signature(LongCatImagePipeline.__call__).parameters
    assert spec.num_inference_steps == call["num_inference_steps"].default == 50
    assert spec.guidance_scale == call["guidance_scale"].default == 4.5
    assert (spec.default_width, spec.default_height) == (1024, 1024)  # default_sample_size 128 x VAE scale 8
    resolved = engine.resolve(GenerationRequest(prompt="x"))
    assert resolved.params.guidance_scale == 4.5 and resolved.negative_prompt == ""
    assert get_spec("ditserve/tiny-longcat-image").family == "longcat-image"

    torch.manual_seed(2)
    path = tmp_path / "other"
    longcat_image_pipeline(n_layers=2, n_single_layers=1, n_heads=2).save_pretrained(path, safe_serialization=True)
    (path / "ditserve.json").write_text(json.dumps({}))
    other = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    transformer = other.adapter.transformer
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 1
    assert transformer.config.num_attention_heads == 2
    out = other.generate(GenerationRequest(prompt="x", size="32x48", num_inference_steps=2, seed=0), output_type="np")
    assert out.images.shape == (1, 48, 32, 3)
    assert other.spec.num_inference_steps == 50  # LongCat-Image's default


def test_lora_is_refused_at_start_up(checkpoint, tmp_path):
    check_lora_refused(LongCatImagePipeline, checkpoint, tmp_path)


def test_shared_tiny_qwen2_5_vl_processor_feeds_an_image_to_the_encoder():
    """``models/tiny/parts.py`` ``tiny_qwen2_5_vl(processor=True)``: a ``Qwen2VLProcessor`` with the
    PIL image processor (no torchvision needed) whose image tokens and pixels the vision tower takes."""
    from PIL import Image

    from ditserve.models.tiny.parts import tiny_qwen2_5_vl

    encoder, tokenizer, processor = tiny_qwen2_5_vl(32, processor=True)
    assert processor.tokenizer is tokenizer
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a red circle"],
                       images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    assert (inputs["input_ids"] == encoder.config.image_token_id).sum() == 4  # 4x4 patches of 14, merged 2x2
    hidden = encoder(**inputs, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, inputs["input_ids"].shape[1], 32)


# ---- caches (double-stream blocks, then single-stream blocks taking and returning both streams) ---

def test_caches(engine):
    check_caches(engine, dict(prompt=PROMPT, size="64x48", seed=1), blocks=3)  # one double-stream + two single-stream blocks


# ---- parallel: every rank equals one rank ----------------------------------------------------------

# 80x48 -> 15 image tokens: uneven Ulysses shards on purpose (the text is 512 tokens)
PAR_BASE = dict(prompt=PROMPT, size="80x48", num_inference_steps=2)
PAR_REQUESTS = [
    GenerationRequest(seed=1, **PAR_BASE),  # CFG (guidance 4.5, negative "", cfg renorm)
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


def test_tensor_parallel_refuses_degrees_the_heads_do_not_allow(checkpoint):
    from ditserve.parallel import ParallelConfig

    with pytest.raises(ValueError, match="tensor_parallel_size=8 must divide num_heads=4"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", parallel=ParallelConfig(tensor_parallel_size=8)))


# ---- offload and FP8 (through the feature table) --------------------------------------------------

def test_offloaded_output_equals_resident_and_fp8_runs_close(checkpoint, engine, tmp_path):
    from ditserve.deployments import OffloadConfig, QuantizationConfig
    from ditserve.features import quantization as fp8
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

    quant = Engine(EngineConfig(model=str(checkpoint), device="cpu", quant=QuantizationConfig(quantization="fp8")))
    got = quant.generate(req, output_type="np")
    names = fp8.quantized_names(quant.adapter.transformer)
    assert names and "proj_out" not in names and not any(".norm1." in n for n in names)
    assert not any(n.startswith(("time_embed", "context_embedder", "x_embedder")) for n in names)
    rel = float((got.latents - plain.latents).norm() / plain.latents.norm())
    assert 0 < rel < 0.05, rel  # quantized (not bit-equal), and close to the unquantized path
