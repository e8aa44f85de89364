"""Cache quality vs speed: our TeaCache and DBCache (+TaylorSeer, SCM) next to diffusers' own
FirstBlockCache / TaylorSeer hooks and the cache-dit library, on the same checkpoint.

    python benchmarks/cache_quality.py [--model ditserve/demo] [--prompts 8] [--steps N] [--quick]

For every method and setting, over a fixed prompt set with fixed seeds: transformer wall time and
transformer block evaluations vs the same system uncached (ratios), and PSNR / SSIM of the final
image vs the uncached image. Block evaluations are counted the same way for all three systems (a
pre-hook on each block's attention module: an evaluated block calls it once), and time is the time
spent inside the transformer's forward (so the text encoder and VAE, identical for all, do not
dilute the ratio). Prints one JSON object. cache-dit is a benchmark-only extra
(`pip install -e .[bench]`); without it its rows are skipped and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ditserve.deployments import Engine, EngineConfig, GenerationRequest  # noqa: E402
from ditserve.features.cache import CacheDiTConfig  # noqa: E402
from ditserve.models import adapter_class, implemented_families  # noqa: E402


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a diffusers transformer, as the family adapter declares them (``cache_blocks``)."""
    for family in implemented_families():
        cls = adapter_class(family)
        if isinstance(transformer, cls.denoiser_class()) and cls.cache_blocks is not None:
            return cls.cache_blocks.blocks(transformer)
    raise ValueError(f"no adapter declares cache blocks for {type(transformer).__name__}")
from ditserve.models import resolve_model  # noqa: E402
from ditserve.tools.demo.evaluate import psnr, ssim  # noqa: E402


# ---- instrumentation shared by the three systems ------------------------------------------------

class Probe:
    """Counts evaluated blocks and times the transformer's forward calls."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.blocks = 0
        self.seconds = 0.0
        self._start = 0.0
        # attn.to_q runs once per evaluated block; no cache here predicts it (diffusers' TaylorSeer
        # predicts whole attention outputs, so a hook on attn itself would count predicted calls)
        self.handles = [b.attn.to_q.register_forward_pre_hook(self._count) for b in transformer_blocks(transformer)]
        self.handles.append(transformer.register_forward_pre_hook(self._begin))
        self.handles.append(transformer.register_forward_hook(self._end))

    def _count(self, *_):
        self.blocks += 1

    def _begin(self, *_):
        self._start = time.perf_counter()

    def _end(self, *_):
        self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.blocks, self.seconds = 0, 0.0


def run_set(generate: Callable[[str, int], np.ndarray], prompts: list[str], probe: Probe,
            repeats: int = 1) -> tuple[list[np.ndarray], int, float]:
    """Images, block evaluations and transformer seconds (the fastest of ``repeats`` passes)."""
    seconds = math.inf
    for _ in range(repeats):
        probe.reset()
        images = [generate(p, i) for i, p in enumerate(prompts)]
        seconds = min(seconds, probe.seconds)
    return images, probe.blocks, seconds


def baseline(generate: Callable[[str, int], np.ndarray], prompts: list[str], probe: Probe) -> tuple:
    generate(prompts[0], 0)  # first calls pay one-off costs (allocator, lazy init)
    return run_set(generate, prompts, probe, repeats=2)


def compare(name: str, setting: dict, images: list[np.ndarray], blocks: int, seconds: float,
            base: tuple[list[np.ndarray], int, float]) -> dict:
    base_images, base_blocks, base_seconds = base
    psnrs = [psnr(a, b) for a, b in zip(images, base_images)]
    return {
        "system": name,
        "setting": setting,
        "baseline_blocks": base_blocks,
        "baseline_transformer_s": round(base_seconds, 4),
        "blocks": blocks,
        "block_ratio": round(base_blocks / blocks, 3),
        "transformer_s": round(seconds, 4),
        "speedup": round(base_seconds / seconds, 3),
        "psnr_db": round(float(np.mean([min(p, 99.0) for p in psnrs])), 2),
        "psnr_min_db": round(float(min(psnrs)), 2) if min(psnrs) < math.inf else math.inf,
        "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(images, base_images)])), 4),
    }


# ---- the three systems --------------------------------------------------------------------------

OURS = [
    ("tea_cache", {}),  # defaults: rel_l1_thresh 0.2, the checkpoint's fitted polynomial
    ("tea_cache", {"rel_l1_thresh": 0.1}),
    ("tea_cache", {"rel_l1_thresh": 0.4}),
    ("cache_dit", {}),  # defaults: F1B0, threshold 0.24, warm-up 4, at most 3 in a row, TaylorSeer on
    ("cache_dit", {"enable_taylorseer": False}),  # plain DBCache (vLLM-Omni's defaults)
    ("cache_dit", {"residual_diff_threshold": 0.12}),
    ("cache_dit", {"max_continuous_cached_steps": -1, "max_warmup_steps": 1}),
    ("cache_dit", {"scm_steps_mask_policy": "fast"}),
    ("cache_dit", {"scm_steps_mask_policy": "fast", "scm_steps_policy": "static"}),
    ("cache_dit", {"scm_steps_mask_policy": "ultra", "scm_steps_policy": "static"}),
]
# the same DBCache settings in the cache-dit library (its SCM rows use its own mask presets)
CACHE_DIT = [s for b, s in OURS if b == "cache_dit"]


def ours(model: str, prompts: list[str], steps: int | None, only: list | None = None) -> list[dict]:
    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32"))
    probe = Probe(engine.adapter.transformer)

    def make(cache: dict | None):
        def generate(prompt: str, i: int) -> np.ndarray:
            req = GenerationRequest(prompt=prompt, seed=1000 + i, num_inference_steps=steps, cache=cache)
            return (engine.generate(req, output_type="np").images[0] * 255).round().astype(np.uint8)
        return generate

    base = baseline(make(None), prompts, probe)
    rows = []
    for backend, setting in only or OURS:
        rows.append(compare("ditserve", {"backend": backend, **setting},
                            *run_set(make({"backend": backend, "config": setting}), prompts, probe), base))
    return rows


def _pipeline(model: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(resolve_model(model).path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_generate(pipe, steps: int, spec):
    # the request our engine resolves by default: the model's size, its default negative prompt and
    # true_cfg_scale (the demo model runs true CFG by default), so all three systems do the same work
    cfg = {}
    if spec.default_negative_prompt is not None:
        cfg = {"negative_prompt": spec.default_negative_prompt, "true_cfg_scale": spec.true_cfg_scale}

    def generate(prompt: str, i: int) -> np.ndarray:
        out = pipe(prompt=prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(1000 + i),
                   output_type="np", height=spec.default_height, width=spec.default_width, **cfg)
        return (out.images[0] * 255).round().astype(np.uint8)
    return generate


def diffusers_hooks(model: str, prompts: list[str], steps: int) -> list[dict]:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    pipe = _pipeline(model)
    probe = Probe(pipe.transformer)
    generate = _pipe_generate(pipe, steps, resolve_model(model).spec)
    base = baseline(generate, prompts, probe)
    rows = []
    configs = [
        ("FirstBlockCache", {"threshold": 0.05}, FirstBlockCacheConfig(threshold=0.05)),
        ("FirstBlockCache", {"threshold": 0.1}, FirstBlockCacheConfig(threshold=0.1)),
        ("FirstBlockCache", {"threshold": 0.2}, FirstBlockCacheConfig(threshold=0.2)),
        ("TaylorSeer", {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1},
         TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1,
                               taylor_factors_dtype=torch.float32)),
        ("TaylorSeer", {"cache_interval": 2, "disable_cache_before_step": 4, "max_order": 1},
         TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=4, max_order=1,
                               taylor_factors_dtype=torch.float32)),
    ]
    for name, setting, config in configs:
        pipe.transformer.enable_cache(config)
        try:
            rows.append(compare("diffusers", {"method": name, **setting}, *run_set(generate, prompts, probe), base))
        finally:
            pipe.transformer.disable_cache()
    return rows


@contextlib.contextmanager
def _stdout_to_stderr():
    """cache-dit logs to stdout, where our JSON goes: point file descriptor 1 at stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cache_dit_lib(model: str, prompts: list[str], steps: int) -> list[dict]:
    with _stdout_to_stderr():
        return _cache_dit_rows(model, prompts, steps)


