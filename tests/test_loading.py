"""Loading diffusers-format folders: diffusers' own saves load; unsafe or foreign folders are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.models import CheckpointError, FamilyNotImplementedError, ModelNotFoundError, resolve_model
from ditserve.models.qwen_image import QwenImageAdapter


@pytest.mark.parametrize(("family", "pipeline_class"), [("qwen-image", QwenImagePipeline), ("flux", FluxPipeline)])
def test_checkpoint_saved_by_diffusers_loads_and_runs(tiny_checkpoints, tmp_path, family, pipeline_class):
    # Round-trip through diffusers' own loader and save_pretrained, then serve that folder.
    pipe = pipeline_class.from_pretrained(tiny_checkpoints[family], dtype=torch.float32)
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    assert not (saved / "ditserve.json").exists()  # a plain diffusers folder, no ditserve metadata
    engine = Engine(EngineConfig(model=str(saved), device="cpu"))
    result = engine.generate(GenerationRequest(prompt="a square", size="64x64", num_inference_steps=2, seed=0))
    assert result.images[0].size == (64, 64)
    assert engine.spec.family == family


def test_stage_loads_only_its_components(tiny_qwen):
    adapter = QwenImageAdapter.from_pretrained(tiny_qwen, stages=["encode"])
    assert set(adapter.components) == {"text_encoder", "tokenizer"}
    with pytest.raises(RuntimeError, match="without the 'denoise' stage"):
        adapter.transformer  # noqa: B018


def test_pickle_weights_are_refused(tiny_qwen, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="only safetensors weights are loaded"):
        QwenImageAdapter.from_pretrained(folder, stages=["denoise"])


def test_component_of_the_wrong_class_is_refused(tiny_qwen, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel is not a QwenImageTransformer2DModel"):
        QwenImageAdapter.from_pretrained(folder, stages=["denoise"])


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        resolve_model(tmp_path)


def test_unimplemented_family_says_so():
    with pytest.raises(FamilyNotImplementedError, match="family 'bagel' is registered but not implemented yet"):
        resolve_model("ByteDance-Seed/BAGEL-7B-MoT")


def test_registered_model_without_local_copy_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("DITSERVE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="no local copy was found"):
        resolve_model("Qwen/Qwen-Image")


def test_registered_model_found_under_models_dir(monkeypatch, tiny_qwen, tmp_path):
    shutil.copytree(tiny_qwen, tmp_path / "Qwen" / "Qwen-Image")
    monkeypatch.setenv("DITSERVE_MODELS_DIR", str(tmp_path))
    resolved = resolve_model("Qwen/Qwen-Image")
    assert resolved.path == tmp_path / "Qwen" / "Qwen-Image"
    assert resolved.spec.id == "Qwen/Qwen-Image"


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope/nope'; registered models: .*Qwen/Qwen-Image"):
        resolve_model("nope/nope")
