"""Score generations by what their captions ask: the background color, the shape's color and the
shape class, over a fixed held-out prompt set. Prints one JSON object.

    python -m ditserve.tools.demo.evaluate [--model ditserve/demo] [--prompts 40] [--steps N]

Colors: the background is the median of the border pixels, the shape is every pixel far from it;
each is named by the nearest palette color. Shape class: a tiny CNN trained (in seconds, fixed
seed) on masks of the same procedural shapes, applied to the shape mask's bounding box.
"""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from .data import COLORS, SHAPES, Sample, held_out_prompts, random_sample, render

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def analyse(image: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(background color, shape color, shape mask) of an RGB uint8 image."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(axis=-1))
    mask = dist > 60
    fg = np.median(img[mask], axis=0) if mask.sum() > 8 else bg
    return nearest_color(bg), nearest_color(fg), mask


def _mask_input(mask: np.ndarray, size: int = 32) -> torch.Tensor:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return torch.zeros(1, 1, size, size)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.float32)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    return F.interpolate(torch.from_numpy(square)[None, None], size=(size, size), mode="area")


class ShapeClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, len(SHAPES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(steps: int = 150, seed: int = 0) -> ShapeClassifier:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = ShapeClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        samples = [random_sample(rng) for _ in range(64)]
        x = torch.cat([_mask_input(analyse(np.asarray(render(s, 128, rng)))[2]) for s in samples])
        y = torch.tensor([SHAPES.index(s.shape) for s in samples])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def score(images: list[np.ndarray], samples: list[Sample], classifier: ShapeClassifier) -> dict:
    bg_ok = fg_ok = shape_ok = 0
    for image, sample in zip(images, samples):
        bg, fg, mask = analyse(image)
        with torch.no_grad():
            shape = SHAPES[int(classifier(_mask_input(mask)).argmax())]
        bg_ok += bg == sample.background
        fg_ok += fg == sample.color
        shape_ok += shape == sample.shape
    n = len(samples)
    return {"background_color_accuracy": bg_ok / n, "shape_color_accuracy": fg_ok / n, "shape_accuracy": shape_ok / n}


# ---- image metrics (shared by benchmarks/cache_quality.py and quantization.py) ---------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """dB, uint8 images."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over the
    RGB channels of two uint8 images (H, W, 3)."""
    x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[:, None].double()
    y = torch.from_numpy(np.array(b)).permute(2, 0, 1)[:, None].double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ditserve/demo")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    args = parser.parse_args(argv)

    from ditserve.deployments import Engine, EngineConfig, GenerationRequest

    torch.manual_seed(0)
    classifier = train_classifier()
    samples = held_out_prompts(args.prompts)
    # the classifier on clean renders: the ceiling of what the scorer can see
    clean = score([np.asarray(render(s, 128, random.Random(i))) for i, s in enumerate(samples)], samples, classifier)
    engine = Engine(EngineConfig(model=args.model, device="cpu"))
    images = []
    for i, sample in enumerate(samples):
        req = GenerationRequest(prompt=sample.caption, seed=i, num_inference_steps=args.steps)
        images.append(np.asarray(engine.generate(req).images[0]))
    result = score(images, samples, classifier)
    print(json.dumps({
        "evaluation": "demo_model",
        "model": args.model,
        "prompts": len(samples),
        "steps": args.steps or engine.spec.num_inference_steps,
        **result,
        "scorer_on_clean_renders": clean,
    }, indent=2))


if __name__ == "__main__":
    main()
