"""Fit TeaCache's rescaling polynomial for a checkpoint.

TeaCache skips a step when the *output* would barely change; it cannot see the output before
computing it, so it estimates the output's relative L1 change from the input's (the first block's
timestep-modulated input) with a degree-4 polynomial fitted per model. The output here is the
prediction the sampler consumes: with true CFG, the guided combination of the branches. This script
runs uncached generations over a prompt set (with the model's default CFG), records both changes at
every step of every CFG branch, fits the
polynomial with least squares, and prints it as JSON; ``--write`` stores it in the checkpoint's
``ditserve.json`` (``tea_cache_coefficients``), where ``Engine`` picks it up.

    python -m ditserve.features.cache.fit_tea_cache --model ditserve/demo [--prompts 24] [--write]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from ditserve.models.context import current_step
from ditserve.models.families import SPEC_OVERRIDES_FILE


def _rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return float((current.double() - previous.double()).abs().mean() / previous.double().abs().mean())


def default_prompts(n: int, seed: int = 777) -> list[str]:
    """Prompts of the demo's vocabulary (shapes, colors, sizes, positions), none of the held-out set."""
    from ditserve.models.demo.data import random_sample

    rng = random.Random(seed)
    return [random_sample(rng).caption for _ in range(n)]


def collect(model: str, prompts: list[str], steps: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input change, output change) pairs over every step after the first of every prompt."""
    from ditserve.deployments import Engine, EngineConfig, GenerationRequest

    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32"))
    blocks = engine.adapter.cache_blocks
    if blocks is None:
        raise ValueError(f"model {model}: its adapter declares no cache blocks")
    first = blocks.blocks(engine.adapter.transformer)[0]
    # x: the change of each CFG branch's modulated input; y: the change of the prediction the sampler
    # consumes (with true CFG, the guided combination of both branches: an error in one branch reaches
    # the sample amplified by the guidance scale, so that is the output change the threshold bounds)
    inputs: dict[str, list[torch.Tensor]] = {}
    predictions: list[torch.Tensor] = []

    def on_first(module, args, kwargs):
        inputs.setdefault(current_step().branch, []).append(blocks.modulated_input(module, kwargs).detach())

    def record(step):  # the guided prediction the scheduler consumed (StepOutput)
        predictions.append(step.noise_pred.detach().clone())

    xs, ys = [], []
    handle = first.register_forward_pre_hook(on_first, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            inputs.clear()
            predictions.clear()
            engine.generate(GenerationRequest(prompt=prompt, seed=seed + i, num_inference_steps=steps), output_type="pt",
                            callback=record)
            for branch_inputs in inputs.values():
                for t in range(1, len(branch_inputs)):
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
