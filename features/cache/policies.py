"""The skip decisions: TeaCache, DBCache (+ TaylorSeer, SCM).

A policy sees one denoiser call of one CFG branch through the block hooks (``hooks.py``) and says
which contiguous range of blocks may be skipped, whether this call skips it, and what the skipped
range's residual is. Every quantity a decision reads is either identical on all ranks by
construction (step index, counters) or reduced over the rank's branch group (``rel_l1``), so all
ranks of a sequence-/tensor-parallel group decide alike and run the same collectives.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..reducer import LOCAL, Reducer
from .config import CacheDiTConfig, TeaCacheConfig

Pair = tuple[torch.Tensor, torch.Tensor]  # (hidden_states, encoder_hidden_states)


def rel_l1(current: torch.Tensor, previous: torch.Tensor, group: Reducer = LOCAL) -> float:
    """mean|current - previous| / mean|previous| over the whole (sharded) tensor of the group.

    Each rank holds a shard (sequence parallel) or a replica (tensor parallel); the sums are
    all-reduced, so every rank gets the same number (replicas scale numerator and denominator
    alike)."""
    sums = torch.stack([(current.double() - previous.double()).abs().sum(), previous.double().abs().sum()])
    group.all_reduce(sums)
    num, den = float(sums[0]), float(sums[1])
    return math.inf if den == 0 else num / den


@dataclasses.dataclass
class BranchState:
    """Per request and CFG branch: what the policy remembers between steps."""

    skipping: bool = False  # decision of the current call
    call_input: Pair | None = None  # inputs of block 0 in the current call
    range_input: Pair | None = None  # inputs of the first skippable block in the current call
    residual: Pair | None = None  # last computed residual of the skippable range
    probe: torch.Tensor | None = None  # TeaCache: previous modulated input; DBCache: last computed Fn residual
    accumulated: float = 0.0  # TeaCache
    cached_steps: int = 0
    continuous_cached: int = 0
    taylor: tuple[TaylorSeer, TaylorSeer] | None = None
    decisions: list[str] = dataclasses.field(default_factory=list)  # "C" computed / "S" skipped, per call


class TaylorSeer:
    """Finite-difference Taylor expansion of a residual over the step index.

    At computed steps ``update`` refreshes the derivatives (order 0 = the value, order i+1 = the
    difference of order i over the step distance); at skipped steps ``predict`` evaluates
    ``sum_i d_i * dt**i / i!``. With one computed step it reuses the value (order 0)."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.factors: list[torch.Tensor] = []
        self.step: int | None = None

    def update(self, step: int, value: torch.Tensor) -> None:
        factors = [value]
        if self.step is not None:
            dt = step - self.step
            for i in range(min(self.order, len(self.factors))):
                factors.append((factors[i] - self.factors[i]) / dt)
        self.factors, self.step = factors, step

    def predict(self, step: int) -> torch.Tensor:
        dt = step - self.step
        out, term = self.factors[0], 1.0
        for i in range(1, len(self.factors)):
            term = term * dt / i
            out = out + self.factors[i] * term
        return out


# Fraction of steps an SCM policy computes (at 28 steps: 18 / 15 / 11 / 8, as cache-dit's presets).
SCM_FRACTIONS = {"slow": 18 / 28, "medium": 15 / 28, "fast": 11 / 28, "ultra": 8 / 28}


def steps_mask(policy: str, num_steps: int) -> list[bool]:
    """Steps Computation Mask: ``True`` where a step must compute.

    Our spacing: the computed steps sit at ``(num_steps-1) * (j/(k-1))**2`` for j = 0..k-1, so they
    are dense early (where the image's layout forms) and sparse late; the first and last steps
    always compute."""
    k = max(2, math.ceil(SCM_FRACTIONS[policy] * num_steps))
    if k >= num_steps:
        return [True] * num_steps
    computed, previous = set(), -1
    for j in range(k):  # strictly increasing, leaving room for the ones after
        previous = min(max(round((num_steps - 1) * (j / (k - 1)) ** 2), previous + 1), num_steps - k + j)
        computed.add(previous)
    return [i in computed for i in range(num_steps)]


class TeaCachePolicy:
    """Skip all blocks while the accumulated rescaled change of the modulated input is small."""

    def __init__(self, config: TeaCacheConfig, coefficients: tuple[float, ...], num_blocks: int, num_steps: int,
                 group: Reducer = LOCAL) -> None:
        self.threshold = config.rel_l1_thresh
        self.coefficients = coefficients
        self.skip_range = (0, num_blocks - 1)
        self.decide_after = None  # decided before block 0
        self.num_steps = num_steps
        self.group = group

    def rescale(self, x: float) -> float:
        out = 0.0
        for c in self.coefficients:  # Horner, highest power first
            out = out * x + c
        return abs(out)

    def decide(self, state: BranchState, step: int, modulated: torch.Tensor) -> bool:
        skip = False
        if 0 < step < self.num_steps - 1 and state.probe is not None and state.residual is not None:
            state.accumulated += self.rescale(rel_l1(modulated, state.probe, self.group))
            skip = state.accumulated < self.threshold
        if not skip:
            state.accumulated = 0.0
        state.probe = modulated
        return skip

    def residual(self, state: BranchState, step: int) -> Pair:
        return state.residual

    def stored(self, state: BranchState, step: int, residual: Pair) -> None:
        state.residual = residual


class DBCachePolicy:
    """DBCache: probe with the first Fn blocks, skip the middle ones, always run the last Bn."""

    def __init__(self, config: CacheDiTConfig, num_blocks: int, num_steps: int, group: Reducer = LOCAL) -> None:
        self.config = config
        self.skip_range = (config.Fn_compute_blocks, num_blocks - config.Bn_compute_blocks - 1)
        self.decide_after = config.Fn_compute_blocks - 1
        self.group = group
        self.mask = steps_mask(config.scm_steps_mask_policy, num_steps) if config.scm_steps_mask_policy else None

    def decide(self, state: BranchState, step: int, probe: torch.Tensor) -> bool:
        cfg = self.config
        skip = False
        if state.residual is not None:
            if self.mask is not None and self.mask[step]:
                skip = False
            elif self.mask is not None and cfg.scm_steps_policy == "static":
                skip = True
            elif (
                step >= cfg.max_warmup_steps
                and (cfg.max_cached_steps < 0 or state.cached_steps < cfg.max_cached_steps)
                and (cfg.max_continuous_cached_steps < 0 or state.continuous_cached < cfg.max_continuous_cached_steps)
                and state.probe is not None
            ):
                skip = rel_l1(probe, state.probe, self.group) < cfg.residual_diff_threshold
        if not skip:
            state.probe = probe  # compare with the last *computed* step, so drift accumulates
        return skip

    def residual(self, state: BranchState, step: int) -> Pair:
        if state.taylor is None:
            return state.residual
        encoder = None if state.residual[1] is None else state.taylor[1].predict(step)  # None: no text output
        return state.taylor[0].predict(step), encoder

    def stored(self, state: BranchState, step: int, residual: Pair) -> None:
        state.residual = residual
        if self.config.enable_taylorseer:
            if state.taylor is None:
                order = self.config.taylorseer_order
                state.taylor = (TaylorSeer(order), TaylorSeer(order))
            state.taylor[0].update(step, residual[0])
            if residual[1] is not None:
                state.taylor[1].update(step, residual[1])
