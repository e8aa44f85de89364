"""Communication and step time of each DiT parallel layout, on local gloo ranks.

    python benchmarks/parallel_comm.py [--family qwen-image|flux|z-image|sd3|flux2-klein] [--size 256]
        [--steps 4] [--layouts u2,r2,c2,t2,u2r2,u2c2,t2c2,r2t2]

Prints one JSON object: per layout, the bytes rank 0 hands to collectives per denoising step
(counted by the process groups), the analytical volume for that layout (formulas below), the
denoising step time, and its ratio to one rank in the same run. Every layout's latents are also
checked against the single rank's (max abs diff). A layout the model refuses at start-up
(``check_support``) is listed with ``skipped`` and the reason. Byte convention: what a rank hands
to a collective — an all-reduce or all-gather input once, an all-to-all's chunks for the other
ranks, each ring send.

Every family's request runs a negative branch (the guidance fields it takes: ``true_cfg_scale``
for qwen-image and flux, ``guidance_scale`` for z-image, sd3 and flux2-klein); the default
flux2-klein checkpoint is an undistilled tiny one (a step-distilled klein runs no CFG).

Analytical, per attention call, with H/T heads per rank, head dim D, batch B, fp32 (4 bytes):
  Ulysses (U): q, k, v chunks to the U-1 others plus the output chunks back;
  Ring (R):    R-1 sends of the current K and V block;
  SP:          one int64 length all-gather per distinct local length (one per forward; two for
               SD3.5-Medium's image-only ``attn2``), one gather (int64 lengths + the shard padded
               to the longest) at the plan's output;
  TP (T):      one all-reduce of each row-parallel linear's output (B × local tokens × dim);
  CFG:         one all-gather of the prediction per step.
Which sequences, attention calls and row-parallel linears each family has:
  qwen-image, flux, flux2-klein: text and image split; every block's attention joint over both;
               double blocks 4 row-parallel linears (attn and MLP out, both streams), single 1;
               CFG branches serial (two forwards a step without CFG-parallel).
  sd3:         as above, plus ``attn2`` (image only) in the dual-attention blocks; the last block
               has no text out/MLP; CFG branches batched into one call (B=2).
  z-image:     image and caption padded to multiples of 32 and refined unsplit (refiner attention
               runs locally, their TP all-reduces on full sequences), then joined and split at the
               first main layer; CFG branches batched when their padded caption lengths agree.
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
from ditserve.deployments.attach import check_support  # noqa: E402
from ditserve.deployments.local import run_local  # noqa: E402
from ditserve.models.loading import read_checkpoint  # noqa: E402
from ditserve.models.tiny import make_tiny  # noqa: E402
from ditserve.parallel import ParallelConfig  # noqa: E402
from ditserve.parallel.sequence import shard_sizes  # noqa: E402

ELEM = 4
FAMILIES = ["qwen-image", "flux", "z-image", "sd3", "flux2-klein"]
SHORT = {"u": "ulysses_degree", "r": "ring_degree", "c": "cfg_parallel_size", "t": "tensor_parallel_size"}


def parse_layout(text: str) -> ParallelConfig:
    degrees = {}
    for key, value in zip(text[::2], text[1::2]):
        degrees[SHORT[key]] = int(value)
    return ParallelConfig(**degrees)


def sp_attention_elems(cfg: ParallelConfig, heads: int, d: int, local: list[int]) -> int:
    """Elements rank 0 (sp index 0) hands to collectives in one USP attention call of one sample,
    with ``heads`` heads on this tp rank and sp members' local sequence lengths ``local``."""
    u, r = cfg.ulysses_degree, cfg.ring_degree
    hu = heads // u
    elems = 0
    if u > 1:  # rank 0's ulysses members are sp indices 0..u-1
        elems += 3 * (u - 1) * hu * local[0] * d  # q, k, v chunks out
        elems += hu * sum(local[1:u]) * d  # output pieces back
    if r > 1:
        blocks = [sum(local[i * u:(i + 1) * u]) for i in range(r)]
        elems += sum(2 * hu * blocks[(0 - s) % r] * d for s in range(r - 1))  # K and V passed on
    return elems


def gather_bytes(cfg: ParallelConfig, shards: list[int], channels: int, batch: int) -> int:
    """An sp output gather: its int64 length all-gather, then the shard padded to the longest."""
    return 8 + max(shards) * channels * batch * ELEM if cfg.ulysses_degree * cfg.ring_degree > 1 else 0


