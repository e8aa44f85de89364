"""FP8 vs the unquantized DiT: weight bytes, step time and image quality.

    python benchmarks/quantization.py [--demo-prompts 20] [--quick]

Three parts, one JSON object:

- ``tiny``: per tiny family (random weights), the DiT's weight bytes loaded in bfloat16 with and
  without FP8, the denoising time per step and PSNR / SSIM of the final image vs the unquantized
  path (64x64, 4 steps, float32 on CPU: the weight-only kernel).
- ``block_stack``: a realistically sized random stack of FLUX double-stream blocks (hidden 1536,
  24 heads, 2 blocks, 256 image + 64 text tokens; the family's default ignored layers): bytes in
  bfloat16 vs FP8, forward time, and the output's PSNR (peak-to-peak) and relative error.
- ``demo``: the demo model (its 20 steps, its held-out prompts): PSNR / SSIM of FP8 vs unquantized
  and the demo evaluation's accuracies of both (``tools/demo/evaluate.py``); the acceptance bars
  are PSNR >= 30 dB mean, SSIM >= 0.95 mean, accuracies within 5 points. Skipped by ``--quick``.

The time ratio on a CPU is what it is (the weight-only kernel upcasts each weight at the matmul);
the FP8 speed-up needs the W8A8 kernel of an sm89+ GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, QuantizationConfig  # noqa: E402
from ditserve.features import quantization as fp8  # noqa: E402
from ditserve.models.flux import FluxAdapter  # noqa: E402
from ditserve.models.tiny import FAMILIES, make_tiny  # noqa: E402
from ditserve.tools.demo.evaluate import psnr, score, ssim, train_classifier  # noqa: E402

FP8 = QuantizationConfig(quantization="fp8")


def _dit_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _bytes(model: str) -> dict:
    plain = Engine(EngineConfig(model=model, device="cpu", dtype="bfloat16"), stages=["denoise"]).adapter.transformer
    quant = Engine(EngineConfig(model=model, device="cpu", dtype="bfloat16", quant=FP8),
                   stages=["denoise"]).adapter.transformer
    names = fp8.quantized_names(quant)
    layers_bf16 = fp8.bytes_of(plain.get_submodule(n) for n in names)
    layers_fp8 = fp8.bytes_of(quant.get_submodule(n) for n in names)
    return {
        "dit_bytes_bf16": _dit_bytes(plain), "dit_bytes_fp8": _dit_bytes(quant),
        "dit_ratio": round(_dit_bytes(quant) / _dit_bytes(plain), 3),
        "quantized_layers": len(names), "quantized_layer_ratio": round(layers_fp8 / layers_bf16, 3),
    }


def _images(engine: Engine, requests: list[GenerationRequest]) -> tuple[list[np.ndarray], float]:
    """uint8 images and seconds per denoising step."""
    images, seconds, steps = [], 0.0, 0
    for req in requests:
        result = engine.generate(req)
        images.append(np.asarray(result.images[0]))
        seconds += result.timings["denoise"]
        steps += req.num_inference_steps or engine.spec.num_inference_steps
    return images, seconds / steps


def _quality(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    psnrs = [min(psnr(x, y), 99.0) for x, y in zip(a, b)]
    return {"psnr_db": round(float(np.mean(psnrs)), 2), "psnr_min_db": round(float(min(psnrs)), 2),
            "ssim": round(float(np.mean([ssim(x, y) for x, y in zip(a, b)])), 4)}


def tiny(folder: Path) -> dict:
    out = {}
    requests = [GenerationRequest(prompt=p, size="64x64", num_inference_steps=4, seed=i)
                for i, p in enumerate(["a red circle on a blue background", "a green square"])]
    for family in FAMILIES:
        model = str(make_tiny(family, folder / family))
        base, base_step = _images(Engine(EngineConfig(model=model, device="cpu")), requests)
        got, step = _images(Engine(EngineConfig(model=model, device="cpu", quant=FP8)), requests)
        out[family] = {**_bytes(model), "step_s_fp32": round(base_step, 4), "step_s_fp8": round(step, 4),
                       "time_ratio": round(step / base_step, 3), **_quality(base, got)}
    return out


def block_stack(hidden: int = 1536, heads: int = 24, blocks: int = 2, tokens: int = 256, text: int = 64,
                device: str = "cpu") -> dict:
    """On ``cuda`` the stack runs in bfloat16 (W8A8 on sm89+) and reports peak memory too."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    stack = torch.nn.ModuleList(FluxTransformerBlock(hidden, heads, hidden // heads) for _ in range(blocks)).eval()
    for p in stack.parameters():  # init-like scale: the default init of an untrained stack
        p.data.normal_(0, hidden ** -0.5)
    stack = stack.to(device, dtype)
    x, c, temb = (torch.randn(1, tokens, hidden), torch.randn(1, text, hidden), torch.randn(1, hidden))
    x, c, temb = (t.to(device, dtype) for t in (x, c, temb))

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, float, int]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            best = float("inf")
            for _ in range(3):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                h, e = x, c
                for block in model:
                    e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb)
                if cuda:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        return h.float(), best, torch.cuda.max_memory_allocated() if cuda else 0

    bytes_bf16 = sum(p.numel() * 2 for p in stack.parameters())
    ref, t_ref, mem_ref = run(stack)
    kernel = fp8.select_kernel(device, dtype)
    quant = fp8.Fp8Plan(FluxAdapter.quant_ignored_layers, kernel, dtype)
    if cuda:  # quantization reads the weights on the CPU (as at load), then they go back
        stack = stack.to("cpu")
    names = fp8.quantize_model(stack, quant)
    stack = stack.to(device)
    bytes_fp8 = sum(p.numel() * (p.element_size() if p.dtype == fp8.FP8 else 2) for p in stack.parameters()) + \
        sum(b.numel() * b.element_size() for b in stack.buffers())
    # the quantized linears alone, biases counted as bfloat16 on both sides
    mods = [stack.get_submodule(n) for n in names]
    layers_fp8 = sum(m.weight.numel() + m.weight_scale.numel() * 4 + (m.bias.numel() * 2 if m.bias is not None else 0)
                     for m in mods)
    layers_bf16 = sum(m.weight.numel() * 2 + (m.bias.numel() * 2 if m.bias is not None else 0) for m in mods)
    got, t_fp8, mem_fp8 = run(stack)
    rmse = float((got - ref).pow(2).mean().sqrt())
    return {
        "device": device, "dtype": str(dtype).removeprefix("torch."), "kernel": kernel.name,
        "max_memory_allocated": {"unquantized": mem_ref, "fp8": mem_fp8} if cuda else None,
        "shape": {"hidden": hidden, "heads": heads, "blocks": blocks, "image_tokens": tokens, "text_tokens": text},
        "quantized_layers": len(names), "bytes_bf16": bytes_bf16, "bytes_fp8": bytes_fp8,
        "bytes_ratio": round(bytes_fp8 / bytes_bf16, 3), "quantized_layer_ratio": round(layers_fp8 / layers_bf16, 3),
        "forward_s_unquantized": round(t_ref, 4),
        "forward_s_fp8": round(t_fp8, 4), "time_ratio": round(t_fp8 / t_ref, 3),
        "psnr_db": round(20 * float(np.log10(float(ref.max() - ref.min()) / rmse)), 2),
        "rel_err": round(rmse / float(ref.pow(2).mean().sqrt()), 5),
    }


