"""Throughput (issue 21): the TextEncoder's prompt cache and request batching in the DiT.

Stage level, no Ray: the tiny Qwen-Image checkpoint (the demo model's family), 64x64, 2 steps.
"""

from __future__ import annotations

import pytest
import torch

from ditserve.deployments.engine import Engine, EngineConfig
from ditserve.deployments.schema import GenerationRequest
from ditserve.deployments.stages import Encoder, conditioning_report


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    return Engine(EngineConfig(model=str(tiny_qwen), device="cpu"))


def _req(engine, prompt="a red circle", **kw):
    kw.setdefault("size", "64x64")
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("seed", 1)
    return engine.resolve(GenerationRequest(prompt=prompt, **kw))


def test_prompt_cache_hits_a_repeated_prompt_with_identical_embeddings(engine):
    encoder = Encoder(engine.config, engine.adapter, resolved=engine.resolved, caps=engine.caps, prompt_cache_mb=8)
    req = _req(engine, negative_prompt="blurry", true_cfg_scale=4.0)
    first = encoder.encode([req])[0]
    second = encoder.encode([req])[0]
    assert conditioning_report(first.reports) == {"prompt_misses": 2}
    assert conditioning_report(second.reports) == {"prompt_hits": 2}
    for a, b in ((first.cond.positive, second.cond.positive), (first.cond.negative, second.cond.negative)):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k
    # the cached encodings equal the encoder's own (no cache at all)
    plain = engine.encoder.encode([req])[0]
    assert torch.equal(plain.cond.positive["encoder_hidden_states"], second.cond.positive["encoder_hidden_states"])
    assert conditioning_report(plain.reports) is None  # the reference runner keeps no prompt cache
    stats = encoder.prompt_cache.stats()
    assert (stats["hits"], stats["entries"]) == (2, 2)


def test_prompt_cache_evicts_least_recently_used_past_its_size(engine):
    probe = Encoder(engine.config, engine.adapter, resolved=engine.resolved, caps=engine.caps, prompt_cache_mb=8)
    probe.encode([_req(engine, "one")])
    one_bytes = probe.prompt_cache.bytes
    # room for two encodings of this size, not three
    encoder = Encoder(engine.config, engine.adapter, resolved=engine.resolved, caps=engine.caps,
                      prompt_cache_mb=2.5 * one_bytes / 2**20)
    for prompt in ("one", "two", "three"):  # equal token counts: equal sizes
        encoder.encode([_req(engine, prompt)])
    assert len(encoder.prompt_cache) == 2
    assert conditioning_report(encoder.encode([_req(engine, "three")])[0].reports) == {"prompt_hits": 1}
    assert conditioning_report(encoder.encode([_req(engine, "one")])[0].reports) == {"prompt_misses": 1}
    off = Encoder(engine.config, engine.adapter, resolved=engine.resolved, caps=engine.caps, prompt_cache_mb=0)
    off.encode([_req(engine, "one")])
    assert conditioning_report(off.encode([_req(engine, "one")])[0].reports) is None and len(off.prompt_cache) == 0


def _items(engine, reqs):
    return [(r, engine.encoder.encode([r])[0], f"r{i}") for i, r in enumerate(reqs)]


def test_every_request_of_a_batch_equals_itself_alone(engine):
    cfg = dict(negative_prompt="blurry", true_cfg_scale=4.0)
    reqs = [
        _req(engine, "a red circle", seed=1, **cfg),
        _req(engine, "a blue square", seed=2, negative_prompt="ugly", true_cfg_scale=2.5),  # own scale and negative
        _req(engine, "a red circle", seed=3, n=2, **cfg),  # two samples of its own
        _req(engine, "a red circle", seed=4, size="128x64", **cfg),  # another size: kept out of the batch
        _req(engine, "a red circle", seed=5, cache={"backend": "tea_cache", "config": {"rel_l1_thresh": 0.5}}, **cfg),
        _req(engine, "a red circle", seed=6),  # CFG off: another guidance kind
        _req(engine, "a red circle", seed=7, negative_prompt="dark", true_cfg_scale=4.0),  # a shorter negative text
    ]
    items = _items(engine, reqs)
    batched = engine.denoiser.denoise_batch(items)
    reports = [d.reports[-1].batch for d in batched]
    assert reports[:3] == [{"size": 3, "samples": 4}] * 3
    assert reports[3] == {"size": 1, "samples": 1}
    assert reports[4]["size"] == 1 and reports[4]["alone"].startswith("cache:")
    assert reports[5] == reports[6] == {"size": 1, "samples": 1}
    assert batched[4].reports[-1].cache is not None  # the cache ran, on the request alone
    for (req, encoded, rid), got in zip(items, batched):
        alone = engine.denoiser.denoise(req, encoded, rid).latents
        assert got.latents.shape == alone.shape
        torch.testing.assert_close(got.latents, alone, atol=1e-4, rtol=0)
    # a batch is not a no-op: different seeds gave different samples
    assert (batched[0].latents - batched[2].latents[:1]).abs().max() > 1e-2


