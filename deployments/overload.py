"""Overload and fault answers: per-stage queue bounds (429), a request's own deadline (``timeout_s``,
504), a request cost budget (``max_request_cost``, 422) and the stage errors the HTTP layer maps to
429/503.

Why our own bound in front of Serve's ``max_queued_requests``: Serve checks a handle's queue when a
call is *made*, and counts a call as queued only once its arguments have resolved. The Router makes
every stage call of a request at once (the DiT's and the VAE's arguments are the earlier stages'
unawaited responses), so a burst passes Serve's check for the DiT and the VAE before any of its
calls counts as queued: nothing is ever refused and the queues grow without bound. ``Admission``
bounds, per Router replica (Serve's bound is per caller too), the requests in flight by the
smallest stage bound (``stage_bounds``: a stage's ``max_queued_requests`` plus what its replicas
hold at once), so no stage's queue from this Router can pass its ``max_queued_requests``; past it a
request is refused at once with ``StageBusy`` naming that stage. Serve's own ``BackPressureError``
(a stage's handle queue full all the same, e.g. several Router replicas) is mapped to the same
``StageBusy`` by ``compose``.

Pure Python (no Ray): the bounds, the cost and the checks are unit-tested without a cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from .schema import RequestError, ResolvedRequest

RETRY_AFTER_S = 1  # what a 429 or a 503 tells the client to wait

# the stages a request passes, by their AppConfig option names and deployment names
STAGES = {"text_encoder": "TextEncoder", "prior": "Prior", "dit": "DiT", "vae": "VAE"}


class StageBusy(Exception):
    """A stage's queue is full (HTTP 429 with ``Retry-After``); the message names the stage."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: queue full ({detail}); retry after {RETRY_AFTER_S} s")
        self.stage, self.detail = stage, detail

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields
        return (type(self), (self.stage, self.detail))


class StageUnavailable(Exception):
    """A stage lost a worker mid-request (HTTP 503 with ``Retry-After``): the request failed, the
    stage is rebuilding its group, and a retry is safe (a request is idempotent given its seed)."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: {detail}; retry after {RETRY_AFTER_S} s")
        self.stage, self.detail = stage, detail

    def __reduce__(self):
        return (type(self), (self.stage, self.detail))


def stage_bounds(cfg: Any, with_prior: bool = False) -> dict[str, int]:
    """Requests one Router replica may have in flight per stage before that stage's queue is full:
    ``max_queued_requests`` plus what the stage's replicas hold at once (``max_ongoing_requests`` x
    ``autoscaling.max_replicas``). A stage with ``max_queued_requests=-1`` is unbounded (absent)."""
    bounds = {}
    for option, name in STAGES.items():
        if option == "prior" and not with_prior:
            continue
        opts = getattr(cfg, option)
        if opts.max_queued_requests >= 0:
            bounds[option] = opts.max_queued_requests + opts.max_ongoing_requests * opts.autoscaling.max_replicas
    return bounds


class Admission:
    """The requests in flight in one Router replica, bounded by the smallest stage bound."""

    def __init__(self, bounds: Mapping[str, int]) -> None:
        self.bounds = dict(bounds)
        self.limit = min(self.bounds.values()) if self.bounds else None
        self.stage = min(self.bounds, key=self.bounds.__getitem__) if self.bounds else None
        self.in_flight = 0
        self.refused = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the request's life; raises ``StageBusy`` when every slot is taken."""
        if self.limit is not None and self.in_flight >= self.limit:
            self.refused += 1
            name = STAGES[self.stage]
            raise StageBusy(name, f"{self.in_flight} requests in flight reach {self.stage}.max_queued_requests + "
                                  f"what its replicas hold = {self.limit}")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


# ---- per-request caps ------------------------------------------------------------------------------


def check_timeout(timeout_s: float | None, cap: float) -> float | None:
    """The request's deadline in seconds, or ``None``; above the deployment's cap a 422 naming
    ``timeout_s``."""
    if timeout_s is not None and timeout_s > cap:
        raise RequestError("timeout_s", f"{timeout_s:g} exceeds the deployment's max_timeout_s={cap:g}; "
                                        f"ask for at most {cap:g} s")
    return timeout_s


def request_cost(resolved: ResolvedRequest) -> int:
    """n x pixels x frames x steps x CFG branches (2 when the negative branch runs)."""
    p = resolved.params
    frames = getattr(p, "num_frames", None) or 1
    branches = 2 if resolved.negative_prompt is not None else 1
    return p.num_images_per_prompt * p.width * p.height * frames * p.num_inference_steps * branches


def check_cost(resolved: ResolvedRequest, budget: float | None, defaults: Mapping[str, float]) -> None:
    """Refuse (422) a request whose ``request_cost`` exceeds ``budget`` (``max_request_cost``). The
    error names the budget and, as ``param``, the field furthest above the model's default
    (``defaults``: ``steps``, ``pixels``, ``frames``), the one to lower first."""
    if budget is None:
        return
    cost = request_cost(resolved)
    if cost <= budget:
        return
    p = resolved.params
    ratios = {
        "num_inference_steps": p.num_inference_steps / max(defaults.get("steps", 1), 1),
        "size": p.width * p.height / max(defaults.get("pixels", 1), 1),
        "n": float(p.num_images_per_prompt),
        "num_frames": (getattr(p, "num_frames", None) or 1) / max(defaults.get("frames", 1), 1),
    }
    field = max(ratios, key=ratios.__getitem__)
    branches = 2 if resolved.negative_prompt is not None else 1
    raise RequestError(field, f"the request's cost n x pixels x frames x steps x CFG branches = "
                              f"{p.num_images_per_prompt} x {p.width * p.height} x "
                              f"{getattr(p, 'num_frames', None) or 1} x {p.num_inference_steps} x {branches} = {cost} "
                              f"exceeds the deployment's "
                              f"max_request_cost={_num(budget)}; lower {field}")


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
