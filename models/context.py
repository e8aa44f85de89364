"""Per-request and per-step context (STYLE.md rule 6).

State that belongs to one request (cache accumulators, LoRA choice, generators) lives in the
``RequestContext`` set around the request, never in module globals: ``request_state(name)`` is a
feature's own slot in it (a feature keys its contents by CFG branch), gone when the request ends.
This is the one mechanism; features keep no context variables of their own. The denoising loop of a
family adapter opens a ``step_context`` around every denoiser call, so hooks know the step, the
timestep and the CFG branch they run in. Both are ``contextvars``, so concurrent requests in
threads or asyncio tasks each see their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import uuid
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """Identity of one request.

    Attributes:
        id: request id, carried into logs and metrics.
        seed: the request's seed (``None`` means a random seed was drawn by the caller).
        num_inference_steps: denoising steps of this request.
    """

    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    seed: int | None = None
    num_inference_steps: int = 0
    #: per-feature state of this request (``request_state``); the context's identity is the fields above
    state: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where in the denoising loop a denoiser call happens.

    Attributes:
        index: step index, 0-based.
        timestep: the scheduler's timestep value at this step.
        branch: CFG branch, ``"cond"`` or ``"uncond"``.
    """

    index: int
    timestep: float
    branch: str


_REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("ditserve_request", default=None)
_STEP: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("ditserve_step", default=None)


@contextlib.contextmanager
def request_context(ctx: RequestContext) -> Iterator[RequestContext]:
    token = _REQUEST.set(ctx)
    try:
        yield ctx
    finally:
        _REQUEST.reset(token)


@contextlib.contextmanager
def step_context(index: int, timestep: float, branch: str) -> Iterator[StepContext]:
    token = _STEP.set(StepContext(index=index, timestep=timestep, branch=branch))
    try:
        yield _STEP.get()
    finally:
        _STEP.reset(token)


def current_request() -> RequestContext:
    """The active request; raises with the fix when a hook runs outside one."""
    ctx = _REQUEST.get()
    if ctx is None:
        raise RuntimeError("no request context is set: wrap the call in `with request_context(RequestContext(...)):`")
    return ctx


def request_state(name: str) -> dict:
    """Feature ``name``'s slot in the active request's state (created empty on first use); raises
    with the fix when no request is active."""
    return current_request().state.setdefault(name, {})


def active_request() -> RequestContext | None:
    """The active request, or ``None`` outside one (for hooks that stay idle there)."""
    return _REQUEST.get()


def current_step() -> StepContext:
    """The active step; raises with the fix when a hook runs outside the denoising loop."""
    ctx = _STEP.get()
    if ctx is None:
        raise RuntimeError("no step context is set: denoiser calls must run inside `step_context(i, t, branch)`")
    return ctx
