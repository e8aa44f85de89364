"""The feature compatibility matrix: the pairs no other test proves, batched per world size on the
persistent local executors, the refused pair's message, and the README's table equal to what the
``compat`` markers declare (tools/compat_table.py; the markers sit here and on the tests of
test_cache, test_parallel, test_lora and test_offload that already prove a pair).

Each batch is one layout with one offload variant, LoRA configured and the VAE patch parallel over
two workers (``ParallelEngine``: the DiT ranks and the VAE workers as served), running three
requests: TeaCache with CFG, Cache-DiT with CFG and a LoRA, TeaCache with a LoRA. Every result must
equal one rank with only the lossy/content feature (the cache, the LoRA) on: latents <= 1e-4, the
same images (to one uint8 level: the workers hand back uint8), the same cache decisions on every
branch the reply carries, the same adapters. A batch so proves every pair among its features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from lora_files import save_peft_lora

from ditserve.deployments import (
    Engine,
    EngineConfig,
    GenerationRequest,
    OffloadConfig,
    QuantizationConfig,
    RequestError,
)
from ditserve.deployments.local import ParallelEngine
from ditserve.features.cache import parse_cache_settings
from ditserve.features.cache.config import CacheConfigError
from ditserve.features.lora import LoraConfig
from ditserve.parallel import ParallelConfig
from ditserve.parallel.vae import VaeConfig

pytestmark = pytest.mark.timeout(300)

BASE = dict(prompt="a red circle on a blue background", size="64x64", num_inference_steps=3, seed=7)
CFG = dict(negative_prompt="blurry", true_cfg_scale=4.0)
# thresholds nothing stays under: the limits decide, and each request skips at least one step
TEA = {"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}
DB = {"backend": "cache_dit", "config": {"residual_diff_threshold": 9.0, "max_warmup_steps": 1,
                                         "max_continuous_cached_steps": 2}}
LORA = [{"name": "qx", "scale": 0.8}]
REQUESTS = [GenerationRequest(**BASE, **CFG, cache=TEA), GenerationRequest(**BASE, **CFG, cache=DB, lora=LORA),
            GenerationRequest(**BASE, cache=TEA, lora=LORA)]
MODEL = OffloadConfig(enable_cpu_offload=True)
LAYERWISE = OffloadConfig(enable_layerwise_offload=True)

# every pair among a batch's features, written out (tools/compat_table.py reads them statically);
# the requests add tea_cache, cache_dit and lora (TeaCache x Cache-DiT is refused, below)
BATCHES = [
    pytest.param({"ring_degree": 2}, LAYERWISE, id="ring2-layerwise", marks=[
        pytest.mark.compat("ring", "tea_cache"), pytest.mark.compat("ring", "cache_dit"),
        pytest.mark.compat("ring", "lora"),
        pytest.mark.compat("ring", "layerwise_offload"), pytest.mark.compat("ring", "vae_patch_parallel"),
        pytest.mark.compat("layerwise_offload", "tea_cache"), pytest.mark.compat("layerwise_offload", "cache_dit"),
        pytest.mark.compat("layerwise_offload", "lora"),
        pytest.mark.compat("layerwise_offload", "vae_patch_parallel"),
        pytest.mark.compat("lora", "tea_cache"), pytest.mark.compat("lora", "cache_dit"),
        pytest.mark.compat("lora", "vae_patch_parallel"),
        pytest.mark.compat("vae_patch_parallel", "tea_cache"),
        pytest.mark.compat("vae_patch_parallel", "cache_dit")]),
    pytest.param({"cfg_parallel_size": 2}, MODEL, id="cfg2-model", marks=[
        pytest.mark.compat("cfg_parallel", "tea_cache"), pytest.mark.compat("cfg_parallel", "cache_dit"),
        pytest.mark.compat("cfg_parallel", "lora"),
        pytest.mark.compat("cfg_parallel", "model_offload"),
        pytest.mark.compat("cfg_parallel", "vae_patch_parallel"),
        pytest.mark.compat("model_offload", "tea_cache"), pytest.mark.compat("model_offload", "cache_dit"),
        pytest.mark.compat("model_offload", "lora"),
        pytest.mark.compat("model_offload", "vae_patch_parallel"),
        pytest.mark.compat("lora", "tea_cache"), pytest.mark.compat("lora", "cache_dit"),
        pytest.mark.compat("lora", "vae_patch_parallel"),
        pytest.mark.compat("vae_patch_parallel", "tea_cache"),
        pytest.mark.compat("vae_patch_parallel", "cache_dit")]),
    pytest.param({"ulysses_degree": 2}, MODEL, id="ulysses2-model", marks=[
        pytest.mark.compat("ulysses", "model_offload"), pytest.mark.compat("ulysses", "vae_patch_parallel"),
        pytest.mark.compat("ulysses", "lora"),
        pytest.mark.compat("ulysses", "tea_cache"), pytest.mark.compat("ulysses", "cache_dit")]),
    pytest.param({"cfg_parallel_size": 2}, LAYERWISE, id="cfg2-layerwise", marks=[
        pytest.mark.compat("cfg_parallel", "layerwise_offload")]),
    pytest.param({"ulysses_degree": 2, "tensor_parallel_size": 2}, LAYERWISE, id="ulysses2_tp2-layerwise", marks=[
        pytest.mark.compat("ulysses", "tensor_parallel"), pytest.mark.compat("tensor_parallel", "layerwise_offload"),
        pytest.mark.compat("tensor_parallel", "vae_patch_parallel"), pytest.mark.compat("tensor_parallel", "lora"),
        pytest.mark.compat("tensor_parallel", "tea_cache"), pytest.mark.compat("tensor_parallel", "cache_dit")]),
    pytest.param({"ring_degree": 2, "cfg_parallel_size": 2}, MODEL, id="ring2_cfg2-model", marks=[
        pytest.mark.compat("ring", "cfg_parallel"), pytest.mark.compat("ring", "model_offload")]),
]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_qwen):
    root = tmp_path_factory.mktemp("compat-loras")
    save_peft_lora(QwenImagePipeline, tiny_qwen, root / "qx", seed=3)
    return root


@pytest.fixture(scope="module")
def references(tiny_qwen, lora_dir):
    """One rank, nothing but what each request asks for (its cache, its LoRA)."""
    engine = Engine(EngineConfig(model=str(tiny_qwen), device="cpu", lora=LoraConfig(lora_dir=str(lora_dir))))
    refs = [engine.generate(r, output_type="np") for r in REQUESTS]
    for ref in refs:  # preconditions: every cache skips a step, the LoRA changes the numbers
        assert all("S" in d for d in ref.cache["decisions"].values()), ref.cache
    plain = engine.generate(REQUESTS[2].model_copy(update={"lora": None}), output_type="np")
    assert float((plain.latents - refs[2].latents).abs().max()) > 1e-3
    return refs


@pytest.mark.parametrize(("degrees", "offload"), BATCHES)
def test_feature_pairs_equal_the_lossy_feature_alone_on_one_rank(tiny_qwen, lora_dir, references, degrees, offload):
    config = EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(**degrees), offload=offload,
                          lora=LoraConfig(lora_dir=str(lora_dir)), vae=VaeConfig(vae_patch_parallel_size=2))
    engine = ParallelEngine(config)
    for request, ref in zip(REQUESTS, references):
        _assert_equal(engine.generate(request, output_type="np"), ref)


def _assert_equal(got, ref) -> None:
    assert float((got.latents - ref.latents).abs().max()) <= 1e-4
    assert np.abs(np.stack(got.images) * 255 - (ref.images * 255).round()).max() <= 1.0 + 1e-3
    decisions = got.cache["decisions"]
    assert decisions and all(ref.cache["decisions"][b] == d for b, d in decisions.items()), (got.cache, ref.cache)
    assert (got.lora or {}).get("adapters") == (ref.lora or {}).get("adapters")


@pytest.mark.compat("fp8", "ring")
@pytest.mark.compat("fp8", "cfg_parallel")
@pytest.mark.compat("fp8", "model_offload")
@pytest.mark.compat("fp8", "vae_patch_parallel")
@pytest.mark.compat("fp8", "tea_cache")
@pytest.mark.compat("fp8", "cache_dit")
def test_fp8_pairs_equal_fp8_alone_on_one_rank(tiny_qwen, lora_dir, references):
    """FP8 is lossy: the layouts, the offload and the VAE workers must give FP8 alone on one rank
    (same quantization, same cache decisions); a cache over the FP8 DiT adds nothing at threshold 0
    and, with the limits deciding, takes the unquantized model's decisions."""
    fp8 = QuantizationConfig(quantization="fp8")
    lora = LoraConfig(lora_dir=str(lora_dir))
    one = Engine(EngineConfig(model=str(tiny_qwen), device="cpu", lora=lora, quant=fp8))
    refs = [one.generate(r, output_type="np") for r in REQUESTS]
    for ref, full in zip(refs, references):
        assert ref.cache["decisions"] == full.cache["decisions"]
        assert float((ref.latents - full.latents).abs().max()) > 1e-3  # quantized: the 1e-4 below is FP8's
    plain = one.generate(GenerationRequest(**BASE, **CFG), output_type="np")
    for cache in ({"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
                  {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}}):
        exact = one.generate(GenerationRequest(**BASE, **CFG, cache=cache), output_type="np")
        assert torch.equal(exact.latents, plain.latents) and exact.cache["calls_cached"] == 0
    config = EngineConfig(model=str(tiny_qwen), device="cpu", offload=MODEL,
                          parallel=ParallelConfig(ring_degree=2, cfg_parallel_size=2), lora=lora, quant=fp8,
                          vae=VaeConfig(vae_patch_parallel_size=2))
    engine = ParallelEngine(config)
    for request, ref in zip(REQUESTS, refs):
        _assert_equal(engine.generate(request, output_type="np"), ref)


