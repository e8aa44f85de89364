"""CPU offload (features/offload): offloaded output equals resident output exactly on every family
(model-level and layerwise, alone, with a cache, under Ulysses 2 and TP 2), at most two groups of
blocks are on the device during a forward and none between requests, a block the cache skips is
never onloaded, and stages sharing a device never hold their weights on it at the same time."""

from __future__ import annotations

import threading

import pytest
import torch
from layouts import run_and_compare

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, OffloadConfig
from ditserve.deployments.attach import check_support
from ditserve.features.offload import (
    FileLease,
    apply_layerwise_offload,
    apply_model_offload,
    layerwise_offload_of,
    model_offload_of,
    remove_layerwise_offload,
)
from ditserve.parallel import ParallelConfig

FAMILIES = {"qwen-image": {}, "flux": {"guidance_scale": 3.5}, "sd3": {"guidance_scale": 3.5},
            "z-image": {}, "flux2-klein": {}}
BASE = dict(prompt="a red circle on a blue background", size="64x64", num_inference_steps=2, seed=7)
DB_SKIP = {"backend": "cache_dit", "config": {"residual_diff_threshold": 9.0, "max_warmup_steps": 1,
                                              "max_continuous_cached_steps": 2}}
MODEL = OffloadConfig(enable_cpu_offload=True)
LAYERWISE = OffloadConfig(enable_layerwise_offload=True, offload_blocks_per_group=1)


def _request(family: str, **extra) -> GenerationRequest:
    return GenerationRequest(**{**BASE, **FAMILIES[family], **extra})


def _engine(family: str, offload: OffloadConfig | None = None) -> Engine:
    return Engine(EngineConfig(model=f"ditserve/tiny-{family}", device="cpu", dtype="float32",
                               offload=offload or OffloadConfig()))


def _equal(a, b) -> None:
    assert torch.equal(a.latents, b.latents)
    assert (a.images == b.images).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offloaded_output_equals_resident_on_every_family(family, tmp_path):
    plain = _engine(family).generate(_request(family), output_type="np")
    # model-level for the text encoder and VAE, layerwise for the DiT: groups of two blocks from the
    # disk tier (model-level DiT: the TP 2 layout below)
    config = OffloadConfig(enable_cpu_offload=True, enable_layerwise_offload=True, offload_blocks_per_group=2,
                           offload_device="disk", offload_disk_dir=str(tmp_path))
    engine = _engine(family, config)
    _equal(engine.generate(_request(family), output_type="np"), plain)
    offloads = model_offload_of([engine.adapter.components[n] for n in engine.adapter.stage_components["decode"]])
    assert len(offloads) == 1 and offloads[0].onloads == 1 and not offloads[0].weights.materialized
    offload = layerwise_offload_of(engine.adapter.transformer)
    assert 0 < offload.max_blocks_materialized <= 2 * config.offload_blocks_per_group
    assert offload.blocks_materialized == 0  # none between requests


