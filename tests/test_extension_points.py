"""Features attach to a loaded adapter from outside: a diffusers hook on the transformer sees the
request and step context; the CFG strategy is swappable; per-request state does not leak."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models import current_request, current_step


class _RecordingHook(ModelHook):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, str]] = []

    def pre_forward(self, module, *args, **kwargs):
        self.calls.append((current_request().id, current_step().index, current_step().branch))
        return args, kwargs


@pytest.fixture()
def engine(tiny_qwen):
    return Engine(EngineConfig(model=str(tiny_qwen), device="cpu"))


def test_hook_sees_request_step_and_branch(engine):
    hook = _RecordingHook()
    HookRegistry.check_if_exists_or_initialize(engine.adapter.transformer).register_hook(hook, "recorder")
    try:
        req = GenerationRequest(prompt="a cat", negative_prompt="a dog", true_cfg_scale=3.0, size="64x64",
                                num_inference_steps=3, seed=0)
        engine.generate(req, request_id="req-1")
    finally:
        HookRegistry.check_if_exists_or_initialize(engine.adapter.transformer).remove_hook("recorder")
    expected = [("req-1", i, b) for i in range(3) for b in ("cond", "uncond")]
    assert hook.calls == expected


def test_cfg_strategy_is_swappable(engine):
    seen = []

    def cond_only(branches, run_branch, combine):
        seen.append(tuple(branches))
        return run_branch("cond")

    req = dict(prompt="a cat", size="64x64", num_inference_steps=2, seed=4)
    plain = engine.generate(GenerationRequest(**req), output_type="pt").latents
    engine.adapter.cfg_strategy = cond_only
    guided_but_ignored = engine.generate(
        GenerationRequest(negative_prompt="a dog", true_cfg_scale=4.0, **req), output_type="pt"
    ).latents
    assert seen == [("cond", "uncond")] * 2
    assert torch.equal(plain, guided_but_ignored)  # only the strategy decided what ran


def test_scheduler_state_is_per_request(engine):
    # Two interleaved requests with different step counts: each keeps its own scheduler.
    req_a = engine.resolve(GenerationRequest(prompt="a", size="64x64", num_inference_steps=2, seed=1))
    req_b = engine.resolve(GenerationRequest(prompt="b", size="64x64", num_inference_steps=5, seed=1))
    cond_a, cond_b = engine.encode(req_a), engine.encode(req_b)
    state_a = engine.adapter.prepare(req_a.params, cond_a, torch.Generator().manual_seed(1))
    state_b = engine.adapter.prepare(req_b.params, cond_b, torch.Generator().manual_seed(1))
    assert state_a.scheduler is not state_b.scheduler
    assert len(state_a.timesteps) == 2 and len(state_b.timesteps) == 5
    alone = engine.denoise(req_a, cond_a, request_id="alone")
    engine.adapter.denoise(state_b, cond_b)
    assert torch.equal(engine.adapter.denoise(state_a, cond_a), alone)


def test_hook_outside_a_request_says_how_to_fix():
    with pytest.raises(RuntimeError, match="wrap the call in `with request_context"):
        current_request()
    with pytest.raises(RuntimeError, match="inside `step_context"):
        current_step()


class _StateHook(ModelHook):
    """Records, per call, which feature slots the request's state holds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def pre_forward(self, module, *args, **kwargs):
        ctx = current_request()
        self.seen.append((ctx.id, ctx.state.get("cache", {}).get("run") is not None))
        return args, kwargs


def test_cache_state_lives_in_the_request_context(engine):
    """One mechanism for per-request state: the cache's run sits in the request's own state, is
    there for a cached request only, and nothing of it outlives the request."""
    hook = _StateHook()
    HookRegistry.check_if_exists_or_initialize(engine.adapter.transformer).register_hook(hook, "state")
    try:
        base = dict(prompt="a cat", size="64x64", num_inference_steps=2, seed=0, true_cfg_scale=1.0)
        engine.generate(GenerationRequest(**base, cache={"backend": "tea_cache"}), request_id="cached")
        engine.generate(GenerationRequest(**base), request_id="plain")
    finally:
        HookRegistry.check_if_exists_or_initialize(engine.adapter.transformer).remove_hook("state")
    assert hook.seen == [("cached", True)] * 2 + [("plain", False)] * 2