@pytest.mark.compat("tea_cache", "cache_dit",
                    refused="one cache backend at a time: TeaCache and Cache-DiT both skip whole blocks and do "
                            "not stack (choose cache_backend=tea_cache or cache_dit)")
def test_tea_cache_and_cache_dit_are_refused_together():
    # a deployment's cache_backend is one name; the other backend's knobs are refused at start-up
    with pytest.raises(CacheConfigError, match="cache_config.Fn_compute_blocks: belongs to cache_dit, but "
                                                "cache_backend is tea_cache: TeaCache and Cache-DiT cannot be "
                                                "combined"):
        parse_cache_settings("tea_cache", {"Fn_compute_blocks": 2})
    with pytest.raises(ValueError, match="cannot be combined"):
        EngineConfig(cache_backend="cache_dit", cache_config={"rel_l1_thresh": 0.2})
    # and per request, likewise
    with pytest.raises(RequestError, match="TeaCache and Cache-DiT cannot be combined") as err:
        GenerationRequest.parse({"prompt": "x", "cache": {"backend": "tea_cache", "config": {"max_warmup_steps": 1}}})
    assert err.value.field == "cache.config.max_warmup_steps"


def test_readme_table_is_what_the_compat_markers_declare():
    """The README's table equals the one rendered from the markers (no run needed): a marker added
    or removed, or a hand edit, fails here; a marked test that fails fails on its own."""
    from pathlib import Path

    from ditserve.tools import compat_table

    declared = compat_table.declared()
    assert not compat_table.undecided(declared)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert compat_table.readme_table(readme) == compat_table.render(declared), \
        "README table is stale: run python tools/compat_table.py --write"


