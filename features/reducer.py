"""The one collective a feature may need: a sum over the ranks that compute the same thing.

A feature whose decision must be identical on every rank of a sequence-/tensor-parallel group (a
cache's skip metric) reduces its numbers through a ``Reducer`` that the caller passes in. The
protocol is structural: ``ditserve.parallel.groups.Group`` satisfies it without either package
importing the other (shared/DESIGN.md: ``features/`` and ``parallel/`` do not import each other),
and ``LOCAL`` is the single-process one used when no reducer is given.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reducer(Protocol):
    """The ranks that must agree, seen from one of them."""

    @property
    def size(self) -> int:
        """How many ranks take part (1: nothing to reduce)."""
        ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` element-wise over the ranks, in place, and return it."""
        ...


class LocalReducer:
    """One rank: the sum over itself is the tensor."""

    size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


LOCAL = LocalReducer()
