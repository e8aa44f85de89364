"""Reference runner vs the plain diffusers pipeline on the same checkpoint: wall time per
denoising step and end to end (prompt to decoded image or waveform), and the max abs difference of
the outputs (``stable-audio``: the tiny checkpoint's longest clip, 1 s; ``--size`` does not apply).

    python benchmarks/reference_runner.py [--family qwen-image|flux|z-image|sd3|flux2-klein|ovis-image|longcat-image|glm-image|stable-audio]
        [--size 64]
        [--steps 4] [--threads 1]

Prints one JSON object. The baseline is the diffusers pipeline in the same run; with tiny
checkpoints (built into a temp folder) the numbers show the overhead of our loop, not model speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    Flux2KleinPipeline,
    FluxPipeline,
    GlmImagePipeline,
    LongCatImagePipeline,
    OvisImagePipeline,
    QwenImagePipeline,
    StableAudioPipeline,
    StableDiffusion3Pipeline,
    ZImagePipeline,
)

from ditserve.deployments import Engine, EngineConfig, GenerationRequest  # noqa: E402
from ditserve.models.tiny import make_tiny  # noqa: E402

PIPELINES = {"qwen-image": QwenImagePipeline, "flux": FluxPipeline, "z-image": ZImagePipeline,
             "sd3": StableDiffusion3Pipeline, "flux2-klein": Flux2KleinPipeline, "ovis-image": OvisImagePipeline,
             "longcat-image": LongCatImagePipeline, "glm-image": GlmImagePipeline, "stable-audio": StableAudioPipeline}
AUDIO = {"stable-audio"}  # sized in seconds, answered as waveforms
# families whose pipeline default guidance differs from the model's registry default: the pipeline
# is called with the guidance our runner resolves, so both compute the same thing
EXPLICIT_GUIDANCE = {"z-image", "sd3", "flux2-klein", "ovis-image"}
# pipeline options a family's runner does not serve, turned off in the reference (load, call):
# LongCat-Image's prompt rewriting (its tiny checkpoint saves no text_processor)
PIPELINE_OFF = {"longcat-image": ({"text_processor": None}, {"enable_prompt_rewrite": False})}


def _time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench(family: str, path: str, size: int, steps: int, repeats: int) -> dict:
    prompt, seed = "a red circle on a blue background", 0
    engine = Engine(EngineConfig(model=path, device="cpu", dtype="float32"))
    load_off, call_off = PIPELINE_OFF.get(family, ({}, {}))
    pipe = PIPELINES[family].from_pretrained(path, dtype=torch.float32, **load_off)
    pipe.set_progress_bar_config(disable=True)
    if family in AUDIO:
        req = GenerationRequest(prompt=prompt, seconds=1.0, num_inference_steps=steps, seed=seed)
        sized, output = {"audio_end_in_s": 1.0}, "audios"
    else:
        req = GenerationRequest(prompt=prompt, size=f"{size}x{size}", num_inference_steps=steps, seed=seed)
        sized, output = {"width": size, "height": size}, "images"
    extra = dict(call_off)
    guidance = engine.resolve(req).params.guidance_scale
    if family in EXPLICIT_GUIDANCE and guidance is not None:
        extra["guidance_scale"] = guidance
    ours_s, ours = _time(lambda: engine.generate(req, output_type="pt"), repeats)
    ref_s, ref = _time(
        lambda: getattr(pipe(prompt=prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                             output_type="pt", **sized, **extra), output),
        repeats,
    )
    return {
        "family": family,
        "size": size,
        "steps": steps,
        "ours_total_s": round(ours_s, 5),
        "ours_denoise_per_step_s": round(ours.timings["denoise"] / steps, 5),
        "ours_stage_s": {k: round(v, 5) for k, v in ours.timings.items()},
        "diffusers_total_s": round(ref_s, 5),
        "ratio_ours_vs_diffusers": round(ours_s / ref_s, 3),
        "max_abs_diff_images": float((ours.images - ref).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(PIPELINES), action="append")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family or sorted(PIPELINES):
            path = str(make_tiny(family, os.path.join(tmp, family)))
            results.append(bench(family, path, args.size, args.steps, args.repeats))
    print(json.dumps({"benchmark": "reference_runner", "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
