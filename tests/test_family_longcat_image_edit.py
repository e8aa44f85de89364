"""LongCat-Image-Edit (family ``longcat-image-edit``): the runner equals ``LongCatImageEditPipeline``
for the same input image, prompt, seed and steps (latents and pixels; classic CFG at the default
guidance 4.5 with the empty negative prompt, with a given negative prompt and n=2, and without CFG
at guidance 1); the text encoder reads the image through its vision tower (another image, other
conditioning); the output is the input image's size and a requested size is refused; the registry
carries the pipeline's defaults; a re-saved checkpoint with other block/head counts loads and runs;
TeaCache and Cache-DiT (threshold 0 equals uncached, evaluations drop); CFG-parallel, Ulysses, Ring
and tensor parallel at degree 2 equal one rank; LoRA and the unverified features are refused at
start-up with their reasons.

The pipeline resizes the input image to a 1024*1024 area (tens of seconds for the VAE on a CPU); the
tiny checkpoint records ``condition_pixels`` = 64*64 and the reference pipeline's
``calculate_dimensions`` is given the same area here (its own function, only the area differs)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from diffusers import LongCatImageEditPipeline
from family_checks import check_caches, check_lora_refused
from layouts import layout_ids, run_and_compare
from PIL import Image

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.models.builtin import TINY_CONDITION_PIXELS
from ditserve.models.qwen_image_edit import load_processor
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

# a quoted word: the pipeline tokenizes quoted text character by character
PROMPT, SEED, STEPS = "write 'hi' on the red circle", 1234, 2


def input_image(seed: int = 0, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("longcat-image-edit", tmp_path_factory.mktemp("longcat-image-edit") / "tiny")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    module = importlib.import_module(LongCatImageEditPipeline.__module__)
    dimensions = module.calculate_dimensions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "calculate_dimensions",
                   lambda area, ratio: dimensions(TINY_CONDITION_PIXELS if area == 1024 * 1024 else area, ratio))
        pipe = LongCatImageEditPipeline.from_pretrained(
            checkpoint, text_processor=load_processor(checkpoint / "text_processor"), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


CASES = [
    ({}, {}),  # the pipeline's default guidance 4.5: CFG with negative "" (no cfg renorm in the edit pipeline)
    ({"guidance_scale": 3.0, "negative_prompt": "blurry", "n": 2},
     {"guidance_scale": 3.0, "negative_prompt": "blurry", "num_images_per_prompt": 2}),
    ({"guidance_scale": 1.0}, {"guidance_scale": 1.0}),  # no CFG: one call per step
]


@pytest.mark.parametrize(("fields", "pipe_kwargs"), CASES, ids=["cfg-default", "cfg-negative-n2", "no-cfg"])
def test_runner_matches_diffusers_pipeline(engine, pipeline, fields, pipe_kwargs):
    image = input_image()
    ours = engine.generate(GenerationRequest(prompt=PROMPT, images=[image], num_inference_steps=STEPS, seed=SEED,
                                             **fields), output_type="pt")
    common = dict(image=Image.fromarray(image), prompt=PROMPT, num_inference_steps=STEPS, **pipe_kwargs)
    ref_latents = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    ref_images = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images
    assert ours.latents.shape == ref_latents.shape
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    # 80x48 at the tiny area -> 96x64 (sides rounded up to multiples of 16, as the pipeline does)
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, 64, 96)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4


def test_the_image_conditions_both_the_text_encoder_and_the_denoiser(engine):
    """Another input image changes the text conditioning (the vision tower read it) and the result;
    a requested size is refused (the pipeline takes none: the output is the input's size)."""
    adapter = engine.adapter
    a, _ = adapter.encode_image_prompt([PROMPT], [input_image(0)], 1)
    b, features = adapter.encode_image_prompt([PROMPT], [input_image(1)], 1)
    assert a["encoder_hidden_states"].shape == b["encoder_hidden_states"].shape
    assert not torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
    # the vision features given back skip the tower and give the same conditioning
    again, _ = adapter.encode_image_prompt([PROMPT], [input_image(0)], 1, features)
    assert torch.equal(again["encoder_hidden_states"], b["encoder_hidden_states"])
    with pytest.raises(RequestError, match="size"):
        engine.resolve(GenerationRequest(prompt=PROMPT, images=[input_image()], size="64x64"))


def test_registry_defaults_and_resaved_checkpoint_with_other_config(engine, tmp_path):
    import inspect

    from ditserve.models import Conditioning, adapter_class
    from ditserve.models.registry import get_spec
    from ditserve.models.tiny.longcat_image_edit import longcat_image_edit_pipeline

    spec = get_spec("meituan-longcat/LongCat-Image-Edit")
    call = inspect.signature(LongCatImageEditPipeline.__call__).parameters
    assert spec.num_inference_steps == call["num_inference_steps"].default == 50
    assert spec.guidance_scale == call["guidance_scale"].default == 4.5
    assert spec.max_input_images == 1 and spec.condition_pixels == 1024 * 1024 and spec.size_follows_input
    assert Conditioning.IMAGE in adapter_class(spec.family).conditioning
    resolved = engine.resolve(GenerationRequest(prompt="x", images=[input_image()]))
    assert resolved.params.guidance_scale == 4.5 and resolved.negative_prompt == ""
    assert get_spec("ditserve/tiny-longcat-image-edit").family == "longcat-image-edit"

    torch.manual_seed(2)
    path = tmp_path / "other"
    longcat_image_edit_pipeline(n_layers=2, n_single_layers=1, n_heads=2).save_pretrained(path, safe_serialization=True)
    (path / "ditserve.json").write_text(json.dumps({"condition_pixels": 32 * 32}))
    other = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    transformer = other.adapter.transformer
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 1
    assert transformer.config.num_attention_heads == 2
    out = other.generate(GenerationRequest(prompt="x", images=[input_image(3, 40, 40)], num_inference_steps=2, seed=0),
                         output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_lora_and_unverified_features_are_refused_at_start_up(checkpoint, tmp_path):
    from ditserve.deployments import OffloadConfig

    check_lora_refused(LongCatImageEditPipeline, checkpoint, tmp_path)
    with pytest.raises(ValueError, match="seed table's row for LongCat-Image-Edit"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", offload=OffloadConfig(enable_layerwise_offload=True)))


# ---- caches (double-stream blocks, then single-stream blocks taking and returning both streams) ---

def test_caches(engine):
    check_caches(engine, dict(prompt=PROMPT, images=[input_image(1, 32, 32)], seed=1), blocks=3)


# ---- parallel: every rank equals one rank ----------------------------------------------------------

# 80x48 -> 96x64 at the tiny area: 24 noise + 24 image tokens (the text is 512 tokens)
PAR_REQUESTS = [
    GenerationRequest(prompt=PROMPT, images=[input_image()], num_inference_steps=STEPS, seed=1),  # CFG (4.5, "")
]
LAYOUTS = [{"cfg_parallel_size": 2}, {"ulysses_degree": 2}, {"ring_degree": 2}, {"tensor_parallel_size": 2}]


@pytest.fixture(scope="module")
def par_references(engine):
    return [engine.generate(r, output_type="np") for r in PAR_REQUESTS]


@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(checkpoint, par_references, degrees):
    ranks = run_and_compare(str(checkpoint), degrees, PAR_REQUESTS, par_references)
    assert all(r[0]["bytes_sent"] > 0 for r in ranks), degrees  # the ranks did talk
