"""Cache acceleration (TeaCache, DBCache/TaylorSeer/SCM): exact when thresholds are 0, skips what
the config says, takes the same decisions on every rank, keeps state per request and per branch."""

from __future__ import annotations

import threading
import typing

import pytest
import torch
from pydantic import ValidationError

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.deployments.local import run_local
from ditserve.features.cache import (
    BACKENDS,
    CACHE_KINDS,
    CacheBackend,
    CacheDiTSettings,
    CacheOff,
    CacheOverride,
    CacheRequest,
    CacheSettings,
    TaylorSeer,
    TeaCacheSettings,
    merge_cache,
    parse_cache_settings,
    steps_mask,
)
from ditserve.features.cache.config import CacheConfigError
from ditserve.models import CacheBlocks
from ditserve.parallel import ParallelConfig

pytestmark = pytest.mark.timeout(300)

STEPS = 8
BASE = dict(prompt="a red circle on a blue background", size="80x48", num_inference_steps=STEPS, seed=1)
FAMILY_KW = {"qwen-image": {}, "flux": {"guidance_scale": 3.5}}
CFG = dict(negative_prompt="blurry", true_cfg_scale=4.0)
# thresholds at which the tiny random models take mixed decisions (some steps skipped, some not),
# so a rank-local metric would show up as diverging decisions
DB_MIXED = {"backend": "cache_dit", "config": {"residual_diff_threshold": 0.45, "max_warmup_steps": 1,
                                               "max_continuous_cached_steps": -1}}
TEA_MIXED = {"backend": "tea_cache", "config": {"rel_l1_thresh": 0.15}}


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    return {family: Engine(EngineConfig(model=str(path), device="cpu")) for family, path in tiny_checkpoints.items()}


def _run(engine, family, cache=None, **extra):
    return engine.generate(GenerationRequest(**BASE, **FAMILY_KW[family], **extra, cache=cache), output_type="np")


# ---- config and validation ----------------------------------------------------------------------

def test_config_errors_name_the_option():
    with pytest.raises(CacheConfigError, match="cache_config.Fn_compute_blocks.*cannot be combined"):
        parse_cache_settings("tea_cache", {"Fn_compute_blocks": 2})
    with pytest.raises(CacheConfigError, match="cache_config.rel_l1_thresh"):
        parse_cache_settings("tea_cache", {"rel_l1_thresh": -1})
    with pytest.raises(CacheConfigError, match="cache_config.bogus: unknown option"):
        parse_cache_settings("cache_dit", {"bogus": 1})
    with pytest.raises(CacheConfigError, match="cache_backend.*tea_cache"):
        parse_cache_settings("teacache", {})
    with pytest.raises(ValidationError, match="cache_config.scm_steps_mask_policy"):
        EngineConfig(cache_backend="cache_dit", cache_config={"scm_steps_mask_policy": "warp"})
    config = EngineConfig(cache_backend="cache_dit", cache_config={"Fn_compute_blocks": 2})
    assert config.cache().config.Fn_compute_blocks == 2
    assert EngineConfig.model_validate(config.model_dump()) == config  # round-trips (serve config files)


def test_request_override_merges_over_the_deployment_default():
    default = parse_cache_settings("cache_dit", {"Fn_compute_blocks": 2})
    merged = merge_cache(default, CacheRequest(config={"residual_diff_threshold": 0.1}))
    assert (merged.config.Fn_compute_blocks, merged.config.residual_diff_threshold) == (2, 0.1)
    assert merge_cache(default, CacheRequest(backend="none")) is None
    assert merge_cache(default, CacheRequest(backend="tea_cache")).backend == "tea_cache"
    with pytest.raises(CacheConfigError, match="cache.backend"):
        merge_cache(None, CacheRequest(config={"rel_l1_thresh": 0.1}))


def test_bad_cache_requests_name_the_field(engines):
    engine = engines["qwen-image"]
    cases = [
        ({"backend": "tea_cache", "config": {"rel_l1_thresh": "x"}}, "cache.config.rel_l1_thresh"),
        ({"backend": "tea_cache", "config": {"Bn_compute_blocks": 1}}, "cache.config.Bn_compute_blocks"),
        ({"backend": "cache_dit", "config": {"Fn_compute_blocks": 2}}, "cache.config.Fn_compute_blocks"),
    ]
    for cache, field in cases:
        with pytest.raises(RequestError) as err:  # at parsing (the union) or against the model (block count)
            engine.resolve(GenerationRequest.parse({**BASE, "cache": cache}))
        assert err.value.field == field, err.value
    with pytest.raises(RequestError) as err:
        GenerationRequest.parse({**BASE, "cache": {"backend": "magic"}})
    assert err.value.field == "cache.backend"


