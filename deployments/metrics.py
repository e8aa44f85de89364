"""The app's Prometheus metrics (``ray.serve.metrics``; Ray prefixes the names with ``ray_`` and tags
each with the ``deployment``, ``replica`` and ``application`` that recorded it).

``RouterMetrics``, one object per Router replica: seconds per stage and per request, requests by
outcome, and the cache's computed/skipped transformer calls and blocks. ``DitMetrics``, one per DiT
replica: the size of the batch each request was denoised in, and what its ranks' LoRA store did
(adapters loaded from ``lora_dir``, hits, restores from CPU memory, evictions), so the ``replica`` tag shows how well multiplexed routing keeps adapters
where they are loaded. The README's "Observability" lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve.metrics import Counter, Histogram

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250]


class RouterMetrics:
    """What the Router records per request."""

    def __init__(self) -> None:
        self.stage_seconds = Histogram(
            "ditserve_stage_seconds", description="Seconds per request stage.", boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model", "stage"),
        )
        self.request_seconds = Histogram(
            "ditserve_request_seconds", description="Seconds per request, end to end.",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("model",),
        )
        self.requests = Counter(
            "ditserve_requests_total", description="Requests by outcome.", tag_keys=("model", "status")
        )
        self.cache_calls = Counter(
            "ditserve_cache_calls_total", description="Transformer calls of cached requests, computed or skipped.",
            tag_keys=("model", "backend", "outcome"),
        )
        self.conditioning_cache = Counter(
            "ditserve_conditioning_cache_total", description="Cached encodes by kind (prompt: the text encoder's "
            "prompt cache; editing: vision, the vision tower, latent, the VAE encode) and outcome (hits: skipped, "
            "misses: computed).",
            tag_keys=("model", "kind", "outcome"),
        )
        self.cache_blocks = Counter(
            "ditserve_cache_blocks_total", description="Transformer blocks of cached requests, evaluated or skipped.",
            tag_keys=("model", "backend", "outcome"),
        )

    def succeeded(self, model: str, timings: Mapping[str, float], cache: Mapping[str, Any] | None) -> None:
        """A request answered: its seconds per stage (``total`` is the end-to-end time), its cache stats."""
        for stage, seconds in timings.items():
            if stage != "total":
                self.stage_seconds.observe(seconds, tags={"model": model, "stage": stage})
        self.request_seconds.observe(timings["total"], tags={"model": model})
        self.requests.inc(tags={"model": model, "status": "ok"})
        if cache:
            self._count_cache(model, cache)

    def conditioning(self, model: str, counts: Mapping[str, int] | None) -> None:
        """One editing request's conditioning-cache counts (``vision_hits``, ``latent_misses``, ...)."""
        for name, count in (counts or {}).items():
            kind, outcome = name.split("_", 1)
            if count:
                self.conditioning_cache.inc(count, tags={"model": model, "kind": kind, "outcome": outcome})

    def failed(self, model: str, status: int) -> None:
        """A generation request refused or failed with HTTP ``status``."""
        self.requests.inc(tags={"model": model, "status": str(status)})

    def cancelled(self, model: str) -> None:
        """A request or job cancelled (client disconnect, cancelled handle call, deleted job)."""
        self.requests.inc(tags={"model": model, "status": "cancelled"})

    def _count_cache(self, model: str, stats: Mapping[str, Any]) -> None:
        tags = {"model": model, "backend": stats["backend"]}
        for outcome, calls, blocks in (
            ("computed", stats["calls_computed"], stats["blocks_evaluated"]),
            ("skipped", stats["calls_cached"], stats["blocks_total"] - stats["blocks_evaluated"]),
        ):
            if calls:
                self.cache_calls.inc(calls, tags={**tags, "outcome": outcome})
            if blocks:
                self.cache_blocks.inc(blocks, tags={**tags, "outcome": outcome})


#: the counters of a DiT replica's LoRA store, by the ``Denoised`` report's keys
LORA_EVENTS = {
    "loads": "Adapters read from lora_dir onto a DiT replica's ranks.",
    "hits": "Adapters a request found already on the DiT replica's device.",
    "restores": "Adapters moved back onto the device from the replica's CPU memory (no file read).",
    "evictions": "Adapters moved off the device to make room (least recently used first).",
}


class DitMetrics:
    """What a DiT replica records per request: ``ditserve_lora_<event>_total`` (tag ``model``) for
    each of ``LORA_EVENTS``, from the rank-0 store's report (every rank of a group does the same)."""

    def __init__(self) -> None:
        self.lora = {event: Counter(f"ditserve_lora_{event}_total", description=description, tag_keys=("model",))
                     for event, description in LORA_EVENTS.items()}
        self.batch_size = Histogram("ditserve_dit_batch_size", description="Requests per DiT batch, observed once "
                                    "per request (1: denoised alone).", boundaries=[1, 2, 4, 8, 16, 32, 64],
                                    tag_keys=("model",))

    def batched(self, model: str, size: int) -> None:
        """One request denoised in a batch of ``size`` requests (1: alone; ``dit.max_batch_size``)."""
        self.batch_size.observe(size, tags={"model": model})

    def lora_report(self, model: str, report: Mapping[str, Any] | None) -> None:
        """One request's LoRA report (``{"adapters", "loads", "hits", "restores", "evictions"}``)."""
        if not report:
            return
        for event, counter in self.lora.items():
            if report.get(event):
                counter.inc(report[event], tags={"model": model})
