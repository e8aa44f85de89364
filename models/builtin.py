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

# editing: input images are read at this area (the real models' 1024x1024 takes tens of seconds per
# request on a CPU)
TINY_CONDITION_PIXELS = 64 * 64

# per tiny family, over _TINY_DEFAULTS: video runs 5 frames (2 latent frames) by default; TI2V's and GLM-Image's
# sizes are multiples of 32
_TINY_FAMILY_DEFAULTS = {
    "wan": dict(num_frames=5, default_width=64, default_height=64),
    "wan-ti2v": dict(num_frames=5, default_width=64, default_height=64, min_size=32),
    "wan-i2v": dict(num_frames=5, default_width=64, default_height=64),
    "glm-image": dict(min_size=32),  # sizes are multiples of 32 (the prior's token grid)
    # the tiny audio geometry (models/tiny/stable_audio.py): 128 Hz stereo, at most 1 s; sizes do not apply
    "stable-audio": dict(audio_seconds=1.0, max_audio_seconds=1.0, audio_sample_rate=128, default_width=1,
                         default_height=1, min_size=1, max_size=1),
    **{family: dict(condition_pixels=TINY_CONDITION_PIXELS) for family in ("qwen-image-edit", "qwen-image-edit-plus",
                                                            "qwen-image-layered", "longcat-image-edit")},
}


def _tiny(flagship: str, model_id: str, name: str, family_flag: str) -> ModelSpec:
    """The tiny entry of ``flagship``'s family: ``_TINY_DEFAULTS``, then the family's own
    (``_TINY_FAMILY_DEFAULTS``; ``make_tiny`` writes the same values into the checkpoint)."""
    base = next(spec for spec in MODELS if spec.id == flagship)
    return base.model_copy(
        update={
            "id": model_id,
            "name": name,
            **_TINY_DEFAULTS,
            **_TINY_FAMILY_DEFAULTS.get(family_flag, {}),
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
    _tiny("meituan-longcat/LongCat-Image", "ditserve/tiny-longcat-image", "Tiny LongCat-Image (random weights)", "longcat-image"),
    _tiny("THUDM/glm-4-vision", "ditserve/tiny-glm-image", "Tiny GLM-Image (random weights)", "glm-image"),
    _tiny("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "ditserve/tiny-wan", "Tiny Wan2.2 T2V, two experts (random weights)",
          "wan"),
    _tiny("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "ditserve/tiny-wan-ti2v", "Tiny Wan2.2 TI2V (random weights)",
          "wan-ti2v"),
    _tiny("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "ditserve/tiny-wan-i2v", "Tiny Wan2.2 I2V, two experts (random weights)",
          "wan-i2v"),
    _tiny("stabilityai/stable-audio-open-1.0", "ditserve/tiny-stable-audio", "Tiny Stable-Audio-Open (random weights)",
          "stable-audio"),
    _tiny("Qwen/Qwen-Image-Edit", "ditserve/tiny-qwen-image-edit", "Tiny Qwen-Image-Edit (random weights)",
          "qwen-image-edit"),
    _tiny("Qwen/Qwen-Image-Edit-2509", "ditserve/tiny-qwen-image-edit-2509",
          "Tiny Qwen-Image-Edit-2509 (random weights)", "qwen-image-edit-plus"),
    _tiny("Qwen/Qwen-Image-Layered", "ditserve/tiny-qwen-image-layered", "Tiny Qwen-Image-Layered (random weights)",
          "qwen-image-layered"),
    _tiny("meituan-longcat/LongCat-Image-Edit", "ditserve/tiny-longcat-image-edit",
          "Tiny LongCat-Image-Edit (random weights)", "longcat-image-edit"),
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