def _cache_dit_rows(model: str, prompts: list[str], steps: int) -> list[dict]:
    try:
        import cache_dit
    except ImportError:
        return [{"system": "cache-dit", "skipped": "not installed (pip install -e .[bench])"}]
    pipe = _pipeline(model)
    probe = Probe(pipe.transformer)
    generate = _pipe_generate(pipe, steps, resolve_model(model).spec)
    base = baseline(generate, prompts, probe)
    rows = []
    for setting in CACHE_DIT:
        ours_cfg = CacheDiTConfig(**setting)  # our defaults, spelled out for cache-dit
        kwargs = {}
        if ours_cfg.scm_steps_mask_policy:
            kwargs = {"steps_computation_mask": cache_dit.steps_mask(mask_policy=ours_cfg.scm_steps_mask_policy,
                                                                     total_steps=steps),
                      "steps_computation_policy": ours_cfg.scm_steps_policy}
        # tell cache-dit whether the pipeline calls the transformer once per branch (true CFG), or its
        # step counters run at the wrong speed
        config = cache_dit.DBCacheConfig(
            num_inference_steps=steps, enable_separate_cfg=resolve_model(model).spec.default_negative_prompt is not None, Fn_compute_blocks=ours_cfg.Fn_compute_blocks,
            Bn_compute_blocks=ours_cfg.Bn_compute_blocks, residual_diff_threshold=ours_cfg.residual_diff_threshold,
            max_warmup_steps=ours_cfg.max_warmup_steps, max_cached_steps=ours_cfg.max_cached_steps,
            max_continuous_cached_steps=ours_cfg.max_continuous_cached_steps, **kwargs,
        )
        calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=ours_cfg.taylorseer_order)
                      if ours_cfg.enable_taylorseer else None)
        cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
        try:
            rows.append(compare("cache-dit", {"backend": "cache_dit", **setting}, *run_set(generate, prompts, probe), base))
        finally:
            cache_dit.disable_cache(pipe)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ditserve/demo")
    parser.add_argument("--prompts", type=int, default=8, help="prompts from the demo's held-out set")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--systems", default="ours,diffusers,cache-dit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: timings that survive other load on a small machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ditserve.tools.demo.data import held_out_prompts

    prompts = [s.caption for s in held_out_prompts(args.prompts)]
    steps = args.steps or resolve_model(args.model).spec.num_inference_steps
    systems = args.systems.split(",")
    rows = []
    if "ours" in systems:
        rows += ours(args.model, prompts, steps)
    if "diffusers" in systems:
        rows += diffusers_hooks(args.model, prompts, steps)
    if "cache-dit" in systems:
        rows += cache_dit_lib(args.model, prompts, steps)
    print(json.dumps({"model": args.model, "steps": steps, "prompts": len(prompts), "threads": args.threads,
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