@pytest.mark.compat("layerwise_offload", "tea_cache")
def test_tea_cache_under_layerwise_offload_onloads_only_block_0_for_a_skipped_call():
    # TeaCache's probe reads block 0's weights before block 0 runs (the cache decides there)
    req = _request("flux", cache={"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}, num_inference_steps=3)
    resident = _engine("flux").generate(req, output_type="np")
    engine = _engine("flux", LAYERWISE)  # 3 blocks, groups of 1
    offload = layerwise_offload_of(engine.adapter.transformer)
    out = engine.generate(req, output_type="np")
    _equal(out, resident)
    stats = out.cache
    assert stats == resident.cache and stats["decisions"] == {"cond": "CSC"}
    # each computed block onloaded once, and a skipped call only block 0's group (for the probe)
    assert offload.onloads == stats["blocks_evaluated"] + stats["calls_cached"]
    assert offload.blocks_materialized == 0


@pytest.mark.compat("layerwise_offload", "cache_dit")
def test_two_groups_at_most_during_a_forward_and_skipped_blocks_are_never_onloaded():
    req = _request("flux", cache=DB_SKIP, num_inference_steps=3)
    resident = _engine("flux").generate(req, output_type="np")
    engine = _engine("flux", LAYERWISE)  # 3 blocks, groups of 1
    offload = layerwise_offload_of(engine.adapter.transformer)
    seen = []
    for block in offload.blocks:  # a probe inside each block's call (after the offload hook onloaded it)
        block.register_forward_pre_hook(lambda m, a: seen.append(offload.blocks_materialized))
    engine.generate(_request("flux"), output_type="np")
    assert seen and max(seen) == 2  # the current group and the prefetched next one
    assert offload.blocks_materialized == 0 and offload.device_bytes() == 0  # none between requests
    assert offload.max_blocks_materialized == 2
    before = offload.onloads
    out = engine.generate(req, output_type="np")
    _equal(out, resident)
    stats = out.cache
    assert stats == resident.cache and stats["calls_cached"] > 0 and stats["blocks_evaluated"] < stats["blocks_total"]
    # every block computed was onloaded once (prefetched or on demand); none of the skipped ones
    assert offload.onloads - before == stats["blocks_evaluated"]


class _Block(torch.nn.Module):
    """y = (W x) * scale, with the weight in fp8 storage and a float scale buffer (as FP8 holds them)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((4, 4), value).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.float().T * self.scale


class _Stack(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(float(i + 1)) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_layerwise_moves_every_tensor_of_a_block_whatever_its_dtype(tmp_path):
    x = torch.ones(1, 4)
    stack = _Stack(5)
    expected = stack(x)  # each block multiplies the row sum by 4 * (i + 1) * 0.5: 2, 4, 6, 8, 10
    assert float(expected[0, 0]) == 2 * 4 * 6 * 8 * 10
    for device in ("cpu", "disk"):
        stack = _Stack(5)
        config = OffloadConfig(enable_layerwise_offload=True, offload_blocks_per_group=2, offload_device=device,
                               offload_disk_dir=str(tmp_path) if device == "disk" else None)
        offload = apply_layerwise_offload(stack, list(stack.blocks), "cpu", config)
        assert stack.blocks[0].weight.numel() == 0 and stack.blocks[0].scale.numel() == 0  # offloaded
        assert torch.equal(stack(x), expected)
        assert offload.onloads == 3 and offload.max_blocks_materialized == 4 and offload.blocks_materialized == 0
        remove_layerwise_offload(stack)
        assert stack.blocks[4].weight.dtype == torch.float8_e4m3fn and torch.equal(stack(x), expected)
    assert not list(tmp_path.iterdir())  # the disk tier's files went with the feature


class _TwinRank:
    """Rank 0 of a two-rank sequence-parallel group whose rank 1 is a twin in this process: its
    all-gather returns this rank's chunk and the twin's chunk of the same tensor, in order."""

    size, rank = 2, 0

    def __init__(self) -> None:
        self.twin: list[torch.Tensor] = []

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor, self.twin.pop(0)]


def test_sharded_host_copy_keeps_half_of_every_block_and_gathers_it_back():
    x = torch.ones(1, 4)
    expected = _Stack(3)(x)
    config = OffloadConfig(enable_layerwise_offload=True, offload_shard_host_copy=True)
    ref = _Stack(3)
    unsharded = config.model_copy(update={"offload_shard_host_copy": False})
    full = apply_layerwise_offload(ref, list(ref.blocks), "cpu", unsharded)
    group = _TwinRank()
    stack = _Stack(3)
    offload = apply_layerwise_offload(stack, list(stack.blocks), "cpu", config, gather=group)
    assert offload.host_bytes() * 2 <= full.host_bytes() + 2 * 3 * 2  # half, up to one padding byte per tensor
    twin = _Stack(3)
    rank1 = _TwinRank()
    rank1.rank = 1
    twin_units = apply_layerwise_offload(twin, list(twin.blocks), "cpu", config, gather=rank1).units
    for unit in twin_units:  # rank 1's chunks, in the order rank 0 onloads them
        group.twin += unit.tier.get()
    assert torch.equal(stack(x), expected) and not group.twin


def test_stages_sharing_a_device_take_turns(tmp_path):
    # two stages (say a text encoder and a VAE) on one fake device, each asked by several requests at
    # once: while one computes, the other's weights are never on the device
    lease = FileLease(str(tmp_path / "gpu-fake.lock"))
    stages = {name: torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)) for name in ("a", "b")}
    offloads = {name: apply_model_offload([m], "cpu", lease) for name, m in stages.items()}
    overlaps, calls = [], []

    def probe(name: str):
        def hook(module, args):
            other = offloads["b" if name == "a" else "a"]
            overlaps.append(other.weights.materialized)
            calls.append(name)
        return hook

    for name, module in stages.items():
        module[1].register_forward_pre_hook(probe(name))

    def requests(name: str) -> None:
        for _ in range(10):
            stages[name](torch.ones(2, 16))  # outside a stage's session: the hook opens one per call

    threads = [threading.Thread(target=requests, args=(n,)) for n in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 40 and not any(overlaps)
    assert all(o.onloads == 20 and not o.weights.materialized for o in offloads.values())


@pytest.mark.parametrize(("degrees", "offload"), [
    pytest.param({"ulysses_degree": 2}, OffloadConfig(enable_layerwise_offload=True, offload_shard_host_copy=True),
                 id="ulysses2_layerwise_sharded_host_copy",
                 marks=[pytest.mark.compat("ulysses", "layerwise_offload"), pytest.mark.compat("ulysses", "cache_dit"),
                        pytest.mark.compat("layerwise_offload", "cache_dit")]),
    pytest.param({"tensor_parallel_size": 2}, MODEL, id="tp2_model_level",  # each rank offloads its own shards
                 marks=[pytest.mark.compat("tensor_parallel", "model_offload"),
                        pytest.mark.compat("tensor_parallel", "cache_dit"),
                        pytest.mark.compat("model_offload", "cache_dit")]),
])
def test_offload_under_parallel_layouts_matches_single_rank(degrees, offload):
    # with a cache that skips: every rank takes the same decisions, so sharded gathers stay in step
    request = _request("qwen-image", cache=DB_SKIP, num_inference_steps=3)
    reference = _engine("qwen-image").generate(request, output_type="np")
    assert reference.cache["calls_cached"] > 0
    ranks = run_and_compare("ditserve/tiny-qwen-image", degrees, [request], [reference], offload=offload)
    assert all(results[0]["cache"] == reference.cache for results in ranks)


def test_start_up_refuses_what_does_not_compose():
    def config(**offload) -> EngineConfig:
        return EngineConfig(model="ditserve/tiny-qwen-image", device="cpu", offload=OffloadConfig(**offload))

    with pytest.raises(ValueError, match="offload_device='disk' applies to layerwise offload only"):
        check_support(config(enable_cpu_offload=True, offload_device="disk"))
    with pytest.raises(ValueError, match="offload_shard_host_copy=True .* single rank has none: set ulysses_degree"):
        check_support(config(enable_layerwise_offload=True, offload_shard_host_copy=True))
    with pytest.raises(ValueError, match="offload_disk_dir='/x' needs offload_device='disk'"):
        check_support(config(enable_layerwise_offload=True, offload_disk_dir="/x"))
    ok = EngineConfig(model="ditserve/tiny-qwen-image", device="cpu", parallel=ParallelConfig(ulysses_degree=2),
                      offload=OffloadConfig(enable_layerwise_offload=True, offload_shard_host_copy=True))
    check_support(ok)


@pytest.mark.compat("fp8", "layerwise_offload")
def test_fp8_blocks_offload_layerwise_exactly():
    """FP8 weights (float8 storage + scale buffers) move with their block: same numbers as resident FP8."""
    from ditserve.deployments import QuantizationConfig

    def engine(offload: OffloadConfig) -> Engine:
        return Engine(EngineConfig(model="ditserve/tiny-flux", device="cpu", dtype="float32", offload=offload,
                                   quant=QuantizationConfig(quantization="fp8")))

    _equal(engine(LAYERWISE).generate(_request("flux"), output_type="np"),
           engine(OffloadConfig()).generate(_request("flux"), output_type="np"))
