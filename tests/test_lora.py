"""LoRA per request: equal to diffusers' ``load_lora_weights`` + ``set_adapters`` (one adapter and a
weighted pair), community (kohya) files equal their diffusers form, every family reads its
pipeline's saves, nothing leaks between requests, the store's LRU, parallel layouts equal one rank,
and bad adapters are refused naming the field."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import (
    Flux2KleinPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    ZImagePipeline,
)
from layouts import layout_ids, run_and_compare
from lora_files import add_bad_entries, save_peft_lora
from safetensors.torch import save_file

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.features.lora import LoraConfig

PROMPT, SEED, STEPS, SIZE = "a red circle on a blue background", 7, 2, 64
PIPELINES = {"qwen-image": QwenImagePipeline, "flux": FluxPipeline}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_qwen, tiny_flux):
    """Adapters for the two flagship tiny models, a kohya file, and bad entries."""
    root = tmp_path_factory.mktemp("loras")
    save_peft_lora(FluxPipeline, tiny_flux, root / "fx", seed=1)
    save_peft_lora(FluxPipeline, tiny_flux, root / "fy", seed=2, rank=2, alpha=1)
    save_peft_lora(QwenImagePipeline, tiny_qwen, root / "qx", seed=3)
    save_peft_lora(QwenImagePipeline, tiny_qwen, root / "qy", seed=4, rank=8, alpha=4)
    _kohya_pair(root, dim=64, rank=4, alpha=2.0)
    add_bad_entries(root)
    return root


def _kohya_pair(root, dim: int, rank: int, alpha: float) -> None:
    """``fk.safetensors`` in kohya/sd-scripts keys (BFL module names, fused qkv, alpha entries) and
    ``fk_diffusers/`` the same adapter written by hand in diffusers keys, with the alpha in metadata."""
    g = torch.Generator().manual_seed(5)
    kohya, diffusers_form = {}, {}
    modules = {  # kohya name -> (in, out, diffusers modules splitting the outputs)
        "double_blocks_0_img_attn_qkv": (dim, 3 * dim, ["attn.to_q", "attn.to_k", "attn.to_v"]),
        "double_blocks_0_img_attn_proj": (dim, dim, ["attn.to_out.0"]),
        "double_blocks_0_img_mlp_0": (dim, 4 * dim, ["ff.net.0.proj"]),
    }
    for name, (n_in, n_out, targets) in modules.items():
        down = torch.randn(rank, n_in, generator=g) * 0.3
        up = torch.randn(n_out, rank, generator=g) * 0.3
        kohya[f"lora_unet_{name}.lora_down.weight"] = down
        kohya[f"lora_unet_{name}.lora_up.weight"] = up
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        for target, b in zip(targets, up.chunk(len(targets))):
            diffusers_form[f"transformer.transformer_blocks.0.{target}.lora_A.weight"] = down
            diffusers_form[f"transformer.transformer_blocks.0.{target}.lora_B.weight"] = b.contiguous()
    save_file(kohya, root / "fk.safetensors")
    (root / "fk_diffusers").mkdir()
    import json

    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}
    save_file({k: v.clone() for k, v in diffusers_form.items()}, root / "fk_diffusers" / "pytorch_lora_weights.safetensors",
              metadata=meta)


@pytest.fixture(scope="module")
def engines(tiny_qwen, tiny_flux, lora_dir):
    lora = LoraConfig(lora_dir=str(lora_dir), max_loras_per_replica=2, max_cpu_loras=1, max_loras_per_request=2)
    return {fam: Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", lora=lora))
            for fam, path in (("qwen-image", tiny_qwen), ("flux", tiny_flux))}


def _request(**fields) -> GenerationRequest:
    fields.setdefault("negative_prompt", None)
    return GenerationRequest(prompt=PROMPT, size=f"{SIZE}x{SIZE}", num_inference_steps=STEPS, seed=SEED,
                             **{k: v for k, v in fields.items() if v is not None})


def _latents(engine, **fields) -> torch.Tensor:
    return engine.generate(_request(**fields), output_type="pt").latents


def _diffusers_latents(family, checkpoint, lora_dir, names, weights):
    pipe = PIPELINES[family].from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in names:
        pipe.load_lora_weights(lora_dir / name, adapter_name=name)
    pipe.set_adapters(list(names), list(weights))
    return pipe(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(SEED)).images


@pytest.mark.parametrize(("family", "adapters"), [
    ("flux", {"fx": 1.0}), ("flux", {"fx": 0.7, "fy": 0.5}), ("qwen-image", {"qx": 0.8}),
    ("qwen-image", {"qx": 0.7, "qy": 0.5}),
], ids=["flux-one", "flux-two", "qwen-one", "qwen-two"])
def test_lora_matches_diffusers_set_adapters(engines, tiny_checkpoints, lora_dir, family, adapters):
    lora = [{"name": n, "scale": s} for n, s in adapters.items()]
    ours = _latents(engines[family], lora=lora if len(lora) > 1 else lora[0])
    ref = _diffusers_latents(family, tiny_checkpoints[family], lora_dir, adapters, adapters.values())
    base = _latents(engines[family])
    assert (ours - base).abs().max().item() > 1e-2  # the adapters do something
    assert (ours - ref).abs().max().item() <= 1e-4


def test_kohya_file_equals_its_diffusers_form(engines):
    flux = engines["flux"]
    kohya = _latents(flux, lora={"name": "fk", "scale": 0.9})
    same = _latents(flux, lora={"name": "fk_diffusers", "scale": 0.9})
    assert (kohya - _latents(flux)).abs().max().item() > 1e-2
    assert (kohya - same).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("family", "pipeline"), [
    ("sd3", StableDiffusion3Pipeline), ("z-image", ZImagePipeline), ("flux2-klein", Flux2KleinPipeline),
])
def test_every_family_reads_its_pipelines_lora(tmp_path, family, pipeline):
    """The other families: our hooks equal peft's own layers (diffusers' loader, same loop)."""
    from ditserve.models import resolve_model

    checkpoint = resolve_model(f"ditserve/tiny-{family}").path
    save_peft_lora(pipeline, checkpoint, tmp_path / "a", seed=11)
    engine = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32",
                                 lora=LoraConfig(lora_dir=str(tmp_path))))
    base = _latents(engine)
    ours = _latents(engine, lora={"name": "a", "scale": 0.6})
    state, metadata = pipeline.lora_state_dict(tmp_path / "a", return_lora_metadata=True)
    transformer = engine.adapter.transformer
    transformer.load_lora_adapter(state, adapter_name="a", prefix="transformer", metadata=metadata)
    transformer.set_adapters(["a"], [0.6])
    ref = _latents(engine)  # no request LoRA: peft's layers alone
    assert (ours - base).abs().max().item() > 1e-2
    assert (ours - ref).abs().max().item() <= 1e-4


def test_adapters_do_not_leak_between_requests(engines):
    flux = engines["flux"]
    base, x, y = _latents(flux), _latents(flux, lora={"name": "fx"}), _latents(flux, lora={"name": "fy"})
    # A with X, B without, C with Y, a failing load, then each again: each equals its own reference
    assert torch.equal(_latents(flux, lora={"name": "fx"}), x)
    assert torch.equal(_latents(flux), base)
    assert torch.equal(_latents(flux, lora={"name": "fy"}), y)
    with pytest.raises(RequestError):
        _latents(flux, lora=[{"name": "fx"}, {"name": "corrupt"}])
    assert torch.equal(_latents(flux), base)
    assert torch.equal(_latents(flux, lora={"name": "fx"}), x)


def test_store_keeps_an_lru_on_device_and_in_cpu_memory(engines):
    """max_loras_per_replica=2, max_cpu_loras=1: the least recently used goes to CPU memory, then out."""
    flux = engines["flux"]
    store = flux.adapter.lora_store
    store.on_device.clear(), store.on_cpu.clear()

    def report(name):
        return flux.generate(_request(lora={"name": name}), output_type="pt").lora

    assert report("fx")["loads"] == 1
    assert report("fx")["hits"] == 1
    assert report("fy")["loads"] == 1
    third = report("fk")  # evicts fx (least recent) to CPU memory
    assert third["loads"] == 1 and third["evictions"] == 1 and list(store.on_cpu) == ["fx"]
    back = report("fx")  # restored from CPU memory, no file read; evicts fy
    assert back["restores"] == 1 and back["loads"] == 0 and list(store.on_device) == ["fk", "fx"]
    assert list(store.on_cpu) == ["fy"]


LAYOUTS = [pytest.param({"tensor_parallel_size": 2}, marks=pytest.mark.compat("lora", "tensor_parallel")),
           pytest.param({"ulysses_degree": 2}, marks=pytest.mark.compat("lora", "ulysses")),
           pytest.param({"cfg_parallel_size": 2}, marks=pytest.mark.compat("lora", "cfg_parallel"))]


@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_parallel_layouts_with_lora_equal_one_rank(engines, tiny_qwen, lora_dir, degrees):
    fields = dict(lora=[{"name": "qx", "scale": 0.7}, {"name": "qy", "scale": 0.5}], negative_prompt="blurry",
                  true_cfg_scale=3.0)
    reference = engines["qwen-image"].generate(_request(**fields), output_type="np")
    ranks = run_and_compare(str(tiny_qwen), degrees, [_request(**fields)], [reference],
                            lora=LoraConfig(lora_dir=str(lora_dir)))
    assert all(r[0]["lora"]["adapters"] == ["qx", "qy"] for r in ranks)


@pytest.mark.parametrize(("lora", "status", "field", "match"), [
    ({"name": "nope"}, 404, "lora.name", "unknown adapter 'nope'; known adapters: binary, corrupt, fk"),
    ({"name": "../fx"}, 422, "lora.name", "not an adapter name"),
    ({"name": "/etc/passwd"}, 422, "lora.name", "not an adapter name"),
    ([{"name": "fx"}, {"name": "nope"}], 404, "lora.1.name", "unknown adapter"),
    ({"name": "binary"}, 422, "lora.name", "only .safetensors adapters are loaded"),
    ({"name": "corrupt"}, 422, "lora.name", "not a readable safetensors file"),
    ({"name": "qx"}, 422, "lora.name", "does not fit this model"),
    ([{"name": "fx"}, {"name": "fy"}, {"name": "fk"}], 422, "lora", "exceed max_loras_per_request=2"),
    ([{"name": "fx"}, {"name": "fx", "scale": 0.5}], 422, "lora", "name one adapter twice"),
    ({"name": "fx", "scale": 5}, 422, "lora.scale", "less than or equal to 4"),
])
def test_bad_adapters_are_refused_naming_the_field(engines, lora, status, field, match):
    flux = engines["flux"]
    with pytest.raises(RequestError, match=match) as info:
        flux.generate(GenerationRequest.parse({"prompt": "x", "size": "64x64", "num_inference_steps": 1, "lora": lora}))
    assert (info.value.status, info.value.field) == (status, field)
    assert flux.generate(_request(lora={"name": "fx"}), output_type="pt").latents is not None  # still serving


def test_model_field_may_name_an_adapter(engines):
    flux = engines["flux"]
    by_model = flux.generate(_request(model="fx"), output_type="pt").latents
    assert torch.equal(by_model, _latents(flux, lora={"name": "fx", "scale": 1.0}))


def test_lora_dir_must_exist_and_the_model_support_lora(tiny_flux, tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        Engine(EngineConfig(model=str(tiny_flux), device="cpu", lora=LoraConfig(lora_dir=str(tmp_path / "none"))))
    with pytest.raises(ValueError, match="max_loras_per_request=5 exceeds max_loras_per_replica=4"):
        LoraConfig(max_loras_per_request=5, max_loras_per_replica=4)
    assert LoraConfig(max_loras_per_replica=2).max_loras_per_request == 2  # the default follows the capacity


def test_names_are_confined_to_lora_dir(tmp_path, lora_dir):
    from ditserve.features.lora import list_adapters

    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(lora_dir / "fx", root / "inside")
    (root / "outside").symlink_to(lora_dir / "fy")  # a link out of the root is not an adapter
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("x")
    assert list(list_adapters(root)) == ["inside"]


@pytest.mark.compat("lora", "layerwise_offload")
def test_lora_under_layerwise_offload_equals_resident(engines, tiny_flux, lora_dir):
    """The adapters' hooks sit on linears inside offloaded blocks: same numbers as resident."""
    from ditserve.features.offload import OffloadConfig

    offloaded = Engine(EngineConfig(model=str(tiny_flux), device="cpu", dtype="float32",
                                    lora=LoraConfig(lora_dir=str(lora_dir)),
                                    offload=OffloadConfig(enable_layerwise_offload=True)))
    lora = [{"name": "fx", "scale": 0.7}, {"name": "fy", "scale": 0.5}]
    assert torch.equal(_latents(offloaded, lora=lora), _latents(engines["flux"], lora=lora))


@pytest.mark.compat("fp8", "lora")  # two content changes: LoRA's effect kept within FP8's error
def test_lora_on_an_fp8_base_keeps_its_effect(engines, tiny_flux, lora_dir):
    """Adapters stay in high precision on top of the FP8 linears: the change the adapters make to the
    FP8 model's output is the change they make to the unquantized model's, within FP8's error."""
    from ditserve.deployments import QuantizationConfig

    fp8 = Engine(EngineConfig(model=str(tiny_flux), device="cpu", dtype="float32", lora=LoraConfig(lora_dir=str(lora_dir)),
                              quant=QuantizationConfig(quantization="fp8")))
    lora = [{"name": "fx", "scale": 0.7}, {"name": "fy", "scale": 0.5}]
    full = engines["flux"]
    effect_full = _latents(full, lora=lora) - _latents(full)
    effect_fp8 = _latents(fp8, lora=lora) - _latents(fp8)
    assert effect_full.abs().max().item() > 1e-2
    assert ((effect_fp8 - effect_full).norm() / effect_full.norm()).item() <= 0.05