def demo(prompts: int) -> dict:
    from ditserve.tools.demo.data import held_out_prompts

    torch.manual_seed(0)
    classifier = train_classifier()
    samples = held_out_prompts(prompts)
    requests = [GenerationRequest(prompt=s.caption, seed=i) for i, s in enumerate(samples)]
    base, base_step = _images(Engine(EngineConfig(model="ditserve/demo", device="cpu")), requests)
    got, step = _images(Engine(EngineConfig(model="ditserve/demo", device="cpu", quant=FP8)), requests)
    acc_base, acc_fp8 = score(base, samples, classifier), score(got, samples, classifier)
    return {"prompts": prompts, "steps": 20, **_quality(base, got), "step_s_fp32": round(base_step, 4),
            "step_s_fp8": round(step, 4), "accuracy_unquantized": acc_base, "accuracy_fp8": acc_fp8,
            "max_accuracy_drop_points": round(max(100 * (acc_base[k] - acc_fp8[k]) for k in acc_base), 1),
            **_bytes("ditserve/demo")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-prompts", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="skip the demo model")
    parser.add_argument("--device", default="cpu", help="where the block stack runs; cuda: bfloat16, W8A8 on sm89+")
    parser.add_argument("--hidden", type=int, default=1536, help="block stack width (Qwen-Image/FLUX: 3072)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens of the block stack")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as folder:
        result = {"benchmark": "quantization", "device": "cpu", "kernel": fp8.select_kernel("cpu", torch.float32).name,
                  "tiny": tiny(Path(folder)),
                  "block_stack": block_stack(args.hidden, args.hidden // 64, args.blocks, args.tokens, device=args.device)}
    if not args.quick:
        result["demo"] = demo(args.demo_prompts)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
