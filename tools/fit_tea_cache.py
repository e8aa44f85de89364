"""Fit TeaCache's rescaling polynomial for a checkpoint.

TeaCache skips a step when the *output* would barely change; it cannot see the output before
computing it, so it estimates the output's relative L1 change from the input's (the first block's
timestep-modulated input) with a degree-4 polynomial fitted per model. The output here is the
prediction the sampler consumes: with true CFG, the guided combination of the branches, as the
engine's step callback reports it (``StepOutput.noise_pred``). This script runs uncached
generations over a prompt set (with the model's default CFG), records both changes at every step of
every CFG branch, fits the polynomial with least squares, and prints it as JSON; ``--write`` stores
it in the checkpoint's ``ditserve.json`` (``tea_cache_coefficients``), where ``Engine`` picks it up.

    python -m ditserve.tools.fit_tea_cache --model ditserve/demo [--prompts 24] [--write]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ditserve.models.context import current_step
from ditserve.models.families import SPEC_OVERRIDES_FILE

if TYPE_CHECKING:
    from ditserve.models import StepOutput


def _rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return float((current.double() - previous.double()).abs().mean() / previous.double().abs().mean())


def default_prompts(n: int, seed: int = 777) -> list[str]:
    """Prompts of the demo's vocabulary (shapes, colors, sizes, positions), none of the held-out set."""
    from ditserve.tools.demo.data import random_sample

    rng = random.Random(seed)
    return [random_sample(rng).caption for _ in range(n)]


def collect(model: str, prompts: list[str], steps: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input change, output change) pairs over every step after the first of every prompt."""
    from ditserve.deployments import Engine, EngineConfig, GenerationRequest

    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32"))
    transformer = engine.adapter.transformer
    info = engine.adapter.cache_blocks
    if info is None:
        raise ValueError(f"model {model}: its adapter declares no cache blocks")
    # x: the change of each CFG branch's modulated input (a forward pre-hook on the first block,
    # which runs once per step and branch); y: the change of the prediction the sampler consumes
    # (with true CFG, the guided combination of both branches: an error in one branch reaches the
    # sample amplified by the guidance scale, so that is the output change the threshold bounds)
    inputs: dict[str, dict[int, torch.Tensor]] = {}
    predictions: dict[int, torch.Tensor] = {}

    def on_first(module, args, kwargs):
        step = current_step()
        inputs.setdefault(step.branch, {})[step.index] = info.modulated_input(module, kwargs).detach().clone()

    def on_step(step: StepOutput) -> None:
        predictions[step.index] = step.noise_pred.detach().clone()

    xs, ys = [], []
    handle = info.blocks(transformer)[0].register_forward_pre_hook(on_first, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            inputs.clear()
            predictions.clear()
            req = GenerationRequest(prompt=prompt, seed=seed + i, num_inference_steps=steps)
            engine.generate(req, output_type="pt", callback=on_step)
            for branch_inputs in inputs.values():
                for t in sorted(branch_inputs)[1:]:
                    xs.append(_rel_l1(branch_inputs[t], branch_inputs[t - 1]))
                    ys.append(_rel_l1(predictions[t], predictions[t - 1]))
    finally:
        handle.remove()
    return np.array(xs), np.array(ys)


def fit(xs: np.ndarray, ys: np.ndarray) -> tuple[float, ...]:
    return tuple(float(c) for c in np.polyfit(xs, ys, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ditserve/demo", help="registered model id or diffusers folder")
    parser.add_argument("--prompts", type=int, default=24, help="how many prompts (demo vocabulary)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--write", action="store_true", help="store the fit in the checkpoint's ditserve.json")
    args = parser.parse_args(argv)

    xs, ys = collect(args.model, default_prompts(args.prompts), args.steps)
    coefficients = fit(xs, ys)
    predicted = np.polyval(coefficients, xs)
    report = {
        "model": args.model,
        "points": len(xs),
        "coefficients": [round(c, 6) for c in coefficients],
        "r2": round(float(1 - ((ys - predicted) ** 2).sum() / ((ys - ys.mean()) ** 2).sum()), 4),
        "input_change_range": [round(float(xs.min()), 5), round(float(xs.max()), 5)],
    }
    if args.write:
        from ditserve.models import resolve_model

        path = Path(resolve_model(args.model).path) / SPEC_OVERRIDES_FILE
        data = json.loads(path.read_text()) if path.is_file() else {}
        data["tea_cache_coefficients"] = report["coefficients"]
        path.write_text(json.dumps(data, indent=2) + "\n")
        report["written"] = str(path)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
