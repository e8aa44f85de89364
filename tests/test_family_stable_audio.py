"""Stable Audio Open (family ``stable-audio``): the runner equals ``StableAudioPipeline`` on the
waveform and the latents (classic CFG at the default guidance 7 with zero unconditional
conditioning, with a negative prompt and n=2, and without CFG); the registry carries the
pipeline's defaults and the checkpoint's geometry; bad audio fields are refused naming the field."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableAudioPipeline
from layouts import layout_ids, run_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.deployments.schema import RequestError
from ditserve.models.tiny import make_tiny

pytestmark = pytest.mark.timeout(600)

PROMPT, SEED, STEPS = "a dog barking in the rain", 5, 3
# the tiny checkpoint: 128 Hz stereo, at most 1 s (32 latent frames x hop 4)
RATE, LONGEST = 128, 1.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("stable-audio", tmp_path_factory.mktemp("stable-audio") / "tiny")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    pipe = StableAudioPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    ({}, {}),  # the default guidance 7: CFG, the unconditional branch on zero conditioning
    ({"guidance_scale": 3.0, "negative_prompt": "static", "n": 2},
     {"guidance_scale": 3.0, "negative_prompt": "static", "num_waveforms_per_prompt": 2}),
    ({"guidance_scale": 1.0}, {"guidance_scale": 1.0}),  # no CFG: one branch
]


@pytest.mark.parametrize(("fields", "pipe_kwargs"), CASES, ids=["cfg-null-uncond", "cfg-negative-n2", "no-cfg"])
def test_runner_matches_diffusers_pipeline(engine, pipeline, fields, pipe_kwargs):
    seconds = dict(seconds=0.75, seconds_start=0.25)
    ours = engine.generate(GenerationRequest(prompt=PROMPT, num_inference_steps=STEPS, seed=SEED, **seconds, **fields),
                           output_type="pt")
    common = dict(prompt=PROMPT, audio_end_in_s=0.75, audio_start_in_s=0.25, num_inference_steps=STEPS, **pipe_kwargs)
    ref_latents = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).audios
    ref_audio = pipeline(generator=torch.Generator("cpu").manual_seed(SEED), **common).audios
    n = fields.get("n", 1)
    assert ours.latents.shape == ref_latents.shape == (n, 4, 32)
    assert (ours.latents - ref_latents).abs().max().item() <= 1e-4
    # [0.25 s, 0.75 s) at 128 Hz: 64 stereo samples
    assert ours.images.shape == ref_audio.shape == (n, 2, int(0.75 * RATE) - int(0.25 * RATE))
    assert (ours.images - ref_audio).abs().max().item() <= 1e-4


def test_real_cosine_sde_scheduler_matches_pipeline(tmp_path):
    """The real checkpoint's CosineDPMSolverMultistepScheduler draws Brownian noise seeded from the
    request's generator (torchsde; skipped where it is not installed)."""
    pytest.importorskip("torchsde")
    from ditserve.models.tiny.stable_audio import stable_audio_pipeline

    torch.manual_seed(0)
    path = tmp_path / "cosine"
    stable_audio_pipeline(scheduler="cosine").save_pretrained(path, safe_serialization=True)
    ours = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32")).generate(
        GenerationRequest(prompt=PROMPT, seconds=0.5, num_inference_steps=STEPS, seed=SEED), output_type="pt")
    pipe = StableAudioPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, audio_end_in_s=0.5, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED)).audios
    assert ours.images.shape == ref.shape == (1, 2, 64)
    assert (ours.images - ref).abs().max().item() <= 1e-4


def test_seconds_condition_the_denoiser(engine):
    req = dict(prompt=PROMPT, num_inference_steps=2, seed=3, guidance_scale=1.0)
    a = engine.generate(GenerationRequest(seconds=0.5, **req), output_type="pt").latents
    again = engine.generate(GenerationRequest(seconds=0.5, **req), output_type="pt").latents
    b = engine.generate(GenerationRequest(seconds=1.0, **req), output_type="pt").latents
    # small (seconds are normalised by the conditioner's range, 512 s) but real: a rerun is bit-equal
    assert torch.equal(a, again) and not torch.equal(a, b)