def _makespan_in_steps(assign, reqs, replicas=2):
    """All requests queued at once; each replica works through its queue: the makespan is the
    largest queued cost (steps of one 512x512 sample)."""
    from ditserve.deployments.routing import request_cost

    load = [0.0] * replicas
    for i, req in enumerate(reqs):
        r = assign(i, req, load)
        load[r] += request_cost(req)
    return max(load)


def test_least_cost_routing_beats_round_robin_on_a_mix_of_large_and_small_requests(engine):
    from ditserve.deployments.routing import LeastCostPolicy, request_cost

    small = _req(engine, size="64x64", num_inference_steps=2)  # 1/64 of a 512x512 sample, 2 steps
    large = _req(engine, size="256x256", num_inference_steps=8, negative_prompt="blurry", true_cfg_scale=4.0)
    assert request_cost(large) == 256 * 256 / 512**2 * 8 * 2 and request_cost(small) == 64 * 64 / 512**2 * 2
    reqs = [large, small] * 4 + [large, large, small, small]

    policy = LeastCostPolicy()

    def least_cost(i, req, load):
        replica = policy.choose([0, 1])
        policy.routed(replica, f"r{i}", request_cost(req))
        return replica

    round_robin = _makespan_in_steps(lambda i, req, load: i % 2, reqs)
    cost_aware = _makespan_in_steps(least_cost, reqs)
    assert cost_aware < round_robin
    assert cost_aware <= sum(map(request_cost, reqs)) / 2 + request_cost(large)  # within one request of even
    # completions free a replica's queue; a replica gone takes its books with it
    for i in range(len(reqs)):
        policy.completed(f"r{i}")
    assert policy.queued == {0: 0.0, 1: 0.0}
    policy.routed(1, "x", 5.0)
    assert policy.choose([1, 0]) == 0
    policy.forget(1)
    assert policy.choose([1, 0]) == 1


def test_a_batch_on_cfg_parallel_ranks_equals_each_request_alone(engine, tiny_qwen):
    # CFG parallel: the two branches of every request on two ranks, combined per request
    from ditserve.deployments.executor import local_executor
    from ditserve.parallel import ParallelConfig

    # the session's shared 2-rank executor (spawned once for every 2-rank test)
    dit = local_executor(2, "cpu")
    dit.load(EngineConfig(model=str(tiny_qwen), device="cpu", parallel=ParallelConfig(cfg_parallel_size=2)),
             ["denoise"])
    reqs = [_req(engine, "a red circle", seed=1, negative_prompt="blurry", true_cfg_scale=4.0),
            _req(engine, "a blue square", seed=2, negative_prompt="ugly", true_cfg_scale=2.0)]
    items = _items(engine, reqs)
    ranks = dit.call_all("denoise_batch", items, reply_rank=None)
    for results in ranks:
        assert [d.reports[-1].batch for d in results] == [{"size": 2, "samples": 2}] * 2
        for (req, encoded, rid), got in zip(items, results):
            torch.testing.assert_close(got.latents, engine.denoiser.denoise(req, encoded, rid).latents,
                                       atol=1e-4, rtol=0)


def test_a_freed_replica_goes_to_the_oldest_interactive_request_before_older_batch_ones(engine):
    import concurrent.futures
    import types

    from ditserve.deployments.routing import first_interactive

    def pending(req, done=False):  # the fields of Serve's PendingRequest the router reads
        future = concurrent.futures.Future()
        if done:
            future.set_result(None)
        return types.SimpleNamespace(args=[req], future=future)

    batch = _req(engine, priority="batch")
    interactive = _req(engine)
    assert (batch.priority, interactive.priority) == ("batch", "interactive")
    queue = [pending(batch), pending(interactive, done=True), pending(batch), pending(interactive)]
    assert first_interactive(queue) is queue[3]  # the done (routed or cancelled) one is passed over
    assert first_interactive(queue[:3]) is None  # no interactive waits: the oldest of all goes (FIFO)


def test_a_request_refused_in_a_batch_fails_alone_and_its_batch_mates_run(engine):
    import dataclasses

    from ditserve.deployments.schema import LoraRequest, RequestError

    good = [_req(engine, seed=1), _req(engine, seed=2)]
    # an adapter on a deployment without lora_dir: the Denoiser refuses it (a 4xx naming lora)
    bad = dataclasses.replace(_req(engine, seed=3), lora=(LoraRequest(name="x"),))
    out = engine.denoiser.denoise_batch(_items(engine, [good[0], bad, good[1]]))
    assert isinstance(out[1], RequestError) and out[1].field == "lora"
    assert [d.reports[-1].batch["size"] for d in (out[0], out[2])] == [2, 2]
