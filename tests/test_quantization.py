"""FP8 quantization of the DiT (features/quantization.py): storage bytes, ignored layers, every tiny
family end to end, TP 2 and Ulysses 2 equal to one rank, a pre-quantized checkpoint equal to
quantize-at-load, a cache over the FP8 DiT, a later hook wrapping the FP8 linear, the W8A8 kernel's
math, start-up refusals, and the demo model's quality (reduced: 2 prompts; the full 20-prompt check
is benchmarks/quantization.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from safetensors import safe_open

from ditserve.cluster.cli import main
from ditserve.deployments import Engine, EngineConfig, GenerationRequest, QuantizationConfig
from ditserve.deployments.local import run_local
from ditserve.features import quantization as fp8
from ditserve.parallel import ParallelConfig

FP8 = QuantizationConfig(quantization="fp8")
REQ = GenerationRequest(prompt="a red circle on a blue background", size="64x64", num_inference_steps=2, seed=3)


def _engine(model, **kw) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu", **kw))


@pytest.fixture(scope="module")
def tiny_models(tiny_qwen, tiny_flux, tmp_path_factory):
    from ditserve.models.tiny import make_tiny

    out = {"qwen-image": tiny_qwen, "flux": tiny_flux}
    for family in ("sd3", "z-image", "flux2-klein"):
        out[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
    return out


@pytest.fixture(scope="module")
def qwen_fp8(tiny_qwen):
    return _engine(tiny_qwen, quant=FP8)


def test_fp8_layers_take_at_most_055x_the_bf16_bytes_and_ignored_layers_are_untouched(tiny_qwen):
    plain = _engine(tiny_qwen, dtype="bfloat16").adapter.transformer
    quant = _engine(tiny_qwen, dtype="bfloat16", quant=FP8).adapter.transformer
    names = fp8.quantized_names(quant)
    assert names and all(quant.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in names)
    ratio = fp8.bytes_of(quant.get_submodule(n) for n in names) / fp8.bytes_of(plain.get_submodule(n) for n in names)
    assert ratio <= 0.55, ratio
    ignored = [n for n, m in quant.named_modules() if fp8.is_linear(m) and n not in names]
    assert "proj_out" in ignored and any(".img_mod." in n for n in ignored)
    for n in ignored:
        a, b = quant.get_submodule(n), plain.get_submodule(n)
        assert a.weight.dtype == torch.bfloat16 and torch.equal(a.weight, b.weight) and fp8.layer_kernel(a) is None
    # module paths and attributes stay what other features (LoRA, offload) address
    for n in names:
        m = quant.get_submodule(n)
        p = plain.get_submodule(n)
        assert (m.in_features, m.out_features) == (p.in_features, p.out_features)
        assert fp8.layer_kernel(m) == "weight_only" and fp8.SCALE in dict(m.named_buffers())


@pytest.mark.parametrize("family", ["qwen-image", "flux", "sd3", "z-image", "flux2-klein"])
def test_every_tiny_family_runs_fp8_end_to_end(tiny_models, family):
    ref = _engine(tiny_models[family]).generate(REQ, output_type="np")
    engine = _engine(tiny_models[family], quant=FP8)
    got = engine.generate(REQ, output_type="np")
    assert fp8.quantized_names(engine.adapter.transformer)
    assert np.isfinite(got.images).all()
    rel = float((got.latents - ref.latents).norm() / ref.latents.norm())
    assert 0 < rel < 0.05, rel  # quantized (not bit-equal), and close to the unquantized path


@pytest.mark.compat("fp8", "tensor_parallel")
def test_tp2_fp8_equals_one_rank_fp8_and_prequantized_checkpoint_equals_quantize_at_load(tiny_qwen, qwen_fp8, tmp_path):
    ref = qwen_fp8.generate(REQ, output_type="np")
    # a pre-quantized checkpoint: FP8 tensors + scales on disk, loaded without upcasting
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(tiny_qwen), "--out", str(out)]) == 0
    marker = json.loads((out / "transformer" / "config.json").read_text())[fp8.MARKER]
    assert marker["method"] == "fp8"
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer_blocks.0.attn.to_q.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("transformer_blocks.0.attn.to_q.weight_scale").dtype == torch.float32
    pre = _engine(out)  # no option: the checkpoint says FP8
    assert pre.adapter.transformer.get_submodule("transformer_blocks.0.attn.to_q").weight.dtype == torch.float8_e4m3fn
    got = pre.generate(REQ, output_type="np")
    assert torch.equal(got.latents, ref.latents)
    assert np.array_equal(got.images, ref.images)
    # TP 2: each rank quantizes its own shards (row-sharded: the whole row's scale), and loads the
    # pre-quantized shards (column-sharded: scales sliced with the rows)
    for model, quant in ((tiny_qwen, FP8), (out, QuantizationConfig())):
        config = EngineConfig(model=str(model), device="cpu", parallel=ParallelConfig(tensor_parallel_size=2),
                              quant=quant)
        for results in run_local(config, [REQ]):
            assert float((results[0]["latents"] - ref.latents).abs().max()) <= 1e-4
            assert float(abs(results[0]["images"] - ref.images).max()) <= 1e-4


@pytest.mark.compat("fp8", "ulysses")
def test_fp8_composes_with_ulysses_and_a_cache(tiny_qwen, qwen_fp8):
    # sequence parallel and the block caches see ordinary modules: Ulysses 2 + FP8 equals one rank
    # + FP8, and a cached request over the FP8 DiT skips blocks
    ref = qwen_fp8.generate(REQ, output_type="np")
    config = EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(ulysses_degree=2), quant=FP8)
    for results in run_local(config, [REQ]):
        assert float((results[0]["latents"] - ref.latents).abs().max()) <= 1e-4
    req = GenerationRequest.model_validate({**REQ.model_dump(exclude_none=True), "num_inference_steps": 6,
                                            "cache": {"backend": "tea_cache", "config": {"rel_l1_thresh": 10.0}}})
    stats = qwen_fp8.generate(req, output_type="np").cache
    assert stats["blocks_evaluated"] < stats["blocks_total"]


def test_w8a8_kernel_math_matches_the_dequantized_weight_within_fp8_tolerance():
    # torch._scaled_mm runs on this CPU build too, so the sm89+ path's math is checked here; the
    # GPU kernel itself is selected only on CUDA sm89+ after a probe
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=gen)
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    exact = x.float() @ w.T
    weight_only = fp8.weight_only_matmul(x.float(), q, scale)
    assert float((weight_only - exact).norm() / exact.norm()) < 0.05
    try:
        w8a8 = fp8.w8a8_matmul(x, q, scale).float()
    except (RuntimeError, NotImplementedError):
        pytest.skip("torch._scaled_mm has no CPU kernel in this build")
    assert w8a8.shape == (2, 7, 48)
    assert float((w8a8 - weight_only).norm() / weight_only.norm()) < 0.05
    kernel = fp8.select_kernel("cpu", torch.float32)
    assert kernel.name == "weight_only" and "cpu" in kernel.reason
    assert fp8.Kernel("w8a8", "").for_layer(170, 64, torch.bfloat16) is fp8.weight_only_matmul  # not 16-aligned


def test_a_hook_registered_after_load_wraps_the_fp8_linear(qwen_fp8):
    # what LoRA relies on: its hook, registered later, sees the FP8 output and adds on top
    module = qwen_fp8.adapter.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(3, module.in_features)
    base = module(x)
    assert torch.allclose(base, x @ fp8.dequantize(module).T + module.bias, atol=1e-5)

    class Plus(ModelHook):
        def new_forward(self, m, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs) + 1.0

    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(Plus(), "ditserve_lora")
    try:
        assert torch.allclose(module(x), base + 1.0)
    finally:
        registry.remove_hook("ditserve_lora", recurse=False)


def test_unknown_quantization_method_is_refused_at_start_up_listing_what_exists(capsys):
    with pytest.raises(ValueError, match=r"quantization='int4' is not available; methods that exist: fp8"):
        EngineConfig(quant={"quantization": "int4"})
    assert main(["generate", "--prompt", "x", "--quantization", "int4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--quantization: quantization='int4' is not available; methods that exist: fp8" in err
    with pytest.raises(ValueError, match=r"ignored_layers=\['x'\]: model m is stored pre-quantized"):
        fp8.check_quantization(QuantizationConfig(ignored_layers=("x",)), model="m", supported=True,
                               transformer_config={fp8.MARKER: {"ignored_layers": ["proj_out"]}}, family_default=())
    with pytest.raises(ValueError, match=r"quantization='fp8': model m does not support FP8"):
        fp8.check_quantization(FP8, model="m", supported=False, transformer_config={}, family_default=())


def test_demo_model_fp8_keeps_quality_on_held_out_prompts():
    # reduced: 2 held-out prompts (the benchmark runs 20, with the evaluation's shape classifier);
    # the demo's own 20 steps at its default size
    from ditserve.tools.demo.data import held_out_prompts
    from ditserve.tools.demo.evaluate import analyse, psnr, ssim

    plain, quant = Engine(EngineConfig(model="ditserve/demo", device="cpu")), Engine(
        EngineConfig(model="ditserve/demo", device="cpu", quant=FP8))
    psnrs, ssims = [], []
    for i, sample in enumerate(held_out_prompts(2)):
        req = GenerationRequest(prompt=sample.caption, seed=i)
        a, b = (np.asarray(e.generate(req).images[0]) for e in (plain, quant))
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
        assert analyse(a)[:2] == analyse(b)[:2]  # the color evaluation reads the same colors
    assert np.mean(psnrs) >= 30 and np.mean(ssims) >= 0.95, (psnrs, ssims)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="W8A8 needs a CUDA GPU of compute capability 8.9+")
def test_w8a8_runs_on_sm89_gpus_and_keeps_the_demo_image():
    from ditserve.tools.demo.evaluate import psnr

    assert fp8.select_kernel("cuda", torch.bfloat16).name == "w8a8"
    req = GenerationRequest(prompt="a red circle on a white background", seed=0)
    plain = Engine(EngineConfig(model="ditserve/demo", device="cuda", dtype="bfloat16"))
    quant = Engine(EngineConfig(model="ditserve/demo", device="cuda", dtype="bfloat16", quant=FP8))
    kernels = {fp8.layer_kernel(quant.adapter.transformer.get_submodule(n))
               for n in fp8.quantized_names(quant.adapter.transformer)}
    assert "w8a8" in kernels
    a, b = (np.asarray(e.generate(req).images[0]) for e in (plain, quant))
    assert psnr(a, b) >= 30