def joint_forward(cfg: ParallelConfig, s: dict, batch: int, txt: int) -> int:
    """qwen-image, flux, flux2-klein: text and image tokens each split (the class's ``_cp_plan``);
    every attention joint over both; TP all-reduces: double blocks attn out + MLP out of both
    streams, single blocks one ``proj_out``/``to_out``."""
    p, t = cfg.ulysses_degree * cfg.ring_degree, cfg.tensor_parallel_size
    txt_s, img_s = shard_sizes(txt, p), shard_sizes(s["img"], p)
    local = [a + b for a, b in zip(txt_s, img_s)]
    heads = s["heads"] // t
    total = 0
    if p > 1:
        total += sp_attention_elems(cfg, heads, s["d"], local) * (s["double"] + s["single"]) * batch * ELEM
        total += 8  # the one int64 sequence-length all-gather of the attention calls
        total += gather_bytes(cfg, img_s, s["out_ch"], batch)  # proj_out
    if t > 1:
        tokens = txt_s[0] + img_s[0]
        total += (s["double"] * 2 + s["single"]) * tokens * s["dim"] * batch * ELEM
    return total


def sd3_forward(cfg: ParallelConfig, s: dict, batch: int, txt: int) -> int:
    """sd3: text split at ``context_embedder``, image at ``pos_embed``; every block's joint attention
    over both, the dual-attention blocks' ``attn2`` over image tokens only (a second int64 length
    all-gather per forward); TP all-reduces per block: ``attn.to_out`` and ``ff`` (image), and,
    but for the last (context_pre_only) block, ``to_add_out`` and ``ff_context`` (text), plus
    ``attn2.to_out`` in the dual blocks; gather at ``proj_out`` (image tokens × patch² · C)."""
    p, t = cfg.ulysses_degree * cfg.ring_degree, cfg.tensor_parallel_size
    txt_s, img_s = shard_sizes(txt, p), shard_sizes(s["img"], p)
    local = [a + b for a, b in zip(txt_s, img_s)]
    heads, d, layers, dual = s["heads"] // t, s["d"], s["double"], s["dual"]
    total = 0
    if p > 1:
        elems = sp_attention_elems(cfg, heads, d, local) * layers + sp_attention_elems(cfg, heads, d, img_s) * dual
        total += elems * batch * ELEM + 8 * (1 + (dual > 0))
        total += gather_bytes(cfg, img_s, s["out_ch"], batch)
    if t > 1:
        per_img = img_s[0]
        rows = layers * 2 * per_img + (layers - 1) * 2 * txt_s[0] + dual * per_img
        total += rows * s["dim"] * batch * ELEM
    return total


