"""The adapter contract on a toy family whose numbers can be worked out by hand: classic CFG, run
serially or batched into one call, gives ``uncond + g·(cond − uncond)``; a CFG strategy (what
CFG-parallel plugs in) still gets the branches; two denoisers switch per step; the step callback
sees the guided prediction and the new latents; and what real adapters declare is readable without
weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditserve.models import (
    CFGEvaluation,
    Conditioning,
    FamilyAdapter,
    Feature,
    Guidance,
    LatentLayout,
    Output,
    SamplingParams,
    StepOutput,
    TextConditioning,
    capabilities,
    resolve_model,
)


class ToyDenoiser(torch.nn.Module):
    """prediction = w·x + t·text, recording the batch size of every call."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = w
        self.batches: list[int] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.batches.append(hidden_states.shape[0])
        return (self.w * hidden_states + timestep.view(-1, 1, 1) * encoder_hidden_states,)


class ToyScheduler:
    """Euler with a fixed step of 0.5: x <- x - 0.5·prediction."""

    def step(self, noise_pred, t, latents, return_dict=False):
        return (latents - 0.5 * noise_pred,)


class ToyAdapter(FamilyAdapter):
    family = "toy"
    component_types = {"transformer": ToyDenoiser, "scheduler": ToyScheduler}
    stage_components = {"encode": (), "denoise": ("transformer", "scheduler"), "decode": ()}
    latent_layout = LatentLayout.AUDIO  # (B, C, T): nothing in the loop assumes packed image tokens
    output = Output.AUDIO
    guidance = frozenset({Guidance.NONE, Guidance.CFG})

    def prepare_latents(self, params, cond, batch, generator):
        return torch.ones(batch, 2, 3), {}

    def prepare_timesteps(self, scheduler, params, latents):
        return torch.tensor([1.0, 0.5])


class BatchedToyAdapter(ToyAdapter):
    cfg_evaluation = CFGEvaluation.BATCHED


class TwoExpertToyAdapter(ToyAdapter):
    """Wan2.2's shape: a high-noise expert, then a low-noise one below the boundary."""

    component_types = {**ToyAdapter.component_types, "transformer_2": ToyDenoiser}
    denoisers = ("transformer", "transformer_2")
    boundary = 0.75

    def denoiser_for(self, state, index, t):
        return "transformer" if float(t) >= self.boundary else "transformer_2"


def _build(cls, **modules):
    components = {"transformer": ToyDenoiser(0.5), "scheduler": ToyScheduler(), **modules}
    return cls(components, info=None)


def _text(value: float) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": torch.full((1, 2, 1), value)}


COND = TextConditioning(_text(3.0), _text(1.0), batch_size=1)
PARAMS = SamplingParams(height=0, width=0, num_inference_steps=2, guidance_scale=2.0)


def _run(adapter):
    steps: list[StepOutput] = []
    state = adapter.prepare(PARAMS, COND, None)
    latents = adapter.denoise(state, COND, callback=steps.append)
    return latents, steps


# by hand, x0 = 1, g = 2, cond text 3, uncond text 1:
#   t=1:   cond 0.5·1 + 3 = 3.5, uncond 0.5 + 1 = 1.5, guided 1.5 + 2·2 = 5.5, x = 1 − 2.75 = −1.75
#   t=0.5: cond −0.875 + 1.5 = 0.625, uncond −0.875 + 0.5 = −0.375, guided 1.625, x = −2.5625
EXPECTED_PREDS = [5.5, 1.625]
EXPECTED_LATENTS = [-1.75, -2.5625]


@pytest.mark.parametrize("cls", [ToyAdapter, BatchedToyAdapter])
def test_classic_cfg_matches_the_hand_computation(cls):
    adapter = _build(cls)
    latents, steps = _run(adapter)
    assert [s.index for s in steps] == [0, 1] and all(s.num_steps == 2 for s in steps)
    assert [s.timestep for s in steps] == [1.0, 0.5]
    assert [s.noise_pred.unique().tolist() for s in steps] == [[p] for p in EXPECTED_PREDS]
    assert [s.latents.unique().tolist() for s in steps] == [[x] for x in EXPECTED_LATENTS]
    assert latents.shape == (1, 2, 3) and torch.equal(latents, steps[-1].latents)
    calls = adapter.transformer.batches
    assert calls == ([2, 2] if cls is BatchedToyAdapter else [1, 1, 1, 1])  # one call per step when batched


def test_serial_and_batched_give_the_same_numbers():
    serial, _ = _run(_build(ToyAdapter))
    batched, _ = _run(_build(BatchedToyAdapter))
    assert torch.equal(serial, batched)


def test_without_a_negative_branch_one_call_per_step():
    adapter = _build(BatchedToyAdapter)
    cond = dataclasses.replace(COND, negative=None)
    state = adapter.prepare(PARAMS, cond, None)
    assert state.cfg_scale is None and state.branches == ("cond",)
    adapter.denoise(state, cond)
    assert adapter.transformer.batches == [1, 1]


def test_classic_cfg_runs_only_above_scale_one():
    adapter = _build(ToyAdapter)
    for scale, branches in [(1.0, ("cond",)), (None, ("cond",)), (1.5, ("cond", "uncond"))]:
        state = adapter.prepare(dataclasses.replace(PARAMS, guidance_scale=scale), COND, None)
        assert state.branches == branches, scale


def test_a_cfg_strategy_gets_the_branches_even_when_batched():
    # what CFG-parallel plugs in (parallel/cfg.py): it receives branches, run_branch and combine
    adapter = _build(BatchedToyAdapter)
    seen = []

    def strategy(branches, run_branch, combine):
        seen.append(tuple(branches))
        return combine(*(run_branch(b) for b in branches))

    adapter.cfg_strategy = strategy
    latents, _ = _run(adapter)
    assert seen == [("cond", "uncond")] * 2
    assert adapter.transformer.batches == [1, 1, 1, 1]
    assert latents.unique().tolist() == [EXPECTED_LATENTS[-1]]


def test_two_denoisers_switch_per_step():
    adapter = _build(TwoExpertToyAdapter, transformer_2=ToyDenoiser(0.5))
    assert adapter.transformer is adapter.components["transformer"]  # the first denoiser
    latents, _ = _run(adapter)
    assert adapter.components["transformer"].batches == [1, 1]  # t = 1 >= 0.75
    assert adapter.components["transformer_2"].batches == [1, 1]  # t = 0.5
    assert latents.unique().tolist() == [EXPECTED_LATENTS[-1]]  # same weights: same numbers


def test_capabilities_read_without_weights(tiny_qwen, tiny_flux):
    qwen = capabilities(resolve_model(tiny_qwen))
    assert qwen.family == "qwen-image" and qwen.denoisers == ("transformer",)
    assert qwen.latent_layout is LatentLayout.PACKED_TOKENS and qwen.output is Output.IMAGE
    assert qwen.conditioning == {Conditioning.TEXT} and Guidance.TRUE_CFG in qwen.guidance
    assert qwen.has_cp_plan and qwen.has_tp_plan
    assert qwen.num_blocks == qwen.transformer_config["num_layers"]
    assert qwen.num_heads == qwen.transformer_config["num_attention_heads"]
    assert {Feature.LORA, Feature.TEA_CACHE} <= qwen.supported_features
    flux = capabilities(resolve_model(tiny_flux))
    assert Guidance.DISTILLED in flux.guidance
    assert flux.num_blocks == flux.transformer_config["num_layers"] + flux.transformer_config["num_single_layers"]
