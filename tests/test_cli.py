"""`ditserve generate` end to end: a valid PNG of the requested size, timings, clear errors."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from ditserve.cluster.cli import main


def test_generate_default_model_writes_png_of_requested_size(tmp_path, _ditserve_home):
    out = tmp_path / "img.png"
    exe = shutil.which("ditserve") or f"{sys.executable} -m ditserve"
    proc = subprocess.run(
        [*exe.split(), "generate", "--prompt", "a red circle on a blue background", "--size", "80x64",
         "--num-inference-steps", "3", "--seed", "5", "--output", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DITSERVE_HOME": str(_ditserve_home)},
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (80, 64) and image.mode == "RGB"
    assert f"wrote {out}" in proc.stdout
    assert "model=ditserve/demo seed=5" in proc.stdout
    for stage in ("encode", "prepare", "denoise", "decode", "postprocess"):
        assert f"{stage}=" in proc.stdout
    assert "denoising" in proc.stderr  # the progress bar


def test_generate_n_images_from_a_folder(tmp_path, tiny_flux, capsys):
    out = tmp_path / "flux.png"
    code = main(["generate", "--model", str(tiny_flux), "--prompt", "a star", "--n", "2",
                 "--size", "64x64", "--num-inference-steps", "2", "--output", str(out)])
    assert code == 0
    for path in (out, tmp_path / "flux-1.png"):
        with Image.open(path) as image:
            assert image.size == (64, 64)
    assert "model=" + str(tiny_flux) in capsys.readouterr().out


def test_generate_same_seed_same_png(tmp_path, tiny_qwen):
    args = ["generate", "--model", str(tiny_qwen), "--prompt", "a cat", "--size", "64x64",
            "--num-inference-steps", "2", "--seed", "11"]
    assert main([*args, "--output", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--output", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "70x64"], "--size: width 70 is not a multiple of 16"),
        (["--num-inference-steps", "0"], "--num-inference-steps: Input should be greater than or equal to 1"),
        (["--guidance-scale", "2"], "--guidance-scale: model"),
    ],
)
def test_generate_bad_option_exits_2_naming_it(tmp_path, tiny_qwen, capsys, args, message):
    code = main(["generate", "--model", str(tiny_qwen), "--prompt", "x", *args, "--output", str(tmp_path / "x.png")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_with_cache_prints_its_statistics(tmp_path, tiny_qwen, capsys):
    args = ["generate", "--model", str(tiny_qwen), "--prompt", "a cat", "--size", "64x64", "--num-inference-steps", "4",
            "--cache-backend", "cache_dit", "--cache-config", '{"residual_diff_threshold": 9, "max_warmup_steps": 1}',
            "--output", str(tmp_path / "c.png")]
    assert main(args) == 0
    assert "cache: cache_dit blocks 5/8 (x1.6 fewer) steps {'cond': 'CSSS'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-backend", "tea_cache", "--cache-config", '{"rel_l1_thresh": -1}'], "cache_config.rel_l1_thresh"),
        (["--cache-backend", "tea_cache", "--cache-config", '{"Fn_compute_blocks": 1}'], "cannot be combined"),
        (["--cache-backend", "cache_dit", "--cache-config", "{nope"], "--cache-config is not valid JSON"),
        (["--cache-config", '{"rel_l1_thresh": 0.1}'], "cache_config: given without cache_backend"),
    ],
)
def test_generate_bad_cache_option_exits_2(tmp_path, tiny_qwen, capsys, args, message):
    code = main(["generate", "--model", str(tiny_qwen), "--prompt", "x", *args, "--output", str(tmp_path / "x.png")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_config_carries_the_cache_default(capsys):
    import yaml

    assert main(["config", "--cache-backend", "tea_cache", "--cache-config", '{"rel_l1_thresh": 0.3}']) == 0
    engine = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["engine"]
    assert engine["cache_backend"] == "tea_cache" and engine["cache_config"]["rel_l1_thresh"] == 0.3


def test_generate_unimplemented_family_exits_2(capsys):
    assert main(["generate", "--model", "ByteDance-Seed/BAGEL-7B-MoT", "--prompt", "x"]) == 2
    assert "family 'bagel' is registered but not implemented yet" in capsys.readouterr().err


def test_make_tiny_unknown_family_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["make-tiny", "--family", "no-such-family", "--out", str(tmp_path)])


def _actions(command: str) -> dict:
    from ditserve.cluster.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: action for action in sub.choices[command]._actions for opt in action.option_strings}


@pytest.mark.parametrize("command", ["run", "config", "generate"])
def test_every_parallel_vae_and_offload_field_has_its_flag(command):
    # flags are generated from the config fields: a new field gets its flag, named and documented by it
    from ditserve.deployments import OffloadConfig, ParallelConfig, VaeConfig

    actions = _actions(command)
    for model in (ParallelConfig, VaeConfig, OffloadConfig):
        for name, info in model.model_fields.items():
            action = actions["--" + name.replace("_", "-")]
            assert action.help.replace("%%", "%").startswith(info.description), name
            default = info.get_default(call_default_factory=True)
            assert default is None or f"(default: {default})" in action.help, name


def test_bad_flags_are_named_and_replicas_widen(capsys):
    import yaml

    assert main(["config", "--ulysses-degree", "0"]) == 2
    assert "--ulysses-degree: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["config", "--cache-config", "[1]", "--cache-backend", "tea_cache"]) == 2
    assert "--cache-config must be a JSON object" in capsys.readouterr().err
    assert main(["config", "--dit-min-replicas", "2", "--vae-use-tiling", "--encoder-num-cpus", "0.3"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert args["dit"]["autoscaling"]["min_replicas"] == args["dit"]["autoscaling"]["max_replicas"] == 2
    assert args["engine"]["vae"]["vae_use_tiling"] is True
    assert args["text_encoder"]["num_cpus"] == 0.3 and args["text_encoder"]["max_ongoing_requests"] == 16


def test_dit_and_vae_take_one_request_at_a_time():
    from pydantic import ValidationError

    from ditserve.deployments import AppConfig

    cfg = AppConfig()
    assert cfg.dit.max_ongoing_requests == cfg.vae.max_ongoing_requests == 1
    assert "max_ongoing_requests" not in cfg.model_dump()["dit"]
    for stage in ("dit", "vae"):
        with pytest.raises(ValidationError, match=rf"{stage}.max_ongoing_requests is fixed at 1 because"):
            AppConfig.model_validate({stage: {"max_ongoing_requests": 1}})
    assert "--dit-max-ongoing-requests" not in _actions("run") and "--encoder-max-ongoing-requests" in _actions("run")


def test_lora_flags_reach_the_app_config(capsys, tmp_path):
    import yaml

    assert main(["config", "--lora-dir", str(tmp_path), "--max-loras-per-replica", "2", "--max-loras-per-request", "2",
                 "--max-cpu-loras", "0"]) == 0
    lora = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["engine"]["lora"]
    assert lora == {"lora_dir": str(tmp_path), "max_loras_per_request": 2, "max_loras_per_replica": 2,
                    "max_cpu_loras": 0}
    assert main(["config", "--max-cpu-loras", "-1"]) == 2
    assert "--max-cpu-loras: Input should be greater than or equal to 0" in capsys.readouterr().err
    for command in ("run", "generate"):
        assert {"--lora-dir", "--max-loras-per-request", "--max-loras-per-replica", "--max-cpu-loras"} <= set(
            _actions(command))


@pytest.mark.parametrize(("values", "expected"), [
    (["a"], {"name": "a", "scale": 1.0}),
    (["a:0.5"], {"name": "a", "scale": 0.5}),
    (["a:-1", "b"], [{"name": "a", "scale": -1.0}, {"name": "b", "scale": 1.0}]),
])
def test_lora_flag_builds_the_request_field(values, expected):
    from ditserve.cluster.cli import lora_field

    assert lora_field(values) == expected


@pytest.mark.parametrize(("args", "message"), [
    (["--lora", "a:strong"], "--lora: 'a:strong' is not NAME or NAME:SCALE"),
    (["--lora", ":1"], "--lora: ':1' is not NAME or NAME:SCALE"),
    (["--lora", "a:"], "--lora: 'a:' is not NAME or NAME:SCALE"),
    (["--lora", "a:9"], "--lora (lora.scale): Input should be less than or equal to 4"),
    (["--lora", "a", "--lora", "b:5"], "--lora (lora.1.scale): Input should be less than or equal to 4"),
])
def test_bad_lora_flag_exits_2_naming_it(tmp_path, capsys, args, message):
    assert main(["generate", "--prompt", "x", *args, "--output", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_with_lora_adapters(tmp_path, tiny_qwen, capsys):
    from diffusers import QwenImagePipeline
    from lora_files import save_peft_lora

    loras = tmp_path / "loras"
    save_peft_lora(QwenImagePipeline, tiny_qwen, loras / "x", seed=3)
    save_peft_lora(QwenImagePipeline, tiny_qwen, loras / "y", seed=4, rank=2)
    args = ["generate", "--model", str(tiny_qwen), "--prompt", "a cat", "--size", "64x64", "--num-inference-steps", "2",
            "--seed", "3", "--lora-dir", str(loras)]
    assert main([*args, "--lora", "x:0.8", "--lora", "y", "--output", str(tmp_path / "a.png")]) == 0
    assert "lora: x, y (loads=2 hits=0 restores=0 evictions=0)" in capsys.readouterr().out
    assert main([*args, "--output", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert main([*args, "--lora", "nope", "--output", str(tmp_path / "c.png")]) == 2
    assert "--lora (lora.name): unknown adapter 'nope'; known adapters: x, y" in capsys.readouterr().err