def z_image_forward(cfg: ParallelConfig, s: dict, batch: int, cap: int) -> int:
    """z-image: image tokens and caption each padded to a multiple of 32 and refined unsplit (the
    refiners' attention runs locally), then joined and split at ``layers.0``: only the main layers'
    attention is sequence parallel; gather at the final layer (joined tokens × patch² · C). TP
    all-reduces: attention out + ``w2`` of every block, refiners included (image refiner on the
    padded image tokens, context refiner on the padded caption)."""
    p, t = cfg.ulysses_degree * cfg.ring_degree, cfg.tensor_parallel_size
    img_pad, cap_pad = -(-s["img"] // 32) * 32, -(-cap // 32) * 32
    joined = shard_sizes(img_pad + cap_pad, p)
    heads = s["heads"] // t
    total = 0
    if p > 1:
        total += sp_attention_elems(cfg, heads, s["d"], joined) * s["double"] * batch * ELEM + 8
        total += gather_bytes(cfg, joined, s["out_ch"], batch)
    if t > 1:
        rows = 2 * (s["double"] * joined[0] + s["refiners"] * (img_pad + cap_pad))
        total += rows * s["dim"] * batch * ELEM
    return total


def analytical_bytes(cfg: ParallelConfig, family: str, s: dict) -> int:
    """Bytes rank 0 hands to collectives in one denoising step (see the module docstring).

    ``s``: the structure (heads, head dim ``d``, ``dim``, block counts, token counts, output
    channels per token, prediction size, whether a negative branch runs, whether CFG branches are
    batched into one call)."""
    cfg_par = cfg.cfg_parallel_size > 1
    neg = s["negative"]
    if family == "z-image":
        caps = s["caps"] if neg else s["caps"][:1]
        if cfg_par and neg:  # rank 0 runs the positive branch
            calls = [(1, caps[0])]
        elif neg and len({-(-c // 32) for c in caps}) == 1:  # both branches in one call
            calls = [(2, caps[0])]
        else:
            calls = [(1, c) for c in caps]
        total = sum(z_image_forward(cfg, s, b, c) for b, c in calls)
    else:
        forward = sd3_forward if family == "sd3" else joint_forward
        txts = s["txts"]
        if not neg or cfg_par:  # rank 0 runs the positive branch
            total = forward(cfg, s, 1, txts[0])
        elif s["batched"]:  # one call, both branches (their texts padded alike)
            total = forward(cfg, s, 2, txts[0])
        else:  # one call per branch, each with its own text length
            total = sum(forward(cfg, s, 1, n) for n in txts)
    if cfg_par and neg:
        total += s["pred"] * ELEM  # all-gather of this rank's branch prediction
    return total


def structure(family: str, tconf: dict, cond, latents) -> dict:
    """What the analytical volume needs, from the transformer config and one rank's run."""
    neg = cond.negative is not None
    if family == "z-image":
        heads, dim = tconf["n_heads"], tconf["dim"]
        patch = tconf["all_patch_size"][0] * tconf["all_f_patch_size"][0]
        _, c, h, w = latents.shape
        caps = [int(cond.positive["cap_lens"][0])] + ([int(cond.negative["cap_lens"][0])] if neg else [])
        return dict(heads=heads, d=dim // heads, dim=dim, double=tconf["n_layers"], refiners=tconf["n_refiner_layers"],
                    img=(h // tconf["all_patch_size"][0]) * (w // tconf["all_patch_size"][0]),
                    out_ch=tconf["all_patch_size"][0] * patch * c, caps=caps, pred=c * h * w, negative=neg)
    heads, d = tconf["num_attention_heads"], tconf["attention_head_dim"]
    txts = [kw["encoder_hidden_states"].shape[1] for kw in (cond.positive, cond.negative) if kw is not None]
    s = dict(heads=heads, d=d, dim=heads * d, txts=txts, negative=neg, double=tconf["num_layers"])
    if family == "sd3":
        _, c, h, w = latents.shape
        patch = tconf["patch_size"]
        s.update(img=(h // patch) * (w // patch), out_ch=patch * patch * c, pred=c * h * w, batched=True,
                 dual=len(tconf.get("dual_attention_layers") or ()))
    else:
        _, img, ch = latents.shape
        s.update(img=img, out_ch=ch, pred=img * ch, single=tconf.get("num_single_layers", 0), batched=False)
    return s


def request_fields(family: str) -> dict:
    """The guidance fields each family takes, so that every family runs a negative branch."""
    return {
        "qwen-image": dict(negative_prompt="blurry", true_cfg_scale=4.0),
        "flux": dict(negative_prompt="blurry", true_cfg_scale=3.0, guidance_scale=3.5),
        "z-image": dict(negative_prompt="blurry", guidance_scale=3.0),
        "sd3": dict(negative_prompt="blurry", guidance_scale=4.5),
        "flux2-klein": dict(negative_prompt="blurry", guidance_scale=4.0),
    }[family]


def tiny_checkpoint(family: str, root: str) -> str:
    """A tiny checkpoint of ``family``; for flux2-klein an undistilled one (klein-base), the only
    kind that runs CFG, marked as a CFG model in its ``ditserve.json``."""
    out = os.path.join(root, family)
    if family != "flux2-klein":
        return str(make_tiny(family, out))
    import torch
    from ditserve.models.tiny.flux2_klein import flux2_klein_pipeline

    make_tiny(family, out, spec_overrides=dict(guidance="cfg", guidance_scale=4.0))  # writes ditserve.json
    torch.manual_seed(0)  # then the undistilled pipeline over the distilled one's files
    flux2_klein_pipeline(distilled=False).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="qwen-image", choices=FAMILIES)
    parser.add_argument("--model", help="diffusers folder (default: a tiny checkpoint of --family)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", default="u2,r2,c2,t2,u2r2,u2c2,t2c2,r2t2")
    args = parser.parse_args()

    model = args.model or tiny_checkpoint(args.family, tempfile.mkdtemp())
    request = GenerationRequest(prompt="a red circle on a blue background", size=f"{args.size}x{args.size}",
                                num_inference_steps=args.steps, seed=0, **request_fields(args.family))

    engine = Engine(EngineConfig(model=model, device="cpu"))
    cond = engine.encode(engine.resolve(request))
    tconf = read_checkpoint(engine.resolved.path).config("transformer")

    base = run_local(EngineConfig(model=model, device="cpu"), [request])[0][0]
    s = structure(args.family, tconf, cond, base["latents"])
    base_step = base["timings"]["denoise"] / args.steps
    results = []
    for text in args.layouts.split(","):
        cfg = parse_layout(text)
        config = EngineConfig(model=model, device="cpu", parallel=cfg)
        try:
            check_support(config)
        except ValueError as err:
            results.append({"layout": cfg.describe(), "skipped": str(err)})
            continue
        ranks = run_local(config, [request])
        rank0 = ranks[0][0]
        step = rank0["timings"]["denoise"] / args.steps
        results.append({
            "layout": cfg.describe(),
            "world": cfg.world_size,
            "bytes_per_step_rank0_measured": rank0["bytes_sent"] // args.steps,
            "bytes_per_step_rank0_analytical": analytical_bytes(cfg, args.family, s),
            "step_s": round(step, 5),
            "step_vs_one_rank": round(step / base_step, 3),
            "max_abs_diff_vs_one_rank": max(float((r[0]["latents"] - base["latents"]).abs().max()) for r in ranks),
        })
    print(json.dumps({
        "benchmark": "parallel_comm",
        "model": model if args.model else f"tiny {args.family}",
        "size": args.size, "steps": args.steps, "text_tokens": s.get("txts", s.get("caps")),
        "image_tokens": s["img"], "negative_branch": s["negative"],
        "one_rank_step_s": round(base_step, 5),
        "layouts": results,
    }, indent=2))


if __name__ == "__main__":
    main()