def test_resaved_checkpoint_with_other_config_loads_and_runs(tmp_path):
    from ditserve.models.tiny.stable_audio import stable_audio_pipeline

    torch.manual_seed(2)
    path = tmp_path / "other"
    stable_audio_pipeline(n_layers=3, n_heads=2, n_kv_heads=1).save_pretrained(path, safe_serialization=True)
    other = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    transformer = other.adapter.transformer
    assert len(transformer.transformer_blocks) == 3 and transformer.config.num_attention_heads == 2
    out = other.generate(GenerationRequest(prompt="x", seconds=0.5, num_inference_steps=2, seed=0), output_type="np")
    assert out.images.shape == (1, 2, 64)
    assert other.spec.num_inference_steps == 100  # the real model's default (no ditserve.json here)


def test_registry_defaults_are_the_pipelines(engine):
    import inspect

    from ditserve.models import Modality
    from ditserve.models.registry import get_spec

    spec = get_spec("stabilityai/stable-audio-open-1.0")
    call = inspect.signature(StableAudioPipeline.__call__).parameters
    assert spec.modality == Modality.AUDIO
    assert spec.num_inference_steps == call["num_inference_steps"].default == 100
    assert spec.guidance_scale == call["guidance_scale"].default == 7.0
    assert (spec.audio_sample_rate, spec.audio_channels) == (44100, 2)
    assert spec.max_audio_seconds == pytest.approx(47.5545, abs=1e-4)  # 1024 latent frames x hop 2048 / 44.1 kHz
    assert spec.cfg_null_uncond
    # a checkpoint's geometry comes from its configs; the pipeline's default length is the longest
    assert (engine.spec.audio_sample_rate, engine.spec.audio_channels, engine.spec.max_audio_seconds) == (RATE, 2, LONGEST)
    resolved = engine.resolve(GenerationRequest(prompt="x"))
    assert (resolved.params.seconds, resolved.params.seconds_start) == (LONGEST, 0.0)
    assert resolved.params.guidance_scale == 7.0 and resolved.negative_prompt is None  # CFG on zero conditioning
    tiny = get_spec("ditserve/tiny-stable-audio")
    assert (tiny.family, tiny.audio_sample_rate, tiny.max_audio_seconds) == ("stable-audio", RATE, LONGEST)


@pytest.mark.parametrize(("fields", "field", "match"), [
    ({"seconds": 0}, "seconds", "greater than 0"),
    ({"seconds": -1.0}, "seconds", "greater than 0"),
    ({"seconds": 1.5}, "seconds", "beyond the model's maximum of 1 s"),
    ({"seconds": 0.5, "seconds_start": 0.5}, "seconds_start", "must be less than seconds=0.5"),
    ({"seconds_start": 1.0}, "seconds_start", "must be less than seconds=1"),
    ({"seconds_start": -0.1}, "seconds_start", "greater than or equal to 0"),
    ({"size": "64x64"}, "size", "generates audio"),
], ids=["zero", "negative", "beyond-max", "start-equals-end", "start-at-default-end", "negative-start", "size"])
def test_bad_audio_fields_are_refused_naming_the_field(engine, fields, field, match):
    with pytest.raises(RequestError, match=match) as info:
        engine.resolve(GenerationRequest.parse({"prompt": "x", **fields}))
    assert info.value.field == field and info.value.status == 422


def test_image_models_refuse_audio_fields():
    from ditserve.deployments.schema import resolve_request
    from ditserve.models.registry import get_spec

    with pytest.raises(RequestError, match="applies to audio models only") as info:
        resolve_request(GenerationRequest(prompt="x", seconds=2.0), get_spec("ditserve/tiny-sd3"))
    assert info.value.field == "seconds"


# ---- served: the handle's float clips and the HTTP route's WAV/FLAC/base64 ------------------------

