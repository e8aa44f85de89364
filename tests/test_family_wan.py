"""Wan2.2 (family ``wan2.2``): the runner equals ``WanPipeline`` on the two-expert (T2V-A14B) and
the one-expert ``expand_timesteps`` (TI2V-5B) layouts, latents and frames, with CFG (and each
expert's own scale, across the expert switch) and without; the registry carries the pipeline's and
the model cards' defaults and each folder is recognised as its own model; bad video fields are 4xx
naming the field; caches run on both experts (threshold 0 equals uncached, evaluations drop, no
state crosses the switch); CFG-parallel, Ulysses and Ring at degree 2 equal one rank; tensor parallel
is refused with the reason. Image to video (family ``wan2.2-i2v`` and TI2V with an image): equal to
``WanImageToVideoPipeline``; an I2V request without an image, and a T2V one with an image, are 4xx
naming the field; CFG-parallel, Ring and Ulysses with an image equal one rank; TeaCache at 0 equals
uncached on both I2V experts; a Wan2.1 (CLIP image encoder) layout is refused at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from layouts import layout_ids, run_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

PROMPT, SEED, STEPS, SIZE, FRAMES = "a red circle on a blue background", 7, 4, 64, 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {family: make_tiny(family, root / family) for family in ("wan", "wan-ti2v")}


@pytest.fixture(scope="module")
def pipelines(checkpoints):
    out = {}
    for family, path in checkpoints.items():
        out[family] = WanPipeline.from_pretrained(path, dtype=torch.float32)
        out[family].set_progress_bar_config(disable=True)
    return out


@pytest.fixture(scope="module")
def engines(checkpoints):
    return {f: Engine(EngineConfig(model=str(p), device="cpu", dtype="float32")) for f, p in checkpoints.items()}


def _request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "num_frames": FRAMES,
                                "num_inference_steps": STEPS, "seed": SEED, **fields})


CASES = [
    ("wan", {"guidance_scale": 4.0, "guidance_scale_2": 2.0}),  # CFG, each expert its own scale
    ("wan", {"guidance_scale": 1.0, "guidance_scale_2": 1.0}),  # no CFG
    ("wan-ti2v", {"guidance_scale": 5.0, "negative_prompt": "blurry", "n": 2}),
]


@pytest.mark.parametrize(("family", "fields"), CASES, ids=["two-experts-cfg", "two-experts-no-cfg", "ti2v-cfg-n2"])
def test_runner_matches_wan_pipeline(pipelines, engines, family, fields):
    engine = engines[family]
    calls = []
    ours = engine.generate(_request(**fields), output_type="np",
                           callback=lambda step: calls.append(step.index))
    kwargs = {"num_videos_per_prompt" if k == "n" else k: v for k, v in fields.items()}
    seen = {}

    def last_latents(pipe, i, t, tensors):  # the pipeline's final latents, from the same call
        seen["latents"] = tensors["latents"].clone()
        return {}

    ref_frames = pipelines[family](
        prompt=PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, output_type="np",
        generator=torch.Generator().manual_seed(SEED), callback_on_step_end=last_latents, **kwargs).frames
    ref_latents = seen["latents"]
    n = fields.get("n", 1)
    assert ours.latents.shape == ref_latents.shape and ours.latents.shape[2] == (FRAMES - 1) // 4 + 1
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    assert ours.images.shape == ref_frames.shape == (n, FRAMES, SIZE, SIZE, 3)
    assert abs(ours.images - ref_frames).max() <= 1e-4
    assert calls == list(range(STEPS))
    if family == "wan":  # the boundary falls inside the run: both experts denoised
        timesteps = engine.adapter.prepare(engine.resolve(_request(**fields)).params,
                                           engine.encode(engine.resolve(_request(**fields))), None).timesteps
        boundary = engine.adapter.boundary_timestep
        assert (timesteps >= boundary).any() and (timesteps < boundary).any()


def test_each_expert_uses_its_own_scale(engines):
    engine = engines["wan"]
    same = engine.generate(_request(guidance_scale=4.0, guidance_scale_2=4.0), output_type="np").latents
    other = engine.generate(_request(guidance_scale=4.0, guidance_scale_2=1.5), output_type="np").latents
    assert (same - other).abs().max().item() > 1e-4


def test_registry_defaults_and_folder_recognition(engines):
    from ditserve.models.registry import get_spec

    t2v, ti2v = get_spec("Wan-AI/Wan2.2-T2V-A14B-Diffusers"), get_spec("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    assert (t2v.num_inference_steps, t2v.guidance_scale, t2v.guidance_scale_2, t2v.boundary_ratio) == (40, 4.0, 3.0, 0.875)
    assert (t2v.default_width, t2v.default_height, t2v.num_frames, t2v.fps) == (1280, 720, 81, 16)
    assert (ti2v.default_width, ti2v.default_height, ti2v.num_frames, ti2v.fps, ti2v.size_multiple) == (1280, 704, 121, 24, 32)
    assert ti2v.boundary_ratio is None
    # a folder is recognised as the entry its checkpoint facts match (both are WanPipeline folders)
    assert engines["wan"].spec.name == "Wan2.2-T2V" and engines["wan"].spec.boundary_ratio == 0.875
    assert engines["wan-ti2v"].spec.name == "Wan2.2-TI2V" and engines["wan-ti2v"].spec.size_multiple == 32
    resolved = engines["wan"].resolve(GenerationRequest(prompt="x", guidance_scale=6.0))
    assert resolved.params.num_frames == 5 and resolved.params.guidance_scale_2 == 3.0  # the model's default
    assert resolved.negative_prompt == ""  # classic CFG: "" as the pipeline


@pytest.mark.parametrize(("family", "fields", "field", "message"), [
    ("wan", {"num_frames": 6}, "num_frames", r"6 is not k x 4 \+ 1 .*\(e.g. 5 or 9\)"),
    ("wan", {"num_frames": 245}, "num_frames", "maximum"),
    ("wan-ti2v", {"guidance_scale_2": 2.0}, "guidance_scale_2", "one denoiser"),
    ("wan-ti2v", {"size": "48x64"}, "size", "multiple of 32"),
])
def test_bad_video_fields_name_the_field(engines, family, fields, field, message):
    with pytest.raises(RequestError, match=message) as err:
        engines[family].resolve(GenerationRequest(prompt="x", **fields))
    assert err.value.field == field


def test_video_fields_are_refused_for_image_models(tiny_qwen):
    engine = Engine(EngineConfig(model=str(tiny_qwen), device="cpu"), ["encode"])
    with pytest.raises(RequestError, match="applies to video models") as err:
        engine.resolve(GenerationRequest(prompt="x", num_frames=5))
    assert err.value.field == "num_frames"


# ---- caches: hooks on both experts; an expert's calls are their own branches ----------------------

@pytest.mark.parametrize("cache", [
    {"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
    {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}},
], ids=["tea_cache", "cache_dit"])
def test_caches_on_both_experts(engines, cache):
    engine = engines["wan"]
    base = dict(prompt=PROMPT, size=f"{SIZE}x{SIZE}", num_frames=FRAMES, seed=SEED, num_inference_steps=6,
                guidance_scale=4.0)
    uncached = engine.generate(GenerationRequest(**base), output_type="np")
    zero = engine.generate(GenerationRequest(**base, cache=cache), output_type="np")
    assert torch.equal(uncached.latents, zero.latents) and zero.cache["calls_cached"] == 0
    assert set(zero.cache["decisions"]) == {"cond", "uncond", "cond@transformer_2", "uncond@transformer_2"}
    knob = "rel_l1_thresh" if cache["backend"] == "tea_cache" else "residual_diff_threshold"
    loose = engine.generate(GenerationRequest(**base, cache={**cache, "config": {**cache["config"], knob: 2.0}}),
                            output_type="np")
    assert loose.cache["blocks_evaluated"] < loose.cache["blocks_total"]
    # each expert's first call computes: no residual crosses the switch
    assert all(d[0] == "C" for d in loose.cache["decisions"].values())


# ---- parallel ------------------------------------------------------------------------------------

# each layout once: CFG-parallel and Ring on the two experts, Ulysses on TI2V (its per-token timesteps
# are split with the tokens)
LAYOUTS = [("wan", {"cfg_parallel_size": 2}), ("wan", {"ring_degree": 2}), ("wan-ti2v", {"ulysses_degree": 2})]
PAR_REQUEST = {"wan": _request(guidance_scale=4.0, guidance_scale_2=2.0), "wan-ti2v": _request(guidance_scale=4.0)}


@pytest.mark.parametrize(("family", "degrees"), LAYOUTS, ids=[f"{f}-{layout_ids(d)}" for f, d in LAYOUTS])
def test_layout_matches_single_rank(checkpoints, engines, family, degrees):
    reference = engines[family].generate(PAR_REQUEST[family], output_type="np")
    run_and_compare(str(checkpoints[family]), degrees, [PAR_REQUEST[family]], [reference])


@pytest.mark.parametrize("family", ["wan", "wan-ti2v"])
def test_vae_patch_parallel_decode_matches_single_worker(checkpoints, engines, family):
    """Both Wan VAEs (Wan2.1's causal 3-D decoder; Wan2.2's residual one with a 2x2-patchified output)
    decode bit-identically on 2 workers, first frame and frame cache included (9 frames: 3 latent)."""
    from ditserve.deployments.local import run_local_decode

    req = GenerationRequest(prompt=PROMPT, size="64x32" if family == "wan" else "64x64", num_frames=9,
                            num_inference_steps=2, seed=SEED, guidance_scale=1.0)
    ref = engines[family].generate(req, output_type="np")
    config = EngineConfig(model=str(checkpoints[family]), device="cpu", vae={"vae_patch_parallel_size": 2})
    for worker in run_local_decode(config, [(req, ref.latents)]):
        assert worker[0]["bytes_sent"] > 0  # the bands did exchange halos
        assert abs(worker[0]["images"] - ref.images).max() <= 1e-5


def test_tensor_parallel_is_refused_with_the_reason(checkpoints):
    from ditserve.deployments.attach import check_support

    config = EngineConfig(model=str(checkpoints["wan"]), device="cpu", parallel={"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: .* does not support tensor parallelism.*"
                                         r"rms_norm_across_heads"):
        check_support(config, ["denoise"])


# ---- image to video: I2V-A14B (image required) and TI2V-5B with an image --------------------------

IMAGE = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # resized to the output size
I2V_SIZE = 32  # small: the image is VAE-encoded too (I2V: with all its zero frames)
I2V_CASES = [
    ("wan-i2v", {"guidance_scale": 4.0, "guidance_scale_2": 2.0}),  # CFG, each expert its own scale
    ("wan-ti2v", {"guidance_scale": 5.0}),
]


@pytest.fixture(scope="module")
def i2v_checkpoint(tmp_path_factory):
    return make_tiny("wan-i2v", tmp_path_factory.mktemp("wan-i2v") / "ckpt")


@pytest.fixture(scope="module")
def image_engines(i2v_checkpoint, engines):
    return {"wan-i2v": Engine(EngineConfig(model=str(i2v_checkpoint), device="cpu", dtype="float32")),
            "wan-ti2v": engines["wan-ti2v"]}


def _i2v_pipeline(path, monkeypatch):
    from diffusers import WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    # the I2V pipeline's prompt cleaning calls ftfy unguarded (not installed here); WanPipeline's guards it
    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)
    pipe = WanImageToVideoPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("family", "fields"), I2V_CASES, ids=["i2v-two-experts-cfg", "ti2v-image"])
def test_image_to_video_matches_wan_i2v_pipeline(checkpoints, i2v_checkpoint, image_engines, monkeypatch, family,
                                                  fields):
    """Ours equals ``WanImageToVideoPipeline`` on the same checkpoint, image, prompt and seed (I2V: the
    image latents and mask on channels, across the expert switch; TI2V: the image as the first latent
    frame at timestep 0), latents and frames."""
    from PIL import Image

    engine = image_engines[family]
    path = i2v_checkpoint if family == "wan-i2v" else checkpoints[family]
    fields = {**fields, "size": f"{I2V_SIZE}x{I2V_SIZE}"}
    ours = engine.generate(_request(images=[IMAGE], **fields), output_type="np")
    pipe = _i2v_pipeline(path, monkeypatch)
    assert pipe.image_encoder is None and pipe.transformer.config.image_dim is None  # Wan2.2: no CLIP
    kwargs = {k: v for k, v in fields.items() if k != "size"}
    call = dict(image=Image.fromarray(IMAGE), prompt=PROMPT, height=I2V_SIZE, width=I2V_SIZE, num_frames=FRAMES,
                num_inference_steps=STEPS, **kwargs)
    seen = {}

    def last_latents(pipe, i, t, tensors):  # the pipeline's latents after its last step
        seen["latents"] = tensors["latents"].clone()
        return {}

    ref_frames = pipe(**call, generator=torch.Generator().manual_seed(SEED), output_type="np",
                      callback_on_step_end=last_latents).frames
    ref_latents = seen["latents"]
    assert ours.latents.shape == ref_latents.shape
    assert ours.images.shape == ref_frames.shape == (1, FRAMES, I2V_SIZE, I2V_SIZE, 3)
    assert abs(ours.images - ref_frames).max() <= 1e-4
    resolved = engine.resolve(_request(images=[IMAGE], **fields))
    encoded_image = engine.decoder.encode(resolved).images
    image_latents = encoded_image.latents[0]
    if family == "wan-i2v":
        assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
        # the boundary falls inside the run: both experts denoised
        state = engine.adapter.prepare(resolved.params, engine.encode(resolved), None, encoded_image)
        boundary = engine.adapter.boundary_timestep
        assert (state.timesteps >= boundary).any() and (state.timesteps < boundary).any()
        assert image_latents.shape[2] == ours.latents.shape[2]  # the image + zero frames, encoded
    else:
        # the pipeline blends the image's latent frame in after its loop: frames after the first are
        # the loop's, the first is the image's (the decoded frames above compare all of them)
        assert (ours.latents[:, :, 1:] - ref_latents[:, :, 1:]).abs().max().item() <= 1e-4
        assert (ours.latents[:, :, :1] - image_latents).abs().max().item() <= 1e-6


def test_image_fields_name_the_field(image_engines, engines):
    with pytest.raises(RequestError, match=r"image-to-video\) needs an input image") as err:
        image_engines["wan-i2v"].resolve(GenerationRequest(prompt="x"))
    assert err.value.field == "image"
    with pytest.raises(RequestError, match="takes no input images") as err:  # T2V-A14B
        engines["wan"].resolve(GenerationRequest(prompt="x", images=[IMAGE]))
    assert err.value.field == "image"
    with pytest.raises(RequestError, match="not a PNG, JPEG or WebP") as err:
        image_engines["wan-i2v"].resolve(GenerationRequest(prompt="x", images=[b"GIF? no: plain text"]))
    assert err.value.field == "image[0]"


# each layout once, with an input image: CFG-parallel and Ring on I2V's two experts, Ulysses on TI2V (the
# image's first-frame tokens at timestep 0 are split with the others)
I2V_LAYOUTS = [("wan-i2v", {"cfg_parallel_size": 2}), ("wan-i2v", {"ring_degree": 2}),
               ("wan-ti2v", {"ulysses_degree": 2})]


@pytest.mark.parametrize(("family", "degrees"), I2V_LAYOUTS, ids=[f"{f}-{layout_ids(d)}" for f, d in I2V_LAYOUTS])
def test_image_layout_matches_single_rank(checkpoints, i2v_checkpoint, image_engines, family, degrees):
    path = i2v_checkpoint if family == "wan-i2v" else checkpoints[family]
    request = _request(images=[IMAGE], size=f"{I2V_SIZE}x{I2V_SIZE}" if family == "wan-i2v" else "64x32",
                       guidance_scale=4.0, num_inference_steps=3)
    reference = image_engines[family].generate(request, output_type="np")
    run_and_compare(str(path), degrees, [request], [reference])


def test_i2v_cache_at_threshold_zero_equals_uncached(image_engines):
    engine = image_engines["wan-i2v"]
    base = dict(size=f"{I2V_SIZE}x{I2V_SIZE}", images=[IMAGE], guidance_scale=4.0, guidance_scale_2=2.0)
    uncached = engine.generate(_request(**base), output_type="np")
    zero = engine.generate(_request(**base, cache={"backend": "tea_cache", "config": {"rel_l1_thresh": 0}}),
                           output_type="np")
    assert torch.equal(uncached.latents, zero.latents) and zero.cache["calls_cached"] == 0
    assert set(zero.cache["decisions"]) == {"cond", "uncond", "cond@transformer_2", "uncond@transformer_2"}


def test_wan21_image_encoder_layout_is_refused_naming_it(i2v_checkpoint, tmp_path):
    """Wan2.2 I2V conditions on VAE latents only; a Wan2.1 layout (CLIP image features into the
    transformer, ``image_dim``) is refused at load, not run without its image features."""
    import json
    import shutil

    from ditserve.models.wan import WanI2VAdapter

    path = shutil.copytree(i2v_checkpoint, tmp_path / "wan21-layout")
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer" / "config.json").write_text(json.dumps({**config, "image_dim": 16}))
    with pytest.raises(ValueError, match=r"Wan2.1 image-to-video layout .*image_dim=16.* VAE latents only"):
        WanI2VAdapter.from_pretrained(path, stages=["decode"])
