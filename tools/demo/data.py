"""Procedural captioned images for the demo model: simple shapes in named colors on plain
backgrounds, at varied sizes and positions. No downloads; the same seed gives the same data."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.22, "": 0.34, "large": 0.46}  # radius as a fraction of the image side
POSITIONS = {
    "": (0.5, 0.5),
    "in the center": (0.5, 0.5),
    "in the top left": (0.3, 0.3),
    "in the top right": (0.7, 0.3),
    "in the bottom left": (0.3, 0.7),
    "in the bottom right": (0.7, 0.7),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    shape: str
    color: str
    background: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.color, self.shape]
        words += [self.position] if self.position else []
        return " ".join(words + ["on a", self.background, "background"])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return pts
    if shape == "cross":
        a, b = r, r * 0.33
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def render(sample: Sample, size: int = 128, jitter: random.Random | None = None) -> Image.Image:
    """Draw ``sample`` (with a little random jitter of position and size when ``jitter`` is given)."""
    image = Image.new("RGB", (size, size), COLORS[sample.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[sample.position]
    r = SIZES[sample.size]
    if jitter is not None:
        fx += jitter.uniform(-0.04, 0.04)
        fy += jitter.uniform(-0.04, 0.04)
        r *= jitter.uniform(0.9, 1.1)
    if not sample.position:  # no position asked: anywhere the shape fits
        if jitter is not None:
            fx, fy = jitter.uniform(r, 1 - r), jitter.uniform(r, 1 - r)
    cx, cy, rr = fx * size, fy * size, min(r, fx, fy, 1 - fx, 1 - fy) * size
    if sample.shape == "circle":
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=COLORS[sample.color])
    else:
        draw.polygon(_polygon(sample.shape, cx, cy, rr), fill=COLORS[sample.color])
    return image


def random_sample(rng: random.Random) -> Sample:
    color = rng.choice(list(COLORS))
    background = rng.choice([c for c in COLORS if c != color])
    return Sample(rng.choice(SHAPES), color, background, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))


def dataset(n: int, seed: int = 0, size: int = 128) -> tuple[np.ndarray, list[Sample]]:
    """``n`` images (uint8, n×size×size×3) and their samples."""
    rng = random.Random(seed)
    samples = [random_sample(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(s, size, rng)) for s in samples])
    return images, samples


def held_out_prompts(n: int = 40, seed: int = 12345) -> list[Sample]:
    """A fixed evaluation set: default size and position (the shape anywhere), every shape and
    color appearing."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        background = rng.choice([c for c in COLORS if c != color])
        out.append(Sample(SHAPES[i % len(SHAPES)], color, background, "", ""))
    return out
