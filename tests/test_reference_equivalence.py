"""The in-process runner equals the family's diffusers pipeline on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline

from ditserve.deployments import Engine, EngineConfig, GenerationRequest

PIPELINES = {"qwen-image": QwenImagePipeline, "flux": FluxPipeline}

# (family, request fields, the same as diffusers pipeline kwargs)
CASES = [
    ("qwen-image", {}, {}),
    ("qwen-image", {"negative_prompt": "blurry", "true_cfg_scale": 4.0}, {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),
    ("qwen-image", {"n": 2, "negative_prompt": " ", "true_cfg_scale": 2.5}, {"num_images_per_prompt": 2, "negative_prompt": " ", "true_cfg_scale": 2.5}),
    ("flux", {"guidance_scale": 3.5}, {"guidance_scale": 3.5}),
    ("flux", {"guidance_scale": 5.0, "n": 2}, {"guidance_scale": 5.0, "num_images_per_prompt": 2}),
    ("flux", {"negative_prompt": "blurry", "true_cfg_scale": 3.0}, {"negative_prompt": "blurry", "true_cfg_scale": 3.0}),
]


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    return {fam: Engine(EngineConfig(model=str(path), device="cpu", dtype="float32")) for fam, path in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoints):
    pipes = {}
    for fam, path in tiny_checkpoints.items():
        pipe = PIPELINES[fam].from_pretrained(path, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[fam] = pipe
    return pipes


@pytest.mark.parametrize(("family", "fields", "pipe_kwargs"), CASES)
def test_runner_matches_diffusers_pipeline(engines, pipelines, family, fields, pipe_kwargs):
    prompt, seed, steps = "a red circle on a blue background", 1234, 4
    ours = engines[family].generate(
        GenerationRequest(prompt=prompt, size="80x64", num_inference_steps=steps, seed=seed, **fields),
        output_type="pt",
    )
    common = dict(prompt=prompt, width=80, height=64, num_inference_steps=steps, **pipe_kwargs)
    ref_latents = pipelines[family](generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **common).images
    ref_images = pipelines[family](generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **common).images

    assert ours.latents.shape == ref_latents.shape
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_images.shape == (fields.get("n", 1), 3, 64, 80)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4


def test_seed_changes_the_image_and_repeats_exactly(engines):
    engine = engines["qwen-image"]
    req = dict(prompt="a cat", size="64x64", num_inference_steps=2)
    a = engine.generate(GenerationRequest(seed=1, **req), output_type="pt").latents
    b = engine.generate(GenerationRequest(seed=1, **req), output_type="pt").latents
    c = engine.generate(GenerationRequest(seed=2, **req), output_type="pt").latents
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-2


def test_negative_branch_changes_the_result(engines):
    engine = engines["qwen-image"]
    req = dict(prompt="a cat", size="64x64", num_inference_steps=2, seed=3)
    plain = engine.generate(GenerationRequest(**req), output_type="pt").latents
    guided = engine.generate(GenerationRequest(negative_prompt="a dog", true_cfg_scale=4.0, **req), output_type="pt").latents
    assert (plain - guided).abs().max().item() > 1e-3
