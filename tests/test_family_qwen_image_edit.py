"""The editing families. Qwen-Image-Edit (``qwen-image-edit``): the runner equals
``QwenImageEditPipeline`` for the same input image, prompt, seed and steps (latents and pixels;
without CFG at the default size, which follows the input image, and with true CFG, a negative
prompt, an explicit size and n=2); the text encoder reads the image through its vision tower; the
registry carries the pipeline's defaults; the processor loads without torchvision; CFG-parallel,
Ulysses, Ring and TP at degree 2 equal one rank; TeaCache and Cache-DiT; layerwise offload; VAE
patch parallel (decode split, encode on one worker); LoRA equals the pipeline's loader; FP8.
Qwen-Image-Edit-2509 (``qwen-image-edit-plus``): equals ``QwenImageEditPlusPipeline`` with 1, 2 and 3
images; CFG-parallel and Ulysses with two images. Qwen-Image-Layered (``qwen-image-layered``): equals
``QwenImageLayeredPipeline`` (latents and RGBA layers). Both then run the rest of Qwen-Image-Edit's
rows on one batch each (``check_declared_features``): ring and TP (Layered also CFG-parallel) with
layerwise offload, a LoRA and two VAE workers equal one rank; both caches; FP8.

The pipelines resize the input image to a 1024*1024 area (640*640 for Layered; tens of seconds for
the VAE on a CPU); the tiny checkpoints record ``condition_pixels`` = 64*64 and the reference
pipeline's ``calculate_dimensions`` is given the same area here (its own function, only the area
differs)."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image

from layouts import layout_ids, run_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models.qwen_image_edit import load_processor
from ditserve.models.tiny import make_tiny
from ditserve.models.tiny.qwen_image_edit import TINY_CONDITION_PIXELS

pytestmark = pytest.mark.timeout(600)

PROMPT, SEED, STEPS = "make the circle red", 1234, 2


def input_image(seed: int = 0, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("qwen-image-edit", tmp_path_factory.mktemp("qwen-image-edit") / "tiny")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    module = importlib.import_module(QwenImageEditPipeline.__module__)
    dimensions = module.calculate_dimensions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "calculate_dimensions", lambda area, ratio: dimensions(TINY_CONDITION_PIXELS, ratio))
        pipe = QwenImageEditPipeline.from_pretrained(checkpoint, processor=load_processor(checkpoint / "processor"),
                                                     dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


CASES = [
    ({}, {}),  # no negative prompt: one branch; the size follows the input image (96x64 here)
    ({"negative_prompt": "blurry", "true_cfg_scale": 4.0, "size": "64x32", "n": 2},
     {"negative_prompt": "blurry", "true_cfg_scale": 4.0, "width": 64, "height": 32, "num_images_per_prompt": 2}),
]


@pytest.mark.parametrize(("fields", "pipe_kwargs"), CASES, ids=["default-size", "true-cfg-n2"])
def test_runner_matches_diffusers_pipeline(engine, pipeline, fields, pipe_kwargs):
    image = input_image()
    ours = engine.generate(GenerationRequest(prompt=PROMPT, images=[image], num_inference_steps=STEPS, seed=SEED,
                                             **fields), output_type="pt")
    common = dict(image=Image.fromarray(image), prompt=PROMPT, num_inference_steps=STEPS, **pipe_kwargs)
    ref_latents = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).images
    ref_images = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **common).images
    assert ours.latents.shape == ref_latents.shape
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    n, width, height = fields.get("n", 1), pipe_kwargs.get("width", 96), pipe_kwargs.get("height", 64)
    assert ours.images.shape == ref_images.shape == (n, 3, height, width)
    assert (ours.images - ref_images).abs().max().item() <= 1e-4
    assert ours.timings["image_encode"] > 0


def test_text_encoder_reads_the_image(engine):
    """The vision tower is on the path: another image, same prompt -> other conditioning."""
    a, b = (engine.resolve(GenerationRequest(prompt=PROMPT, images=[input_image(s)], seed=1)) for s in (0, 1))
    cond_a, cond_b = engine.encode(a), engine.encode(b)
    assert cond_a.positive["encoder_hidden_states"].shape == cond_b.positive["encoder_hidden_states"].shape
    assert (cond_a.positive["encoder_hidden_states"] - cond_b.positive["encoder_hidden_states"]).abs().max() > 1e-4


def test_processor_loads_without_torchvision(checkpoint):
    processor = load_processor(checkpoint / "processor")
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.image_processor).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor",
                                                        "Qwen2VLImageProcessorFast")
    assert (checkpoint / "processor" / "video_preprocessor_config.json").is_file()  # for transformers' own loader


def test_registry_defaults_are_the_pipelines():
    import inspect

    from ditserve.models import Conditioning, adapter_class
    from ditserve.models.registry import get_spec

    spec = get_spec("Qwen/Qwen-Image-Edit")
    call = inspect.signature(QwenImageEditPipeline.__call__).parameters
    assert spec.num_inference_steps == call["num_inference_steps"].default == 50
    assert spec.true_cfg_scale == call["true_cfg_scale"].default == 4.0
    assert spec.max_input_images == 1 and spec.condition_pixels == 1024 * 1024
    assert spec.components.pipeline == "QwenImageEditPipeline"
    assert Conditioning.IMAGE in adapter_class(spec.family).conditioning
    from diffusers import QwenImageEditPlusPipeline

    plus = get_spec("Qwen/Qwen-Image-Edit-2509")
    call = inspect.signature(QwenImageEditPlusPipeline.__call__).parameters
    assert plus.num_inference_steps == call["num_inference_steps"].default == 50
    assert plus.true_cfg_scale == call["true_cfg_scale"].default == 4.0
    assert plus.max_input_images == 3 and adapter_class(plus.family).pipeline_class is QwenImageEditPlusPipeline


# ---- parallel: every rank equals one rank ----------------------------------------------------------

PAR_REQUESTS = [
    # true CFG (two branches); the condition image's tokens follow the noise tokens in every call
    GenerationRequest(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, images=[input_image()], size="64x32",
                      num_inference_steps=STEPS, seed=1),
]
LAYOUTS = [{"cfg_parallel_size": 2}, {"ulysses_degree": 2}, {"ring_degree": 2}, {"tensor_parallel_size": 2}]


@pytest.fixture(scope="module")
def par_references(engine):
    return [engine.generate(r, output_type="np") for r in PAR_REQUESTS]


@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(checkpoint, par_references, degrees):
    ranks = run_and_compare(str(checkpoint), degrees, PAR_REQUESTS, par_references)
    assert all(r[0]["bytes_sent"] > 0 for r in ranks), degrees  # the ranks did talk


# ---- caches and layerwise offload (through the feature table) ----------------------------------------

CACHE_REQ = dict(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, size="32x32", num_inference_steps=4, seed=2)


def test_caches_at_zero_threshold_equal_uncached_and_skip_when_allowed(engine):
    image = input_image()
    uncached = engine.generate(GenerationRequest(images=[image], **CACHE_REQ), output_type="np")
    for backend, zero, high in (
        ("tea_cache", {"rel_l1_thresh": 0}, {"rel_l1_thresh": 9.0}),
        ("cache_dit", {"residual_diff_threshold": 0, "max_warmup_steps": 0},
         {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}),
    ):
        same = engine.generate(GenerationRequest(images=[image], cache={"backend": backend, "config": zero},
                                                 **CACHE_REQ), output_type="np")
        assert torch.equal(same.latents, uncached.latents), backend
        assert same.cache["calls_cached"] == 0 and set(same.cache["decisions"]) == {"cond", "uncond"}, backend
        skipping = engine.generate(GenerationRequest(images=[image], cache={"backend": backend, "config": high},
                                                     **CACHE_REQ), output_type="np")
        assert skipping.cache["blocks_evaluated"] < skipping.cache["blocks_total"], backend
        assert not torch.equal(skipping.latents, uncached.latents), backend


def test_layerwise_offload_equals_resident(checkpoint, engine):
    from ditserve.features.offload import OffloadConfig, layerwise_offload_of

    req = GenerationRequest(images=[input_image()], **CACHE_REQ)
    resident = engine.generate(req, output_type="np")
    offloaded = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32",
                                    offload=OffloadConfig(enable_layerwise_offload=True)))
    out = offloaded.generate(req, output_type="np")
    assert torch.equal(out.latents, resident.latents)
    assert layerwise_offload_of(offloaded.adapter.transformer) is not None


# ---- Qwen-Image-Edit-2509 (family qwen-image-edit-plus): one to three input images ------------------


@pytest.fixture(scope="module")
def plus_checkpoint(tmp_path_factory):
    return make_tiny("qwen-image-edit-plus", tmp_path_factory.mktemp("qwen-image-edit-plus") / "tiny")


@pytest.fixture(scope="module")
def plus_pipeline(plus_checkpoint):
    from diffusers import QwenImageEditPlusPipeline

    module = importlib.import_module(QwenImageEditPlusPipeline.__module__)
    dimensions = module.calculate_dimensions

    def tiny(area, ratio):  # VAE_IMAGE_SIZE and the output's 1024*1024 -> the tiny area; the vision 384*384 stays
        return dimensions(TINY_CONDITION_PIXELS if area == 1024 * 1024 else area, ratio)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "calculate_dimensions", tiny)
        pipe = QwenImageEditPlusPipeline.from_pretrained(
            plus_checkpoint, processor=load_processor(plus_checkpoint / "processor"), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


def test_edit_plus_matches_its_pipeline_with_one_two_and_three_images(plus_checkpoint, plus_pipeline):
    engine = Engine(EngineConfig(model=str(plus_checkpoint), device="cpu", dtype="float32"))
    images = [input_image(0), input_image(1, 64, 64), input_image(2, 80, 48)]
    fields = dict(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=STEPS, seed=SEED)
    for k in (1, 2, 3):
        ours = engine.generate(GenerationRequest(images=images[:k], **fields), output_type="pt")
        kind = "pt" if k == 3 else "latent"  # pixels once (the decode is Qwen-Image's), latents otherwise
        pipe_fields = {name: v for name, v in fields.items() if name != "seed"}
        ref = plus_pipeline(image=[Image.fromarray(a) for a in images[:k]], output_type=kind,
                            generator=torch.Generator("cpu").manual_seed(SEED), **pipe_fields).images
        got = ours.images if kind == "pt" else ours.latents
        assert got.shape == ref.shape, k
        assert (got - ref).abs().max().item() <= 1e-4, k
    # the output follows the last image (80x48 -> 64x96 at the tiny area), and a fourth image is refused
    assert ours.images.shape[-2:] == (96, 64)
    from ditserve.deployments import RequestError

    with pytest.raises(RequestError, match="4 images exceed the limit of 3"):
        engine.resolve(GenerationRequest(images=images + images[:1], **fields))


def test_vae_patch_parallel_decodes_split_and_encodes_on_one_worker(checkpoint, engine):
    """Two VAE workers: decode split (exact), the input image encoded whole by the first worker."""
    from ditserve.deployments.local import ParallelEngine
    from ditserve.parallel.vae import VaeConfig

    req = GenerationRequest(images=[input_image()], prompt=PROMPT, size="64x32", num_inference_steps=STEPS, seed=4)
    ref = engine.generate(req, output_type="np")
    config = EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", vae=VaeConfig(vae_patch_parallel_size=2))
    out = ParallelEngine(config).generate(req, output_type="np")
    assert float((out.latents - ref.latents).abs().max()) <= 1e-4
    assert float(abs(out.images - ref.images).max()) <= 1 / 255 + 1e-6  # uint8 hand-off of the served VAE


@pytest.mark.parametrize("degrees", LAYOUTS[:2], ids=layout_ids)
def test_edit_plus_layout_with_two_images_matches_single_rank(plus_checkpoint, degrees):
    engine = Engine(EngineConfig(model=str(plus_checkpoint), device="cpu", dtype="float32"))
    req = GenerationRequest(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, size="64x32",
                            images=[input_image(0), input_image(1)], num_inference_steps=STEPS, seed=5)
    run_and_compare(str(plus_checkpoint), degrees, [req], [engine.generate(req, output_type="np")])


# ---- Qwen-Image-Layered (family qwen-image-layered): RGBA layers -------------------------------------


@pytest.fixture(scope="module")
def layered_checkpoint(tmp_path_factory):
    return make_tiny("qwen-image-layered", tmp_path_factory.mktemp("qwen-image-layered") / "tiny")


def test_layered_returns_the_pipelines_layers(layered_checkpoint):
    """Latents (read at the pipeline's last step: its output_type="latent" path is broken in 0.42.1)
    and the RGBA layers equal QwenImageLayeredPipeline's, with true CFG and layers=2."""
    from diffusers import QwenImageLayeredPipeline

    checkpoint = layered_checkpoint
    engine = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))
    rgba = np.random.RandomState(0).randint(0, 256, (48, 80, 4), dtype=np.uint8)
    fields = dict(prompt="decompose the scene", negative_prompt="blurry", true_cfg_scale=4.0, layers=2)
    ours = engine.generate(GenerationRequest(images=[rgba], num_inference_steps=STEPS, seed=SEED, **fields),
                           output_type="pt")
    module = importlib.import_module(QwenImageLayeredPipeline.__module__)
    dimensions = module.calculate_dimensions
    seen = {}

    def last_latents(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return {}

    with pytest.MonkeyPatch.context() as mp:  # the resolution bucket 640*640 -> the tiny area
        mp.setattr(module, "calculate_dimensions",
                   lambda area, ratio: dimensions(TINY_CONDITION_PIXELS if area == 640 * 640 else area, ratio))
        pipe = QwenImageLayeredPipeline.from_pretrained(checkpoint, processor=load_processor(checkpoint / "processor"),
                                                        dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        layers = pipe(image=Image.fromarray(rgba, "RGBA"), num_inference_steps=STEPS, output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=last_latents,
                      **fields).images[0]
    assert (ours.latents - seen["latents"]).abs().max().item() <= 1e-4
    assert ours.images.shape == layers.shape == (2, 4, 64, 96)  # one RGBA image per layer
    assert (ours.images - layers).abs().max().item() <= 1e-4
    from ditserve.deployments import RequestError

    with pytest.raises(RequestError, match="size"):
        engine.resolve(GenerationRequest(images=[rgba], size="64x64", **fields))


def test_lora_matches_diffusers_load_lora_weights(checkpoint, pipeline, tmp_path):
    """A LoRA per request equals the pipeline's own loader (``load_lora_weights`` + ``set_adapters``)."""
    from lora_files import save_peft_lora

    from ditserve.features.lora import LoraConfig

    save_peft_lora(QwenImageEditPipeline, checkpoint, tmp_path / "style", seed=11)
    engine = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32",
                                 lora=LoraConfig(lora_dir=str(tmp_path))))
    image = input_image()
    req = dict(prompt=PROMPT, images=[image], size="64x32", num_inference_steps=STEPS, seed=SEED)
    ours = engine.generate(GenerationRequest(lora={"name": "style", "scale": 0.8}, **req), output_type="pt").latents
    base = engine.generate(GenerationRequest(**req), output_type="pt").latents
    pipe = QwenImageEditPipeline(**pipeline.components)  # the module's pipeline stays without adapters
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = type(pipeline.transformer).from_pretrained(checkpoint / "transformer")
    pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    ref = pipe(image=Image.fromarray(image), prompt=PROMPT, width=64, height=32, num_inference_steps=STEPS,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images
    assert (ours - base).abs().max().item() > 1e-2  # the adapter does something
    assert (ours - ref).abs().max().item() <= 1e-4


def test_fp8_runs_end_to_end_close_to_unquantized(checkpoint, engine):
    from ditserve.deployments import QuantizationConfig
    from ditserve.features import quantization as fp8

    req = GenerationRequest(prompt=PROMPT, images=[input_image()], size="64x32", num_inference_steps=STEPS, seed=3)
    ref = engine.generate(req, output_type="np")
    quant = Engine(EngineConfig(model=str(checkpoint), device="cpu", quant=QuantizationConfig(quantization="fp8")))
    got = quant.generate(req, output_type="np")
    names = fp8.quantized_names(quant.adapter.transformer)
    assert names and "proj_out" not in names and "img_in" not in names
    assert np.isfinite(got.images).all()
    rel = float((got.latents - ref.latents).norm() / ref.latents.norm())
    assert 0 < rel < 0.05, rel  # quantized (not bit-equal), and close to the unquantized path


# ---- Edit-2509 and Layered: the rest of Qwen-Image-Edit's feature rows, one batch per model ---------------

TEA = {"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}
DB = {"backend": "cache_dit", "config": {"residual_diff_threshold": 9.0, "max_warmup_steps": 1,
                                         "max_continuous_cached_steps": 2}}
ZERO = ({"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
        {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}})


def check_declared_features(checkpoint, pipeline_cls, base: dict, lora_dir, layouts: list[dict]) -> None:
    """Each layout of ``layouts`` (two ranks each), with layerwise offload, a LoRA directory and the
    VAE patch parallel over two workers (``ParallelEngine``: the ranks as served), runs one request in
    turn (TeaCache with CFG; Cache-DiT with CFG and a LoRA) and equals one rank with only the cache and
    the LoRA on (latents <= 1e-4, images to one uint8 level, the same cache decisions); on one rank
    both caches at threshold 0 equal uncached and the LoRA changes the result; FP8 runs close to
    unquantized."""
    from lora_files import save_peft_lora

    from ditserve.deployments import OffloadConfig, QuantizationConfig
    from ditserve.deployments.local import ParallelEngine
    from ditserve.features import quantization as fp8
    from ditserve.features.lora import LoraConfig
    from ditserve.parallel import ParallelConfig
    from ditserve.parallel.vae import VaeConfig

    save_peft_lora(pipeline_cls, checkpoint, lora_dir / "style", seed=11)
    lora = LoraConfig(lora_dir=str(lora_dir))
    single = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", lora=lora))
    uncached = single.generate(GenerationRequest(**base), output_type="np")
    for cache in ZERO:
        same = single.generate(GenerationRequest(**base, cache=cache), output_type="np")
        assert torch.equal(same.latents, uncached.latents), cache
        assert same.cache["calls_cached"] == 0 and set(same.cache["decisions"]) == {"cond", "uncond"}, cache
    requests = [GenerationRequest(**base, cache=TEA),
                GenerationRequest(**base, cache=DB, lora=[{"name": "style", "scale": 0.8}])]
    refs = [single.generate(r, output_type="np") for r in requests]
    assert all("S" in d for ref in refs for d in ref.cache["decisions"].values())
    assert refs[0].cache["blocks_evaluated"] < refs[0].cache["blocks_total"]
    without_lora = single.generate(GenerationRequest(**base, cache=DB), output_type="np")
    assert float((without_lora.latents - refs[1].latents).abs().max()) > 1e-2  # the adapter does something

    # two ranks each (the executors the layout tests above started); the requests taken in turn
    for degrees, request, ref in zip(layouts, itertools.cycle(requests), itertools.cycle(refs)):
        parallel = ParallelEngine(EngineConfig(
            model=str(checkpoint), device="cpu", dtype="float32", lora=lora, parallel=ParallelConfig(**degrees),
            offload=OffloadConfig(enable_layerwise_offload=True), vae=VaeConfig(vae_patch_parallel_size=2),
        ))
        got = parallel.generate(request, output_type="np")
        assert float((got.latents - ref.latents).abs().max()) <= 1e-4, degrees
        assert np.abs(np.stack(got.images) * 255 - (ref.images * 255).round()).max() <= 1.0 + 1e-3, degrees
        decisions = got.cache["decisions"]
        assert decisions and all(ref.cache["decisions"][b] == d for b, d in decisions.items()), (degrees, got.cache)

    quant = Engine(EngineConfig(model=str(checkpoint), device="cpu", quant=QuantizationConfig(quantization="fp8")))
    got = quant.generate(GenerationRequest(**base), output_type="np")
    names = fp8.quantized_names(quant.adapter.transformer)
    assert names and "proj_out" not in names and "img_in" not in names
    assert np.isfinite(got.images).all()
    rel = float((got.latents - uncached.latents).norm() / uncached.latents.norm())
    assert 0 < rel < 0.05, rel  # quantized (not bit-equal), and close to the unquantized path


def test_edit_plus_declared_features_compose_on_one_batch(plus_checkpoint, tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    from ditserve.models import Feature, adapter_class

    base = dict(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, size="64x32",
                images=[input_image(0), input_image(1)], num_inference_steps=3, seed=6)
    # CFG-parallel and Ulysses: test_edit_plus_layout_with_two_images_matches_single_rank
    check_declared_features(plus_checkpoint, QwenImageEditPlusPipeline, base, tmp_path,
                            [{"ring_degree": 2}, {"tensor_parallel_size": 2}])
    assert adapter_class("qwen-image-edit-plus").verified_features() == adapter_class("qwen-image-edit").verified_features()
    assert Feature.LORA in adapter_class("qwen-image-edit-plus").verified_features()


def test_layered_declared_features_compose_on_one_batch(layered_checkpoint, tmp_path):
    from diffusers import QwenImageLayeredPipeline

    rgba = np.random.RandomState(0).randint(0, 256, (48, 80, 4), dtype=np.uint8)
    base = dict(prompt="decompose the scene", negative_prompt="blurry", true_cfg_scale=4.0, layers=2,
                images=[rgba], num_inference_steps=3, seed=6)
    check_declared_features(layered_checkpoint, QwenImageLayeredPipeline, base, tmp_path,
                            [{"cfg_parallel_size": 2}, {"ring_degree": 2}, {"tensor_parallel_size": 2}])
