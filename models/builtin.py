"""Registry entries of the models the project builds itself (no download ever needed).

The tiny checkpoints have the real architecture classes of their family with random weights and
locally built tokenizers: they exercise exactly the served code path, and their images are noise.
Each entry is its family's flagship entry with the tiny model's own defaults.
"""

from __future__ import annotations

from .catalog import MODELS
from .registry import ModelSpec

_TINY_DEFAULTS = dict(
    num_inference_steps=8, default_width=128, default_height=128, min_size=16, max_size=1024, builtin=True
)


def _tiny(flagship: str, model_id: str, name: str, family_flag: str) -> ModelSpec:
    base = next(spec for spec in MODELS if spec.id == flagship)
    return base.model_copy(
        update={
            "id": model_id,
            "name": name,
            **_TINY_DEFAULTS,
            "notes": f"built on first use by `ditserve make-tiny --family {family_flag}`; random weights (noise images)",
        }
    )


# Checkpoints shipped inside the package (folder relative to ``models/``).
SHIPPED = {"ditserve/demo": "demo/checkpoint"}

BUILTIN_MODELS: list[ModelSpec] = [
    _tiny("Qwen/Qwen-Image", "ditserve/tiny-qwen-image", "Tiny Qwen-Image (random weights)", "qwen-image"),
    _tiny("black-forest-labs/FLUX.1-dev", "ditserve/tiny-flux", "Tiny FLUX.1 (random weights)", "flux"),
    _tiny("stabilityai/stable-diffusion-3.5-large", "ditserve/tiny-sd3", "Tiny Stable Diffusion 3.5 (random weights)", "sd3"),
    _tiny("Tongyi-MAI/Z-Image-Turbo", "ditserve/tiny-z-image", "Tiny Z-Image (random weights)", "z-image"),
    _tiny("black-forest-labs/FLUX.2-klein-4B", "ditserve/tiny-flux2-klein", "Tiny FLUX.2-klein (random weights)",
          "flux2-klein"),
    _tiny("OvisAI/Ovis-Image", "ditserve/tiny-ovis-image", "Tiny Ovis-Image (random weights)", "ovis-image"),
    _tiny("Qwen/Qwen-Image-Edit", "ditserve/tiny-qwen-image-edit", "Tiny Qwen-Image-Edit (random weights)",
          "qwen-image-edit").model_copy(update={"condition_pixels": 64 * 64}),
    _tiny("Qwen/Qwen-Image-Edit-2509", "ditserve/tiny-qwen-image-edit-2509",
          "Tiny Qwen-Image-Edit-2509 (random weights)", "qwen-image-edit-plus"
          ).model_copy(update={"condition_pixels": 64 * 64}),
    _tiny("Qwen/Qwen-Image-Layered", "ditserve/tiny-qwen-image-layered", "Tiny Qwen-Image-Layered (random weights)",
          "qwen-image-layered").model_copy(update={"condition_pixels": 64 * 64}),
    next(spec for spec in MODELS if spec.id == "Qwen/Qwen-Image").model_copy(
        update={
            "id": "ditserve/demo",
            "name": "Demo: shapes and colors (trained; Qwen-Image architecture)",
            "num_inference_steps": 20,
            "default_width": 128,
            "default_height": 128,
            "min_size": 64,
            "max_size": 256,
            "builtin": True,
            "notes": "shipped in the package (models/demo/checkpoint); trained by `python -m "
            "ditserve.tools.demo.train` on simple shapes in named colors on plain backgrounds",
        }
    ),
]

DEFAULT_MODEL = "ditserve/demo"
