"""Lossless parallelism: N DiT ranks (gloo, local processes) give the single-rank reference's latents
and images; layouts a model cannot run are refused at start-up naming the option."""

from __future__ import annotations

import pytest
from layouts import layout_ids, run_and_compare, serve_and_compare
import torch

from ditserve.deployments import Engine, EngineConfig, GenerationRequest
from ditserve.deployments.local import run_local
from ditserve.parallel import ParallelConfig, layout

pytestmark = pytest.mark.timeout(300)

# 80x48 -> 15 image tokens: uneven shards for 2 and 4 ranks on purpose.
BASE = dict(prompt="a red circle on a blue background", size="80x48", num_inference_steps=3)
REQUESTS = {
    "qwen-image": [
        GenerationRequest(seed=1, negative_prompt="blurry", true_cfg_scale=4.0, **BASE),
        GenerationRequest(seed=2, **BASE),  # no negative branch: CFG-parallel must not deadlock
    ],
    "flux": [
        GenerationRequest(seed=1, guidance_scale=3.5, **BASE),
        GenerationRequest(seed=2, negative_prompt="blurry", true_cfg_scale=3.0, **BASE),
    ],
}
LAYOUTS = [
    {"ulysses_degree": 2},
    {"ring_degree": 2},
    {"cfg_parallel_size": 2},
    {"ulysses_degree": 2, "ring_degree": 2},
    pytest.param({"ulysses_degree": 2, "cfg_parallel_size": 2}, marks=pytest.mark.compat("ulysses", "cfg_parallel")),
    {"ring_degree": 4},
    {"tensor_parallel_size": 2},
    pytest.param({"tensor_parallel_size": 2, "cfg_parallel_size": 2},
                 marks=pytest.mark.compat("tensor_parallel", "cfg_parallel")),
    pytest.param({"ring_degree": 2, "tensor_parallel_size": 2}, marks=pytest.mark.compat("ring", "tensor_parallel")),
]


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    out = {}
    for family, path in tiny_checkpoints.items():
        engine = Engine(EngineConfig(model=str(path), device="cpu"))
        out[family] = [engine.generate(r, output_type="np") for r in REQUESTS[family]]
    return out


@pytest.mark.parametrize("family", ["qwen-image", "flux"])
@pytest.mark.parametrize("degrees", LAYOUTS, ids=layout_ids)
def test_layout_matches_single_rank(tiny_checkpoints, references, family, degrees):
    run_and_compare(str(tiny_checkpoints[family]), degrees, REQUESTS[family], references[family])


def test_layout_groups_follow_the_documented_order():
    groups = layout(ParallelConfig(ulysses_degree=2, cfg_parallel_size=2))
    assert groups["ulysses"] == [(0, 1), (2, 3)]
    assert groups["cfg"] == [(0, 2), (1, 3)]
    assert groups["sp"] == groups["ulysses"]
    mixed = layout(ParallelConfig(ulysses_degree=2, ring_degree=2, tensor_parallel_size=2))
    assert mixed["tp"][0] == (0, 1) and mixed["ulysses"][0] == (0, 2) and mixed["ring"][0] == (0, 4)
    assert mixed["sp"][0] == (0, 2, 4, 6)  # ring-major: ulysses neighbours hold neighbouring shards


@pytest.mark.parametrize(
    ("model", "degrees", "message"),
    [
        ("tiny_qwen", {"ulysses_degree": 3}, r"ulysses_degree=3 must divide num_heads=4 .*\(try \[1, 2, 4\]\)"),
        ("tiny_qwen", {"ulysses_degree": 8}, r"ulysses_degree=8 must divide num_heads=4"),
        ("tiny_qwen", {"tensor_parallel_size": 3}, r"tensor_parallel_size=3 must divide num_heads=4"),
        ("tiny_qwen", {"ulysses_degree": 2, "tensor_parallel_size": 4},
         r"ulysses_degree=2 × tensor_parallel_size=4 must divide num_heads=4"),
    ],
)
def test_invalid_layouts_fail_at_start_up(request, model, degrees, message):
    path = request.getfixturevalue(model)
    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(model=str(path), device="cpu", parallel=ParallelConfig(**degrees)), stages=["denoise"])


def test_cfg_parallel_on_a_model_without_cfg_is_refused(tiny_qwen, tmp_path):
    import json
    import shutil

    folder = tmp_path / "no-cfg"
    shutil.copytree(tiny_qwen, folder)
    # a registry entry without CFG-parallel (what a step-distilled model declares)
    (folder / "ditserve.json").write_text(json.dumps({"features": ["sequence_parallel"]}))
    with pytest.raises(ValueError, match="cfg_parallel_size=2: model .* has no CFG branches to split"):
        Engine(EngineConfig(model=str(folder), device="cpu", parallel=ParallelConfig(cfg_parallel_size=2)),
               stages=["denoise"])


