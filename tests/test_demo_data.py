"""The demo model's procedural data and its scorer: captions say what is drawn, and the scorer
reads colors and shapes back from clean renders."""

from __future__ import annotations

import random

import numpy as np

from ditserve.tools.demo.data import COLORS, SHAPES, Sample, dataset, held_out_prompts, render
from ditserve.tools.demo.evaluate import analyse, score, train_classifier


def test_dataset_is_deterministic_and_captioned():
    a, samples = dataset(16, seed=3)
    b, _ = dataset(16, seed=3)
    assert np.array_equal(a, b) and a.shape == (16, 128, 128, 3)
    for image, sample in zip(a, samples):
        assert sample.color != sample.background
        assert sample.caption.startswith("a ") and sample.caption.endswith(f"on a {sample.background} background")
        bg, fg, _ = analyse(image)
        assert (bg, fg) == (sample.background, sample.color)


def test_caption_wording():
    assert Sample("star", "red", "blue", "small", "in the top left").caption == (
        "a small red star in the top left on a blue background")
    assert Sample("circle", "red", "blue", "", "").caption == "a red circle on a blue background"


def test_scorer_reads_clean_renders():
    samples = held_out_prompts(20)
    assert {s.shape for s in samples} == set(SHAPES) and {s.color for s in samples} == set(COLORS)
    images = [np.asarray(render(s, 128, random.Random(i))) for i, s in enumerate(samples)]
    result = score(images, samples, train_classifier(steps=50))  # 50 steps read clean renders exactly
    assert result["background_color_accuracy"] == 1.0 and result["shape_color_accuracy"] == 1.0
    assert result["shape_accuracy"] >= 0.9
