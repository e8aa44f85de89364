"""The registry covers the seed table, with consistent data, and `ditserve models` lists it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ditserve.cluster.cli import main
from ditserve.models import Feature, Modality, get_spec, implemented_families, list_specs

SEED_IDS = [
    "ByteDance-Seed/BAGEL-7B-MoT",
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.2-klein-4B",
    "THUDM/glm-4-vision",
    "meituan-longcat/LongCat-Image",
    "meituan-longcat/LongCat-Image-Edit",
    "OvisAI/Ovis-Image",
    "Qwen/Qwen-Image",
    "Qwen/Qwen-Image-2512",
    "Qwen/Qwen-Image-Edit",
    "Qwen/Qwen-Image-Edit-2509",
    "Qwen/Qwen-Image-Layered",
    "stabilityai/stable-diffusion-3.5",
    "Tongyi-MAI/Z-Image-Turbo",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "stabilityai/stable-audio-open-1.0",
]
SEED_TABLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "diffusion-features.md"
# Features that run beyond the seed table, each verified by a test of ours (tests/test_parallel.py,
# tests/test_cache.py, tests/test_vae_parallel.py): the adapters declare them (``features``).
VERIFIED_ADDITIONS = {
    "black-forest-labs/FLUX.1-dev": {Feature.SEQUENCE_PARALLEL, Feature.CFG_PARALLEL, Feature.TEA_CACHE,
                                     Feature.VAE_PATCH_PARALLEL},
    "Qwen/Qwen-Image": {Feature.VAE_PATCH_PARALLEL},
    "Qwen/Qwen-Image-2512": {Feature.VAE_PATCH_PARALLEL},
    "black-forest-labs/FLUX.2-klein-4B": {Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.SEQUENCE_PARALLEL,
                                          Feature.VAE_PATCH_PARALLEL},
}
COLUMNS = {
    "TeaCache": Feature.TEA_CACHE,
    "Cache-DiT": Feature.CACHE_DIT,
    "Sequence Parallel": Feature.SEQUENCE_PARALLEL,
    "CFG-Parallel": Feature.CFG_PARALLEL,
    "Tensor Parallel": Feature.TENSOR_PARALLEL,
    "CPU Offload (Layerwise)": Feature.LAYERWISE_OFFLOAD,
    "LoRA Inference": Feature.LORA,
    "VAE-Patch-Parallel": Feature.VAE_PATCH_PARALLEL,
    "FP8-Quantization": Feature.FP8,
}


@pytest.mark.parametrize("model_id", SEED_IDS)
def test_seed_model_is_registered_consistently(model_id):
    spec = get_spec(model_id)
    assert spec.default_width % spec.size_multiple == 0 and spec.default_height % spec.size_multiple == 0
    assert 1 <= spec.num_inference_steps <= 200
    if spec.family in implemented_families():
        assert spec.components.transformer and spec.components.vae and spec.components.text_encoders
        assert len(spec.components.text_encoders) == len(spec.components.tokenizers)


def test_modalities():
    assert get_spec("Wan-AI/Wan2.2-T2V-A14B-Diffusers").modality == Modality.VIDEO
    assert get_spec("stabilityai/stable-audio-open-1.0").modality == Modality.AUDIO
    assert get_spec("Qwen/Qwen-Image").modality == Modality.IMAGE


@pytest.mark.skipif(not SEED_TABLE.is_file(), reason="shared/reference not beside the checkout")
def test_feature_flags_match_the_seed_table():
    checked = 0
    header: list[str] = []
    for line in SEED_TABLE.read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[1] == "Model Identifier":
            header = cells
            continue
        match = re.fullmatch(r"`(.+)`", cells[1]) if header and len(cells) == len(header) else None
        if not match:
            continue
        spec = get_spec(match.group(1))
        for name, cell in zip(header[2:], cells[2:]):
            assert (COLUMNS[name] in spec.seed_features) == cell.startswith("✅"), (spec.id, name)
        for feature in set(COLUMNS.values()) - {COLUMNS[n] for n in header[2:]}:
            assert feature not in spec.seed_features, (spec.id, feature)  # no column: not supported
        assert VERIFIED_ADDITIONS.get(spec.id, set()) <= spec.features, spec.id
        checked += 1
    assert checked == len(SEED_IDS)


NOT_BUILT: set[Feature] = set()  # every feature of the seed table is built now


@pytest.mark.parametrize("model_id", SEED_IDS)
def test_features_are_what_the_adapter_declares(model_id):
    from ditserve.models import adapter_class

    spec = get_spec(model_id)
    if spec.family not in implemented_families():
        assert spec.features == frozenset()  # nothing runs without an adapter; the seed row stays beside
        return
    cls = adapter_class(spec.family)
    assert spec.features == cls.verified_features() <= cls.supported_features
    assert not spec.features & NOT_BUILT
    if Feature.SEQUENCE_PARALLEL in spec.features:  # the plan it runs: the adapter's cp_plan or the class's _cp_plan
        assert cls.sequence_plan()
    if Feature.TENSOR_PARALLEL in spec.features:
        assert cls.tensor_plan()


def test_models_command_lists_every_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for spec in list_specs():
        assert spec.id in out
    qwen_row = next(line for line in out.splitlines() if line.startswith("Qwen/Qwen-Image "))
    assert "qwen-image" in qwen_row and "true_cfg=4.0" in qwen_row and "1024x1024/16/2048" in qwen_row
    # FEATURES (what runs) then SEED (the table's row, which lists lora and fp8 for Qwen-Image)
    header = out.splitlines()[0]
    assert header.index("FEATURES") < header.index("SEED")
    features_cell, seed_cell = qwen_row.split()[-2:]
    assert "lora" in features_cell and "tea_cache" in features_cell
    assert "lora" in seed_cell and "fp8" in seed_cell


def test_a_checkpoint_narrows_features_but_cannot_add_one():
    # ``features`` in a checkpoint's ditserve.json (e.g. a step-distilled checkpoint: no CFG to split)
    spec = get_spec("Qwen/Qwen-Image").model_copy(
        update={"feature_limit": frozenset({Feature.SEQUENCE_PARALLEL})})
    assert spec.features == {Feature.SEQUENCE_PARALLEL}
    unbuilt = next(s for s in list_specs() if s.family not in implemented_families())
    assert unbuilt.model_copy(update={"feature_limit": frozenset({Feature.SEQUENCE_PARALLEL})}).features == frozenset()