def test_parallel_engine_needs_groups(tiny_qwen):
    with pytest.raises(ValueError, match="needs process groups"):
        Engine(EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(ulysses_degree=2)),
               stages=["denoise"])


def test_served_graph_with_ulysses2_and_two_vae_workers_matches_reference(ray_cluster, tiny_qwen, references):
    """One app for both served layouts (each deploy costs tens of seconds): the DiT's two Ulysses
    ranks and the VAE's two patch-parallel workers, each group on one node; same decode up to
    float rounding (one uint8 level on under 1% of the values)."""
    from ray import serve

    def two_workers_on_one_node_each(name: str) -> None:
        for stage in ("DiT", "VAE"):
            info = serve.get_deployment_handle(stage, name).info.remote().result()
            assert len(info["worker_node_ids"]) == 2 and len(set(info["worker_node_ids"])) == 1, stage
            assert len(info["worker_pids"]) == 2, stage

    serve_and_compare("parallel-test", {"model": str(tiny_qwen), "parallel": {"ulysses_degree": 2},
                                        "vae": {"vae_patch_parallel_size": 2}},
                      REQUESTS["qwen-image"], references["qwen-image"], check=two_workers_on_one_node_each,
                      max_changed_fraction=0.01)


def test_world_larger_than_any_node_is_refused_before_deploying(ray_cluster, tiny_qwen):
    from ditserve.deployments.app import build_app
    from ditserve.deployments.config import AppConfig

    cfg = AppConfig.model_validate({
        "engine": {"model": str(tiny_qwen), "parallel": {"ulysses_degree": 4, "cfg_parallel_size": 2}},
        "accelerator": "gpu",
    })
    with pytest.raises(ValueError, match=r"DiT world of 8 ranks \(ulysses 4 × cfg 2\) needs 8 GPUs .* largest node has 4 GPUs"):
        build_app(cfg)
    cfg = AppConfig.model_validate({
        "engine": {"model": str(tiny_qwen), "vae": {"vae_patch_parallel_size": 8}}, "accelerator": "gpu",
    })
    with pytest.raises(ValueError, match=r"VAE group of 8 ranks .* needs 8 GPUs .* lower vae_patch_parallel_size"):
        build_app(cfg)


@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_tensor_parallel_shards_are_cut_at_load(tiny_checkpoints, family):
    from ditserve.models import adapter_class, resolve_model
    from ditserve.parallel import Group
    from ditserve.parallel.tensor import ColumnParallelLinear, RowParallelLinear, load_tensor_parallel_transformer

    path = tiny_checkpoints[family]
    cls = adapter_class(resolve_model(str(path)).spec.family).component_types["transformer"]
    full = cls.from_pretrained(path, subfolder="transformer")
    plan_names = {n for n, m in full.named_modules() if any(
        __import__("fnmatch").fnmatchcase(n, p) for p in cls._tp_plan)}
    sharded_full = sum(p.numel() for n, p in full.named_parameters() if n.rsplit(".", 1)[0] in plan_names)
    for rank in range(2):
        shard = load_tensor_parallel_transformer(cls, path / "transformer", torch.float32, Group((0, 1), rank, None))
        mods = dict(shard.named_modules())
        assert all(isinstance(mods[n], (ColumnParallelLinear, RowParallelLinear)) for n in plan_names)
        assert not any(p.is_meta for p in shard.parameters())
        sharded_local = sum(p.numel() for n, p in shard.named_parameters() if n.rsplit(".", 1)[0] in plan_names)
        biases = sum(mods[n].bias.numel() for n in plan_names if isinstance(mods[n], RowParallelLinear)
                     and mods[n].bias is not None)
        # half of every sharded weight (row-parallel biases stay whole, added once after the all-reduce)
        assert sharded_local - biases == (sharded_full - biases) // 2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
@pytest.mark.parametrize("degrees", [{"ulysses_degree": 2}, {"ring_degree": 2}, {"tensor_parallel_size": 2},
                                     {"cfg_parallel_size": 2}])
def test_nccl_layout_matches_single_gpu(tiny_qwen, degrees):
    torch.backends.cuda.matmul.allow_tf32 = False
    request = REQUESTS["qwen-image"][0]
    ref = Engine(EngineConfig(model=str(tiny_qwen), device="cuda:0", dtype="float32")).generate(request, output_type="np")
    ranks = run_local(EngineConfig(model=str(tiny_qwen), device="cuda", dtype="float32",
                                   parallel=ParallelConfig(**degrees)), [request])
    for results in ranks:
        assert float((results[0]["latents"] - ref.latents.cpu()).abs().max()) <= 1e-4
