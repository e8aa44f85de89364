"""Cost-aware routing of DiT requests: send a request to the DiT replica with the least queued
work, not the fewest queued requests.

A DiT request's work grows with its pixels, frames, steps and CFG branches (and ``n``), so two
replicas with one request each can be hours of GPU apart; routing by count (Serve's default
power-of-two choices) piles large requests on one replica as readily as small ones.
``request_cost`` is the work in one unit, ``LeastCostPolicy`` keeps each replica's queued cost as
this caller sent it (added when a request is routed, removed when it completes) and picks the
least; ``CostAwareRequestRouter`` is the policy as a Ray Serve request router (the DiT deployment's
``request_router`` option), after Serve's multiplexing (LoRA) and locality preferences. When
requests wait for a replica, the router hands a freed replica to the oldest ``interactive``
request before older ``batch`` ones (the request's ``priority``; ``first_interactive``).

Why ours: Serve's routers see request counts only; the cost lives in our request type. Each
caller (Router replica) counts what it sent: with several Router replicas each balances its own
share.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

#: the unit of ``request_cost``: one step of one 512x512 sample without CFG
UNIT_PIXELS = 512 * 512


def request_cost(req: Any) -> float:
    """A ``ResolvedRequest``'s denoising work in steps of one 512x512 sample: pixels x frames x
    steps x CFG branches x ``n`` (CFG counted on when a negative branch runs)."""
    p = req.params
    branches = 2 if req.negative_prompt is not None else 1
    return (p.height * p.width / UNIT_PIXELS) * max(p.num_frames, 1) * p.num_inference_steps * branches * \
        p.num_images_per_prompt


class LeastCostPolicy:
    """Queued cost per replica, as one caller routed it; thread-safe.

    ``choose`` ranks candidates by queued cost (ties: fewer queued requests, then the given order);
    ``routed``/``completed`` keep the books by request id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued: dict[Hashable, float] = {}
        self._requests: dict[str, tuple[Hashable, float]] = {}

    def rank(self, candidates: Sequence[Hashable]) -> list[Hashable]:
        with self._lock:
            counts: dict[Hashable, int] = {}
            for replica, _ in self._requests.values():
                counts[replica] = counts.get(replica, 0) + 1
            order = {c: i for i, c in enumerate(candidates)}
            return sorted(candidates, key=lambda c: (self.queued.get(c, 0.0), counts.get(c, 0), order[c]))

    def choose(self, candidates: Sequence[Hashable]) -> Hashable:
        return self.rank(candidates)[0]

    def routed(self, replica: Hashable, request_id: str, cost: float) -> None:
        with self._lock:
            self._requests[request_id] = (replica, cost)
            self.queued[replica] = self.queued.get(replica, 0.0) + cost

    def completed(self, request_id: str) -> None:
        with self._lock:
            entry = self._requests.pop(request_id, None)
            if entry is not None:
                replica, cost = entry
                self.queued[replica] = max(0.0, self.queued.get(replica, 0.0) - cost)

    def forget(self, replica: Hashable) -> None:
        """A replica gone: its queue is no one's."""
        with self._lock:
            self.queued.pop(replica, None)
            for rid in [r for r, (rep, _) in self._requests.items() if rep == replica]:
                del self._requests[rid]


def _pending_cost(pending: Any) -> float:
    """The cost of a pending ``DiT.denoise`` call (its first argument is the request); 1 step for
    anything else (another method, an argument not yet resolved)."""
    req = _pending_request(pending)
    return request_cost(req) if hasattr(req, "params") and hasattr(req, "negative_prompt") else 1.0


def _pending_request(pending: Any) -> Any:
    args = getattr(pending, "args", None) or ()
    return args[0] if args else None


def first_interactive(pending: Any) -> Any | None:
    """The oldest waiting request (Serve's ``PendingRequest``s, oldest first) whose request is
    ``priority="interactive"``, or ``None``: a replica that frees up takes it before any older
    ``batch`` request (a request whose future is done, i.e. routed or cancelled, is passed over)."""
    for pr in pending:
        if pr.future.done():
            continue
        if getattr(_pending_request(pr), "priority", "interactive") == "interactive":
            return pr
    return None


def _router_class() -> type:
    """The ``CostAwareRequestRouter`` class (Ray is imported only here)."""
    from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter

    class CostAwareRequestRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
        """Serve request router of the DiT: the replicas Serve's multiplexing (LoRA) or locality
        prefer, ranked by this caller's queued cost (``LeastCostPolicy``)."""

        def initialize_state(self, **kwargs: Any) -> None:
            self.policy = LeastCostPolicy()

        async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
            if pending_request is not None and pending_request.metadata.multiplexed_model_id:
                ids = self.apply_multiplex_routing(pending_request=pending_request)
            else:
                ids = self.apply_locality_routing(pending_request=pending_request)
            if not ids:
                return []
            return [[self._replicas[i]] for i in self.policy.rank(sorted(ids, key=str))]

        def _get_pending_request_matching_metadata(self, request_metadata: Any = None) -> Any:
            # FIFOMixin's hook: an adapter's request to a replica that holds it first (multiplexing),
            # then the oldest interactive request, then (None) the oldest of all
            matched = super()._get_pending_request_matching_metadata(request_metadata)
            return matched if matched is not None else first_interactive(self._pending_requests_to_fulfill)

        def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
            self.policy.routed(replica_id, pending_request.metadata.internal_request_id, _pending_cost(pending_request))

        def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
            self.policy.completed(internal_request_id)

        def on_replica_actor_died(self, replica_id: Any) -> None:
            super().on_replica_actor_died(replica_id)
            self.policy.forget(replica_id)

    return CostAwareRequestRouter


#: the DiT deployment's ``request_router_config`` names the router by this import path
ROUTER_PATH = "ditserve.deployments.routing:CostAwareRequestRouter"
_ROUTER: type | None = None


def __getattr__(name: str) -> Any:
    # ``CostAwareRequestRouter`` is made on first use, so importing this module imports no Ray
    global _ROUTER
    if name == "CostAwareRequestRouter":
        if _ROUTER is None:
            _ROUTER = _router_class()
        return _ROUTER
    raise AttributeError(name)
