"""The shipped demo model really generates what the caption asks (colors), through the real
loading code, fast enough for CI."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models import DEFAULT_MODEL, resolve_model
from ditserve.tools.demo.evaluate import analyse

CASES = [
    ("a red circle on a blue background", "red", "blue"),
    ("a yellow square on a black background", "yellow", "black"),
    ("a white star on a green background", "white", "green"),
    ("a purple triangle on a orange background", "purple", "orange"),
]


@pytest.fixture(scope="module")
def demo():
    return Engine(EngineConfig(model="ditserve/demo", device="cpu"))


def test_demo_is_the_default_and_ships_in_the_package():
    assert DEFAULT_MODEL == "ditserve/demo"
    resolved = resolve_model("ditserve/demo")
    assert (resolved.path / "model_index.json").is_file()
    assert all(p.suffix != ".bin" for p in resolved.path.rglob("*"))


@pytest.mark.parametrize(("prompt", "shape_color", "background"), CASES)
def test_demo_draws_the_asked_colors(demo, prompt, shape_color, background):
    hits = 0
    for seed in range(2):
        image = np.asarray(demo.generate(GenerationRequest(prompt=prompt, seed=seed)).images[0])
        bg, fg, mask = analyse(image)
        hits += (bg, fg) == (background, shape_color) and 0.02 < mask.mean() < 0.8
    assert hits >= 1, prompt
