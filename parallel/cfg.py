"""CFG parallelism: the positive and negative branches on two halves of the world.

Why ours: diffusers has no CFG parallelism. Each cfg rank computes one branch; the predictions
are all-gathered in the cfg group and every rank combines and steps identically. A request
without a negative branch runs the positive branch on both halves (no collective in the cfg
group, so no rank ever waits for a partner that has nothing to send).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .groups import Group


class CFGParallel:
    """A ``cfg_strategy`` for family adapters (see ``models/adapter.py``)."""

    def __init__(self, cfg_group: Group) -> None:
        if cfg_group.size != 2:
            raise ValueError(f"cfg_parallel_size={cfg_group.size}: CFG parallelism splits exactly 2 branches")
        self.group = cfg_group

    def __call__(
        self,
        branches: Sequence[str],
        run_branch: Callable[[str], torch.Tensor],
        combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if len(branches) == 1:
            return run_branch(branches[0])
        mine = run_branch(branches[self.group.rank])
        # collective: both halves reach this point once per step, in the same order
        cond, uncond = self.group.all_gather(mine)
        return combine(cond, uncond)
