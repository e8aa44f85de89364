"""Communication and step time of each DiT parallel layout, on local gloo ranks.

    python benchmarks/parallel_comm.py [--family qwen-image|flux] [--size 256] [--steps 4]
        [--layouts u2,r2,c2,t2,u2r2,u2c2,t2c2,r2t2]

Prints one JSON object: per layout, the bytes rank 0 hands to collectives per denoising step
(counted by the process groups), the analytical volume for that layout (formulas below), the
denoising step time, and its ratio to one rank in the same run. Every layout's latents are also
checked against the single rank's (max abs diff). Byte convention: what a rank hands to a
collective — an all-reduce or all-gather input once, an all-to-all's chunks for the other ranks,
each ring send.

Analytical, per attention layer, with H/T heads per rank, head dim D, batch B, fp32 (4 bytes):
  Ulysses (U): q, k, v chunks to the U-1 others plus the output chunks back;
  Ring (R):    R-1 sends of this rank's current K and V block;
  TP (T):      one all-reduce of each row-parallel linear's output (B × tokens × dim);
  CFG:         one all-gather of the prediction per step; SP: one gather at proj_out per forward.
On a 2-core CPU machine ranks share two cores, so step times measure correctness and overhead,
not scaling; run it on GPUs (NCCL) for scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ditserve.deployments import Engine, EngineConfig, GenerationRequest  # noqa: E402
from ditserve.deployments.local import run_local  # noqa: E402
from ditserve.models.loading import read_checkpoint  # noqa: E402
from ditserve.models.tiny import make_tiny  # noqa: E402
from ditserve.parallel import ParallelConfig  # noqa: E402
from ditserve.parallel.sequence import shard_sizes  # noqa: E402

ELEM = 4
SHORT = {"u": "ulysses_degree", "r": "ring_degree", "c": "cfg_parallel_size", "t": "tensor_parallel_size"}


def parse_layout(text: str) -> ParallelConfig:
    degrees = {}
    for key, value in zip(text[::2], text[1::2]):
        degrees[SHORT[key]] = int(value)
    return ParallelConfig(**degrees)


def analytical_bytes(cfg: ParallelConfig, tconf: dict, family: str, txt: int, img: int, latent_ch: int,
                     negative: bool, batch: int = 1) -> int:
    """Bytes rank 0 hands to collectives in one denoising step (see the module docstring)."""
    u, r, t = cfg.ulysses_degree, cfg.ring_degree, cfg.tensor_parallel_size
    p = u * r
    heads, d = tconf["num_attention_heads"] // t, tconf["attention_head_dim"]
    dim = tconf["num_attention_heads"] * d
    txt_s, img_s = shard_sizes(txt, p), shard_sizes(img, p)
    local = [a + b for a, b in zip(txt_s, img_s)]
    double = tconf["num_layers"]
    single = tconf.get("num_single_layers", 0)
    attn_layers = double + single

    per_attention = 0
    if u > 1:  # rank 0: sp index 0, its ulysses members are sp indices 0..u-1
        hu = heads // u
        per_attention += 3 * (u - 1) * hu * local[0] * d  # q, k, v chunks out
        per_attention += hu * sum(local[1:u]) * d  # output pieces back
    if r > 1:
        hu = heads // u
        blocks = [sum(local[i * u:(i + 1) * u]) for i in range(r)]
        per_attention += sum(2 * hu * blocks[(0 - s) % r] * d for s in range(r - 1))
    per_forward = per_attention * attn_layers * batch * ELEM
    if p > 1:
        per_forward += 2 * 8  # the int64 sequence-length all-gathers (attention, proj_out)
        per_forward += max(img_s) * latent_ch * batch * ELEM  # proj_out gather, padded to the longest shard
    if t > 1:
        tokens = txt_s[0] + img_s[0]
        per_forward += double * 2 * tokens * dim * batch * ELEM  # attn out + MLP out, both streams
        per_forward += single * tokens * dim * batch * ELEM  # single-stream proj_out
    forwards = 1 if (cfg.cfg_parallel_size > 1 or not negative) else 2
    total = per_forward * forwards
    if cfg.cfg_parallel_size > 1 and negative:
        total += img * latent_ch * batch * ELEM  # all-gather of this rank's branch prediction
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="qwen-image", choices=["qwen-image", "flux"])
    parser.add_argument("--model", help="diffusers folder (default: a tiny checkpoint of --family)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", default="u2,r2,c2,t2,u2r2,u2c2,t2c2,r2t2")
    args = parser.parse_args()

    model = args.model or str(make_tiny(args.family, os.path.join(tempfile.mkdtemp(), args.family)))
    fields = dict(prompt="a red circle on a blue background", size=f"{args.size}x{args.size}",
                  num_inference_steps=args.steps, seed=0)
    if args.family == "qwen-image":
        fields.update(negative_prompt="blurry", true_cfg_scale=4.0)
    else:
        fields.update(negative_prompt="blurry", true_cfg_scale=3.0, guidance_scale=3.5)
    request = GenerationRequest(**fields)

    engine = Engine(EngineConfig(model=model, device="cpu"))
    resolved = engine.resolve(request)
    cond = engine.encode(resolved)
    txt = cond.positive["encoder_hidden_states"].shape[1]
    tconf = read_checkpoint(engine.resolved.path).config("transformer")

    base = run_local(EngineConfig(model=model, device="cpu"), [request])[0][0]
    img, latent_ch = base["latents"].shape[1], base["latents"].shape[2]
    base_step = base["timings"]["denoise"] / args.steps
    results = []
    for text in args.layouts.split(","):
        cfg = parse_layout(text)
        ranks = run_local(EngineConfig(model=model, device="cpu", parallel=cfg), [request])
        rank0 = ranks[0][0]
        step = rank0["timings"]["denoise"] / args.steps
        results.append({
            "layout": cfg.describe(),
            "world": cfg.world_size,
            "bytes_per_step_rank0_measured": rank0["bytes_sent"] // args.steps,
            "bytes_per_step_rank0_analytical": analytical_bytes(cfg, tconf, args.family, txt, img, latent_ch, True),
            "step_s": round(step, 5),
            "step_vs_one_rank": round(step / base_step, 3),
            "max_abs_diff_vs_one_rank": max(float((r[0]["latents"] - base["latents"]).abs().max()) for r in ranks),
        })
    print(json.dumps({
        "benchmark": "parallel_comm",
        "model": model if args.model else f"tiny {args.family}",
        "size": args.size, "steps": args.steps, "text_tokens": txt, "image_tokens": img,
        "one_rank_step_s": round(base_step, 5),
        "layouts": results,
    }, indent=2))


if __name__ == "__main__":
    main()