def _post_audio(url: str, body: dict, route: str = "/v1/audio/generations") -> tuple[int, bytes, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _pcm16(waveform):
    """The reference clip as the encoder writes it: clipped, x 32767, rounded; (samples, channels)."""
    import numpy as np

    return np.round(np.clip(waveform, -1, 1) * 32767).astype(int).T


def test_served_audio_matches_reference_over_handle_and_http(ray_cluster, checkpoint, engine):
    import base64
    import io
    import json

    import numpy as np
    import soundfile
    from ray import serve

    from ditserve.deployments.app import build_app
    from ditserve.deployments.config import AppConfig

    base = dict(prompt=PROMPT, num_inference_steps=2, seed=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the served stages compute with one thread; so does the reference
    try:
        ref = engine.generate(GenerationRequest(seconds=0.75, seconds_start=0.25, **base), output_type="np").images
        ref2 = engine.generate(GenerationRequest(seconds=0.5, n=2, **base), output_type="np").images
    finally:
        torch.set_num_threads(threads)
    cfg = AppConfig.model_validate({"engine": {"device": "cpu", "model": str(checkpoint)}, "accelerator": "gpu",
                                    "distributed_timeout_s": 60, "text_encoder": {"num_cpus": 0.1, "num_gpus": 0}})
    name, prefix = "stable-audio-test", "/stable-audio"
    handle = serve.run(build_app(cfg), name=name, route_prefix=prefix)
    url = ray_cluster["url"] + prefix
    try:
        # the Python handle: float waveforms and the sample rate
        got = handle.generate.remote(GenerationRequest(seconds=0.75, seconds_start=0.25, **base)).result()
        assert got.images is None and got.audio.sample_rate == RATE
        assert got.audio.waveforms.shape == ref.shape == (1, 2, 64)
        assert float(np.abs(got.audio.waveforms - ref).max()) <= 1e-4

        # WAV and FLAC bodies: the requested duration, channels and rate, equal within 16-bit rounding
        request = dict(seconds=0.75, seconds_start=0.25, **base)
        clips = {}
        for fmt, media in (("wav", "audio/wav"), ("flac", "audio/flac")):
            status, body, headers = _post_audio(url, {**request, "response_format": fmt})
            assert status == 200 and headers["content-type"] == media, body[:200]
            data, rate = soundfile.read(io.BytesIO(body), dtype="int16")
            info = soundfile.info(io.BytesIO(body))
            assert (info.format, info.subtype, rate, info.channels) == (fmt.upper(), "PCM_16", RATE, 2)
            assert data.shape == (64, 2) and data.shape[0] / rate == 0.75 - 0.25
            assert np.abs(data.astype(int) - _pcm16(ref[0])).max() <= 1
            clips[fmt] = data
        assert np.array_equal(clips["wav"], clips["flac"])  # both lossless 16-bit

        # base64 JSON, n=2
        status, body, _ = _post_audio(url, {"seconds": 0.5, "n": 2, "response_format": "b64_json", **base})
        answer = json.loads(body)
        assert status == 200 and (answer["sample_rate"], answer["channels"], answer["seconds"]) == (RATE, 2, 0.5)
        for clip, want in zip(answer["data"], ref2, strict=True):
            data, _ = soundfile.read(io.BytesIO(base64.b64decode(clip["b64_json"])), dtype="int16")
            assert np.abs(data.astype(int) - _pcm16(want)).max() <= 1

        # bad input: 4xx naming the field (refused before any stage runs)
        for fields, param in (({"seconds": 0}, "seconds"), ({"seconds": 5.0}, "seconds"),
                              ({"seconds": 0.5, "seconds_start": 0.5}, "seconds_start"),
                              ({"response_format": "mp3"}, "response_format"),
                              ({"n": 2, "response_format": "wav"}, "n")):
            status, body, _ = _post_audio(url, {"prompt": "x", **fields})
            error = json.loads(body)["error"]
            assert 400 <= status < 500 and error["param"] == param, (fields, status, error)
        # the image route does not serve an audio model
        status, body, _ = _post_audio(url, {"prompt": "x"}, route="/v1/images/generations")
        error = json.loads(body)["error"]
        assert status == 404 and error["param"] == "model" and "/v1/audio/generations" in error["message"]
    finally:
        serve.delete(name)


# ---- Cache-DiT on the single-stream blocks (cross-attention context passed through) ----------------

CACHE_STEPS = 6
CACHE_BASE = dict(prompt=PROMPT, seconds=0.5, num_inference_steps=CACHE_STEPS, seed=1)


def _cached(engine, cache=None, **extra):
    return engine.generate(GenerationRequest(**CACHE_BASE, **extra, cache=cache), output_type="np")


def test_cache_dit_zero_threshold_equals_uncached_and_skips_when_allowed(engine):
    uncached = _cached(engine)
    exact = _cached(engine, {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}})
    assert torch.equal(uncached.latents, exact.latents)
    assert exact.cache["calls_cached"] == 0 and exact.cache["blocks_evaluated"] == exact.cache["blocks_total"]
    assert set(exact.cache["decisions"]) == {"cond+uncond"}  # both CFG branches in one batched call
    db = {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}
    out = _cached(engine, {"backend": "cache_dit", "config": db})
    blocks = 2  # Fn=1 computes, the other is skipped
    assert out.cache["decisions"] == {"cond+uncond": "CCSSCS"}
    assert out.cache["blocks_evaluated"] == (CACHE_STEPS - 3) * blocks + 3 * 1
    assert not torch.equal(out.latents, uncached.latents)


def test_refused_features_say_why(checkpoint, engine, tmp_path):
    """LoRA: StableAudioPipeline has no LoRA loader. TeaCache: the blocks have no timestep-modulated
    input to probe. VAE tiling: diffusers has no tiled decode for AutoencoderOobleck."""
    from family_checks import check_lora_refused

    from ditserve.parallel.vae import VaeConfig

    check_lora_refused(StableAudioPipeline, checkpoint, tmp_path)
    with pytest.raises(RequestError, match="does not support tea_cache") as info:
        engine.resolve(GenerationRequest(prompt="x", cache={"backend": "tea_cache"}))
    assert info.value.field == "cache.backend"
    with pytest.raises(ValueError, match="vae_use_tiling: .*AutoencoderOobleck has no tiled decode"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", vae=VaeConfig(vae_use_tiling=True)))


# ---- parallel: every rank equals one rank ----------------------------------------------------------

PAR_BASE = dict(prompt=PROMPT, seconds=1.0, num_inference_steps=2)  # 33 tokens: uneven shards on purpose
PAR_REQUESTS = [
    GenerationRequest(seed=1, **PAR_BASE),  # CFG on zero conditioning
    GenerationRequest(seed=2, guidance_scale=3.0, negative_prompt="static", **PAR_BASE),
    GenerationRequest(seed=3, guidance_scale=1.0, **PAR_BASE),  # one branch: CFG-parallel must not deadlock
    # composes with Cache-DiT: the skip decisions are reduced over the ranks of a branch
    GenerationRequest(seed=4, prompt=PROMPT, seconds=1.0, num_inference_steps=4,
                      cache={"backend": "cache_dit", "config": {"residual_diff_threshold": 9.0, "max_warmup_steps": 1}}),
]
LAYOUTS = [{"cfg_parallel_size": 2}, {"ulysses_degree": 2}, {"ring_degree": 2}]


@pytest.fixture(scope="module")
def par_references(engine):
    refs = [engine.generate(r, output_type="np") for r in PAR_REQUESTS]
    assert "S" in refs[-1].cache["decisions"]["cond+uncond"]  # the cached request did skip
    return refs


@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(checkpoint, par_references, degrees):
    ranks = run_and_compare(str(checkpoint), degrees, PAR_REQUESTS, par_references)
    assert all(r[0]["bytes_sent"] > 0 for r in ranks), degrees  # the ranks did talk on the CFG request
    want = par_references[-1].cache["decisions"]["cond+uncond"]
    for rank in ranks:  # the cache decided as one rank did (CFG-parallel: per branch, each rank its own)
        assert set(rank[-1]["cache"]["decisions"].values()) == {want}, degrees


def test_vae_patch_parallel_decode_matches_one_worker(checkpoint, engine):
    """Exact mode on AutoencoderOobleck: 1-D bands over time, halo (dilated) convs and transposed-conv
    upsampling; two workers equal one worker's decode (a whole clip, and a cut clip of two)."""
    from ditserve.deployments.local import run_local_decode

    items = []
    for fields, n, seed in (({"seconds": 1.0}, 1, 1), ({"seconds": 0.75, "seconds_start": 0.25}, 2, 2)):
        latents = torch.randn(n, 4, 32, generator=torch.Generator().manual_seed(seed))
        items.append((GenerationRequest(prompt="x", n=n, seed=seed, **fields), latents))
    refs = [engine.postprocess(engine.decode(engine.resolve(r), lat), output_type="np") for r, lat in items]
    config = EngineConfig(model=str(checkpoint), device="cpu", vae={"vae_patch_parallel_size": 2})
    workers = run_local_decode(config, items)
    assert len(workers) == 2
    for results in workers:
        for ref, got in zip(refs, results):
            assert got["images"].shape == ref.shape
            assert float(abs(got["images"] - ref).max()) <= 1e-4
            assert got["bytes_sent"] > 0  # the workers did talk


def test_cli_generate_writes_the_clip(checkpoint, engine, tmp_path):
    import numpy as np
    import soundfile

    from ditserve.cluster.cli import main

    out = tmp_path / "clip.flac"
    assert main(["generate", "--model", str(checkpoint), "--device", "cpu", "--prompt", PROMPT, "--seconds", "0.5",
                 "--num-inference-steps", "2", "--seed", "4", "--output", str(out)]) == 0
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == RATE and data.shape == (64, 2)
    ref = engine.generate(GenerationRequest(prompt=PROMPT, seconds=0.5, num_inference_steps=2, seed=4), output_type="np")
    assert np.abs(data.astype(int) - _pcm16(ref.images[0])).max() <= 1