def test_the_cache_request_is_a_union_discriminated_by_backend():
    # each backend's knobs validate as that backend's model: a cache_dit knob in a tea_cache request
    # is named where it was written, with the reason
    with pytest.raises(RequestError) as err:
        GenerationRequest.parse({**BASE, "cache": {"backend": "tea_cache", "config": {"max_warmup_steps": 2}}})
    assert err.value.field == "cache.config.max_warmup_steps" and "cannot be combined" in err.value.message
    parsed = GenerationRequest.parse({**BASE, "cache": {"backend": "cache_dit", "config": {"max_warmup_steps": 2}}})
    assert isinstance(parsed.cache.root, CacheDiTSettings) and parsed.cache.root.config.max_warmup_steps == 2
    assert isinstance(CacheRequest(backend="tea_cache").root, TeaCacheSettings)
    assert isinstance(CacheRequest(backend="none").root, CacheOff)
    assert isinstance(CacheRequest(config={"rel_l1_thresh": 0.1}).root, CacheOverride)
    with pytest.raises(RequestError) as err:
        GenerationRequest.parse({**BASE, "cache": {"backend": "none", "config": {"rel_l1_thresh": 0.1}}})
    assert err.value.field == "cache.config"
    # the backend names are written once: the literal, the tuple and the union agree
    assert BACKENDS == tuple(typing.get_args(CacheBackend)) == ("tea_cache", "cache_dit")
    assert [k.model_fields["backend"].annotation for k in CACHE_KINDS] == [typing.Literal[b] for b in BACKENDS]


def test_start_up_refuses_a_cache_the_model_cannot_run(tiny_qwen):
    with pytest.raises(ValueError, match="cache_config.Fn_compute_blocks.*2 transformer blocks"):
        Engine(EngineConfig(model=str(tiny_qwen), device="cpu", cache_backend="cache_dit",
                            cache_config={"Fn_compute_blocks": 1, "Bn_compute_blocks": 1}))


def test_taylorseer_extrapolates_a_linear_residual_exactly():
    seer = TaylorSeer(order=1)
    seer.update(0, torch.tensor([1.0]))
    assert seer.predict(1).item() == 1.0  # one point: reuse
    seer.update(2, torch.tensor([5.0]))  # slope 2 per step
    assert seer.predict(3).item() == 7.0 and seer.predict(5).item() == 11.0


def test_steps_masks():
    for policy, computed in {"slow": 18, "medium": 15, "fast": 11, "ultra": 8}.items():
        mask = steps_mask(policy, 28)
        assert sum(mask) == computed and mask[0] and mask[-1], policy
    assert steps_mask("ultra", 3) == [True, False, True] and all(steps_mask("slow", 2))


# ---- the arithmetic, on toy blocks whose outputs can be worked out by hand -------------------------

