"""What CPU offload costs and saves on a DiT with real-sized blocks (random weights).

    python benchmarks/offload.py [--family qwen-image] [--blocks 3] [--image-tokens 64]
        [--text-tokens 16] [--steps 2] [--dtype float32] [--device cpu]

Builds the family's diffusers transformer class from its real config (hidden size, heads, MLP),
with ``--blocks`` blocks and random weights, and runs the same denoiser calls four ways, in the same
process, on the same weights:

- ``resident``: every weight on the device;
- ``model_level``: ``enable_cpu_offload`` (the whole DiT onloaded once per request of ``--steps``
  calls, then offloaded);
- ``layerwise``: ``enable_layerwise_offload``, one block per group, the next one prefetched;
- ``layerwise_disk``: the same with ``offload_device='disk'`` (safetensors, read through mmap).

For each: ``peak_weight_bytes`` (DiT weight bytes on the device at the peak: the resident non-block
modules plus the most block bytes materialized at once), ``step_s`` (seconds per denoiser call,
median over requests, transfers included) and the ratios to ``resident``; every mode's output is
checked equal to the resident output. On CPU the "device" copy is a memory copy (no PCIe), so the
time ratio says little about a GPU; the byte counts are exact either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ditserve.features.offload import (  # noqa: E402
    OffloadConfig,
    apply_layerwise_offload,
    apply_model_offload,
    offload_session,
    remove_layerwise_offload,
    remove_model_offload,
)


def _qwen(blocks: int, image_tokens: int, text_tokens: int, dtype: torch.dtype, device: torch.device):
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(num_layers=blocks)  # the rest: Qwen-Image's real config
    side = int(image_tokens ** 0.5)
    kwargs = dict(
        hidden_states=torch.randn(1, side * side, model.config.in_channels),
        encoder_hidden_states=torch.randn(1, text_tokens, model.config.joint_attention_dim),
        encoder_hidden_states_mask=torch.ones(1, text_tokens, dtype=torch.long),
        timestep=torch.tensor([0.5]), img_shapes=[(1, side, side)], return_dict=False,
    )
    return model, list(model.transformer_blocks), kwargs


def _flux(blocks: int, image_tokens: int, text_tokens: int, dtype: torch.dtype, device: torch.device):
    from diffusers import FluxTransformer2DModel

    double = max(1, blocks // 2)
    model = FluxTransformer2DModel(num_layers=double, num_single_layers=blocks - double, guidance_embeds=True)
    kwargs = dict(
        hidden_states=torch.randn(1, image_tokens, model.config.in_channels),
        encoder_hidden_states=torch.randn(1, text_tokens, model.config.joint_attention_dim),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3), return_dict=False,
    )
    return model, list(model.transformer_blocks) + list(model.single_transformer_blocks), kwargs


FAMILIES = {"qwen-image": _qwen, "flux": _flux}


def _bytes(modules) -> int:
    seen, total = set(), 0
    for root in modules:
        for t in list(root.parameters()) + list(root.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _time(model, kwargs, steps: int, requests: int, session=None) -> tuple[float, torch.Tensor]:
    per_step, out = [], None
    for _ in range(requests):
        start = time.perf_counter()
        with torch.inference_mode(), (session() if session else _null()):
            for _ in range(steps):
                out = model(**kwargs)[0]
        if torch.device(out.device).type == "cuda":
            torch.cuda.synchronize()
        per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step), out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen-image", choices=list(FAMILIES))
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--image-tokens", type=int, default=64, help="a square number")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="denoiser calls per request")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    model, blocks, kwargs = FAMILIES[args.family](args.blocks, args.image_tokens, args.text_tokens, dtype, device)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    kwargs = {k: (v.to(device, dtype if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v)
              for k, v in kwargs.items()}
    total, block_bytes = _bytes([model]), _bytes(blocks)
    _time(model, kwargs, 1, 1)  # warm-up
    results = {}
    step, ref = _time(model, kwargs, args.steps, args.requests)
    results["resident"] = {"peak_weight_bytes": total, "step_s": step}

    offload = apply_model_offload([model], device)
    step, out = _time(model, kwargs, args.steps, args.requests, lambda: offload_session([model]))
    assert torch.equal(out, ref)
    results["model_level"] = {"peak_weight_bytes": offload.weights.nbytes, "idle_weight_bytes": 0, "step_s": step}
    remove_model_offload([model])
    del offload, out

    for name, tier in (("layerwise", "cpu"), ("layerwise_disk", "disk")):
        with tempfile.TemporaryDirectory() as folder:
            config = OffloadConfig(enable_layerwise_offload=True, offload_device=tier,
                                   offload_disk_dir=folder if tier == "disk" else None)
            layerwise = apply_layerwise_offload(model, blocks, device, config)
            step, out = _time(model, kwargs, args.steps, args.requests)
            assert torch.equal(out, ref)
            results[name] = {"peak_weight_bytes": total - block_bytes + layerwise.max_device_bytes,
                             "idle_weight_bytes": total - block_bytes, "max_blocks_on_device":
                             layerwise.max_blocks_materialized, "host_tier_bytes": layerwise.host_bytes(),
                             "step_s": step}
            remove_layerwise_offload(model)
            del layerwise, out
    base = results["resident"]
    for r in results.values():
        r["step_ratio"] = round(r["step_s"] / base["step_s"], 3)
        r["weight_ratio"] = round(r["peak_weight_bytes"] / base["peak_weight_bytes"], 3)
        r["step_s"] = round(r["step_s"], 4)
    print(json.dumps({
        "family": args.family, "transformer_class": type(model).__name__, "blocks": len(blocks),
        "block_bytes": block_bytes // len(blocks), "dtype": args.dtype, "device": str(device),
        "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "steps": args.steps,
        "requests": args.requests, "modes": results,
    }))


if __name__ == "__main__":
    main()
