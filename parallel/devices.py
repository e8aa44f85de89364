"""Which device each rank computes on and which torch.distributed backend joins the ranks: one
decision, from the config, for the local multi-process runner and the Ray worker groups alike.

Why one function: the two runners used to decide apart (one from ``torch.cuda.is_available()``,
one from the device string) and disagreed: with ``device="auto"`` on a GPU box every local rank
landed on ``cuda:0`` over gloo. Here the device string and the number of GPUs this process can
see decide both, and a layout that cannot get one GPU per rank is refused naming the option.

==================  =====================  ==========================================================
``device``          GPUs visible           each rank
==================  =====================  ==========================================================
``cpu``             any                    ``cpu``, gloo
``auto``            0                      ``cpu``, gloo
``auto``/``cuda``   >= 1                   ``cuda:<local_rank % visible>``, NCCL; refused when fewer
                                           GPUs than local ranks (Ray shows each rank its own GPU as
                                           ``cuda:0``: visible 1, local rank 0)
``cuda``            0                      refused (no GPU)
``cuda:N``          any                    one rank only (it pins the device); refused for a world
==================  =====================  ==========================================================
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class RankDevice:
    """Where one rank runs.

    Attributes:
        device: the torch device of the rank's modules and tensors.
        backend: torch.distributed backend of its group (``gloo`` or ``nccl``).
    """

    device: torch.device
    backend: str


def rank_device(device: str, *, world_size: int, local_rank: int, visible_gpus: int) -> RankDevice:
    """Decide the device and backend of one rank.

    Args:
        device: the config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        world_size: ranks in the group (1: a single process, no group).
        local_rank: this rank's index among the ranks of its machine that share ``visible_gpus``.
        visible_gpus: GPUs this process can see (``torch.cuda.device_count()``; passed in so it can
            be faked in tests).

    Raises:
        ValueError: naming ``device`` and what to use instead.
    """
    kind = device.split(":", 1)[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} is not a device ditserve runs on (use 'auto', 'cpu', 'cuda' or 'cuda:N')")
    if kind == "cpu" or (kind == "auto" and visible_gpus == 0):
        return RankDevice(torch.device("cpu"), "gloo")
    if visible_gpus == 0:
        raise ValueError(f"device={device!r}: no CUDA GPU is visible to this process (use device='cpu' or 'auto')")
    if ":" in device:
        if world_size > 1:
            raise ValueError(
                f"device={device!r} pins every one of the {world_size} ranks to one GPU; use device='cuda' "
                "(rank i takes GPU i)"
            )
        index = int(device.split(":", 1)[1])
        if index >= visible_gpus:
            raise ValueError(f"device={device!r}: only {visible_gpus} GPU(s) are visible")
        return RankDevice(torch.device(device), "nccl")
    if local_rank >= visible_gpus:
        raise ValueError(
            f"device={device!r}: {world_size} ranks need one GPU each (NCCL) but this process sees {visible_gpus}; "
            "lower the parallel degrees or use device='cpu'"
        )
    return RankDevice(torch.device(f"cuda:{local_rank}"), "nccl")


def visible_gpus() -> int:
    """GPUs this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