class ToyBlock(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return encoder_hidden_states + 10 * self.k, hidden_states + self.k * temb


class ToyTransformer(torch.nn.Module):
    """Four blocks: uncached, hidden -> hidden + 10·temb and text -> text + 100."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(ToyBlock(k) for k in (1, 2, 3, 4))

    def forward(self, hidden_states, encoder_hidden_states, temb):
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)
        return hidden_states, encoder_hidden_states


TOY_BLOCKS = CacheBlocks(("transformer_blocks",), lambda block, kw: kw["temb"] * torch.ones(2), (0.0, 0.0, 0.0, 1.0, 0.0))


@pytest.fixture
def toy():
    from ditserve.features.cache import apply_cache

    model = ToyTransformer()
    apply_cache(model, TOY_BLOCKS)
    return model


def _toy_steps(model, settings, tembs):
    from ditserve.features.cache import cache_run
    from ditserve.models.context import step_context
    from ditserve.parallel import ParallelGroups

    hidden, text = torch.zeros(1, 2), torch.zeros(1, 2)
    outs = []
    with cache_run(settings, model, TOY_BLOCKS, len(tembs), ParallelGroups.single().branch) as run:
        for i, t in enumerate(tembs):
            with step_context(i, t, "cond"):
                h, e = model(hidden_states=hidden, encoder_hidden_states=text, temb=torch.tensor(t))
            outs.append((h[0, 0].item(), e[0, 0].item()))
    return outs, run.stats


def test_toy_dbcache_reuses_and_taylorseer_extrapolates_the_middle_residual(toy):
    config = {"residual_diff_threshold": 9.0, "max_warmup_steps": 1, "max_continuous_cached_steps": 1}
    tembs = [1.0, 2.0, 3.0, 4.0]
    # uncached: hidden + 10·t; F1B0 skips blocks 2-4 (9·t) when cached
    plain, stats = _toy_steps(toy, parse_cache_settings("cache_dit", {**config, "enable_taylorseer": False}), tembs)
    assert stats.decisions == {"cond": "CSCS"}
    # cached step 1: block 1 gives 2, plus the middle residual of step 0 (9·1): 11; text 10 + 90
    assert plain == [(10.0, 100.0), (11.0, 100.0), (30.0, 100.0), (4.0 + 27.0, 100.0)]
    seer, _ = _toy_steps(toy, parse_cache_settings("cache_dit", {**config, "enable_taylorseer": True}), tembs)
    # step 3: residuals 9 (step 0) and 27 (step 2) -> 9 per step -> 36: exactly the uncached 40
    assert seer == [(10.0, 100.0), (11.0, 100.0), (30.0, 100.0), (40.0, 100.0)]
    assert stats.blocks_evaluated == 2 * 4 + 2 * 1


def test_toy_tea_cache_accumulates_and_skips_every_block(toy):
    tembs = [1.0, 1.1, 1.2, 1.3, 1.4]  # relative changes 0.1, 0.091, 0.083, 0.077 (identity polynomial)
    outs, stats = _toy_steps(toy, parse_cache_settings("tea_cache", {"rel_l1_thresh": 0.25}), tembs)
    assert stats.decisions == {"cond": "CSSCC"}  # 0.1, 0.191 < 0.25; 0.274 computes; the last always does
    assert [round(h, 4) for h, _ in outs] == [10.0, 10.0, 10.0, 13.0, 14.0]  # skipped: input + step 0's residual
    assert stats.blocks_evaluated == 3 * 4


# ---- behaviour on the real tiny models ------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen-image", "flux"])
@pytest.mark.parametrize("cache", [
    {"backend": "tea_cache", "config": {"rel_l1_thresh": 0}},
    {"backend": "cache_dit", "config": {"residual_diff_threshold": 0, "max_warmup_steps": 0}},
], ids=["tea_cache", "cache_dit"])
def test_zero_threshold_equals_uncached(engines, family, cache):
    engine = engines[family]
    plain, cached = _run(engine, family), _run(engine, family, cache)
    assert torch.equal(plain.latents, cached.latents)
    assert cached.cache["calls_cached"] == 0
    assert cached.cache["blocks_evaluated"] == cached.cache["blocks_total"]


@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_block_evaluations_drop_as_configured(engines, family):
    engine = engines[family]
    blocks = {"qwen-image": 2, "flux": 3}[family]
    plain = _run(engine, family)
    # a threshold nothing stays under: the limits alone decide
    db = {"residual_diff_threshold": 9.0, "max_warmup_steps": 2, "max_continuous_cached_steps": 2}
    cases = [
        ({"backend": "tea_cache", "config": {"rel_l1_thresh": 9.0}}, "CSSSSSSC", 0),  # first/last always run
        ({"backend": "cache_dit", "config": db}, "CCSSCSSC", 1),
        ({"backend": "cache_dit", "config": {**db, "max_cached_steps": 3}}, "CCSSCSCC", 1),
        ({"backend": "cache_dit", "config": {**db, "max_continuous_cached_steps": -1}}, "CCSSSSSS", 1),
        ({"backend": "cache_dit", "config": {"scm_steps_mask_policy": "fast", "scm_steps_policy": "static"}},
         "".join("C" if m else "S" for m in steps_mask("fast", STEPS)), 1),
    ]
    for cache, pattern, per_skip in cases:
        out = _run(engine, family, cache)
        stats = out.cache
        assert stats["decisions"] == {"cond": pattern}, cache
        skipped = pattern.count("S")
        assert stats["blocks_total"] == STEPS * blocks
        assert stats["blocks_evaluated"] == (STEPS - skipped) * blocks + skipped * per_skip, cache
        assert not torch.equal(out.latents, plain.latents)  # skipping changed something


def test_cfg_branches_keep_their_own_state(engines):
    out = _run(engines["qwen-image"], "qwen-image", DB_MIXED, **CFG)
    decisions = out.cache["decisions"]
    assert set(decisions) == {"cond", "uncond"} and all(len(d) == STEPS for d in decisions.values())
    assert out.cache["calls_computed"] + out.cache["calls_cached"] == 2 * STEPS


def test_per_request_override_does_not_leak(tiny_qwen):
    engine = Engine(EngineConfig(model=str(tiny_qwen), device="cpu", cache_backend="tea_cache",
                                 cache_config={"rel_l1_thresh": 0.15}))
    first = _run(engine, "qwen-image")
    assert first.cache["backend"] == "tea_cache"
    off = _run(engine, "qwen-image", {"backend": "none"})
    assert off.cache is None
    other = _run(engine, "qwen-image", DB_MIXED)
    assert other.cache["backend"] == "cache_dit"
    merged = _run(engine, "qwen-image", {"config": {"rel_l1_thresh": 0}})
    assert merged.cache["backend"] == "tea_cache" and merged.cache["calls_cached"] == 0
    again = _run(engine, "qwen-image")
    assert again.cache == first.cache and torch.equal(again.latents, first.latents)
    assert torch.equal(off.latents, _run(engines_plain(tiny_qwen), "qwen-image").latents)


def engines_plain(path):
    return Engine(EngineConfig(model=str(path), device="cpu"))


def test_concurrent_requests_get_their_own_cache(engines):
    engine = engines["qwen-image"]
    configs = [DB_MIXED, TEA_MIXED, None]
    alone = [_run(engine, "qwen-image", c) for c in configs]
    barrier = threading.Barrier(len(configs), timeout=60)
    results: list = [None] * len(configs)

    def worker(i: int) -> None:
        def callback(step):
            if step.index == 2:  # all requests are mid-loop at once
                barrier.wait()
        results[i] = engine.generate(GenerationRequest(**BASE, cache=configs[i]), output_type="np", callback=callback)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(results, alone):
        assert got.cache == ref.cache
        assert torch.equal(got.latents, ref.latents)


# ---- parallel: every rank decides alike ------------------------------------------------------------

@pytest.mark.parametrize("degrees", [
    # the requests: Cache-DiT with CFG, TeaCache without; each against the single rank's decisions
    pytest.param({"ulysses_degree": 2}, id="ulysses2",
                 marks=[pytest.mark.compat("ulysses", "tea_cache"), pytest.mark.compat("ulysses", "cache_dit")]),
    pytest.param({"ulysses_degree": 2, "cfg_parallel_size": 2}, id="ulysses2_cfg2",
                 marks=pytest.mark.compat("cfg_parallel", "cache_dit")),
    pytest.param({"tensor_parallel_size": 2}, id="tp2", marks=[pytest.mark.compat("tensor_parallel", "tea_cache"),
                                                                pytest.mark.compat("tensor_parallel", "cache_dit")]),
])
def test_parallel_ranks_take_the_single_rank_decisions(tiny_qwen, engines, degrees):
    requests = [GenerationRequest(**BASE, **CFG, cache=DB_MIXED), GenerationRequest(**BASE, cache=TEA_MIXED)]
    references = [engines["qwen-image"].generate(r, output_type="np") for r in requests]
    for ref in references:  # precondition: the metric matters (mixed decisions)
        assert all("S" in d and d.count("C") > 1 for d in ref.cache["decisions"].values()), ref.cache
    config = EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(**degrees))
    ranks = run_local(config, requests)
    for rank, results in enumerate(ranks):
        cfg_rank = rank // 2 if degrees.get("cfg_parallel_size") == 2 else None
        for ref, got in zip(references, results):
            expected = ref.cache["decisions"]
            if cfg_rank is not None and len(expected) == 2:  # each cfg half runs (and keeps) one branch
                branch = ("cond", "uncond")[cfg_rank]
                expected = {branch: expected[branch]}
            assert got["cache"]["decisions"] == expected, (rank, degrees)
            assert float((got["latents"] - ref.latents).abs().max()) <= 1e-4, (rank, degrees)
