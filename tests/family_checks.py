"""Checks every family's tests share (besides the layouts of ``layouts.py``).

``check_caches``: both block caches on one model, as every family verifies them — threshold 0
equals uncached (every block evaluated, both CFG branches through the hooks), and high thresholds
skip exactly what their policies say over 6 steps (TeaCache: the first and last steps always run;
DBCache: 2 warm-up steps, at most 2 skipped in a row, Fn=1 block run per skipped call) and change
the result. ``check_lora_refused``: a family whose diffusers pipeline has no LoRA loader refuses
``lora_dir`` at start-up and says why.
"""

from __future__ import annotations

import pytest
import torch

from ditserve.deployments import Engine, EngineConfig, GenerationRequest

CACHE_STEPS = 6
_DB = {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}
ZERO_THRESHOLD = ({"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
                  {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}})
# (cache, decisions over CACHE_STEPS, blocks a skipped call still runs)
HIGH_THRESHOLD = (({"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}, "CSSSSC", 0),
                  ({"backend": "cache_dit", "config": _DB}, "CCSSCS", 1))


def check_caches(engine, request: dict, blocks: int, branches: tuple[str, ...] = ("cond", "uncond")) -> None:
    """Run ``request`` (``GenerationRequest`` fields, CFG on) uncached and with each cache on
    ``engine``, a model of ``blocks`` transformer blocks, and assert the caches' contract."""
    def run(cache=None):
        return engine.generate(GenerationRequest(**request, num_inference_steps=CACHE_STEPS, cache=cache),
                               output_type="np")

    uncached = run()
    total = len(branches) * CACHE_STEPS * blocks
    for cache in ZERO_THRESHOLD:
        cached = run(cache)
        assert torch.equal(uncached.latents, cached.latents), cache
        assert cached.cache["calls_cached"] == 0 and set(cached.cache["decisions"]) == set(branches), cache
        assert cached.cache["blocks_evaluated"] == cached.cache["blocks_total"] == total, cache
    for cache, pattern, per_skip in HIGH_THRESHOLD:
        out = run(cache)
        assert out.cache["decisions"] == {b: pattern for b in branches}, cache
        skipped = pattern.count("S")
        assert out.cache["blocks_total"] == total
        assert out.cache["blocks_evaluated"] == len(branches) * ((CACHE_STEPS - skipped) * blocks + skipped * per_skip), cache
        assert not torch.equal(out.latents, uncached.latents), cache  # skipping changed something


def check_lora_refused(pipeline_cls: type, checkpoint, lora_dir) -> None:
    """``lora_dir`` on a model whose pipeline has no ``lora_state_dict`` (what reads adapter files)
    fails at start-up, naming the option and the reason."""
    from ditserve.features.lora import LoraConfig

    assert not hasattr(pipeline_cls, "lora_state_dict")
    with pytest.raises(ValueError, match=rf"lora_dir=.* does not support LoRA \({pipeline_cls.__name__} has no LoRA "
                                         r"loader"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", lora=LoraConfig(lora_dir=str(lora_dir))))