@pytest.mark.parametrize(("fields", "message"), [
    ({"offload": {"offload_device": "disk"}}, "offload_device='disk' applies to layerwise offload only"),
    ({"offload": {"enable_cpu_offload": True, "offload_prefetch": False}},
     "offload_prefetch=False applies to layerwise offload only"),
    ({"lora": {"max_loras_per_replica": 2}}, "max_loras_per_replica=2 applies to LoRA only: set lora_dir"),
])
def test_options_of_a_feature_that_is_off_are_refused_not_ignored(fields, message):
    from ditserve.deployments.attach import check_support

    with pytest.raises(ValueError, match=message):
        check_support(EngineConfig(model="ditserve/tiny-qwen-image", device="cpu", **fields))


OTHER_FAMILIES = {"flux": ("FluxPipeline", {"guidance_scale": 3.5}), "sd3": ("StableDiffusion3Pipeline", {}),
                  "z-image": ("ZImagePipeline", {}), "flux2-klein": ("Flux2KleinPipeline", {})}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_compose_on_one_batch(tmp_path, family):
    """The table is Qwen-Image's; every other family (each declares all nine features) runs one
    batch: Ring 2, layerwise offload, a LoRA, both caches and the VAE patch parallel over two
    workers equal the cache (and LoRA) alone on one rank."""
    import diffusers

    from ditserve.models import resolve_model

    checkpoint = resolve_model(f"ditserve/tiny-{family}").path
    pipeline, extra = OTHER_FAMILIES[family]
    save_peft_lora(getattr(diffusers, pipeline), checkpoint, tmp_path / "a", seed=11)
    base = dict(BASE, **extra)
    requests = [GenerationRequest(**base, cache=TEA), GenerationRequest(**base, cache=DB, lora={"name": "a"})]
    lora = LoraConfig(lora_dir=str(tmp_path))
    one = Engine(EngineConfig(model=str(checkpoint), device="cpu", lora=lora))
    refs = [one.generate(r, output_type="np") for r in requests]
    assert all("S" in d for ref in refs for d in ref.cache["decisions"].values())
    engine = ParallelEngine(EngineConfig(model=str(checkpoint), device="cpu", parallel=ParallelConfig(ring_degree=2),
                                         offload=LAYERWISE, lora=lora, vae=VaeConfig(vae_patch_parallel_size=2)))
    for request, ref in zip(requests, refs):
        _assert_equal(engine.generate(request, output_type="np"), ref)
