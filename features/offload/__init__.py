"""CPU offload: model-level (a stage's modules on the device only for its call, stages sharing a GPU
taking turns) and layerwise (a DiT's blocks group by group, the next prefetched), with a disk tier
and host copies sharded over the sequence-parallel group. See ``model.py``, ``layerwise.py`` and
``weights.py``; the feature table (``deployments/attach.py``) attaches them.
"""

from .config import OffloadConfig
from .layerwise import LayerwiseOffload, apply_layerwise_offload, layerwise_offload_of, remove_layerwise_offload
from .model import (
    DeviceLease,
    FileLease,
    ModelOffload,
    NoLease,
    apply_model_offload,
    device_lease,
    model_offload_of,
    offload_session,
    remove_model_offload,
)
from .weights import Gatherer, Weights

__all__ = [
    "DeviceLease",
    "FileLease",
    "Gatherer",
    "LayerwiseOffload",
    "ModelOffload",
    "NoLease",
    "OffloadConfig",
    "Weights",
    "apply_layerwise_offload",
    "apply_model_offload",
    "device_lease",
    "layerwise_offload_of",
    "model_offload_of",
    "offload_session",
    "remove_layerwise_offload",
    "remove_model_offload",
]
