"""Serving: request schema, the Ray-free engine (composer + in-process runner) and, on top of it,
the Ray Serve deployments.

This module is the public API of the layer: ``cluster/`` imports nothing else from
``ditserve.deployments`` (nor from ``models`` or ``parallel``), so the config classes it builds
flags from and the registry facts its ``models`` and ``make-tiny`` commands show are re-exported
here. The Ray-dependent names (``build_app``, ``IMPORT_PATH``) load on first use, so that importing
the engine does not import Ray.
"""

if __name__ != "ditserve.deployments":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.deployments, not {__name__}: the layers are subpackages of ditserve only")

from typing import Any

from ditserve.features.quantization import QuantizationConfig
from ditserve.models import (
    DEFAULT_MODEL,
    CheckpointError,
    FamilyNotImplementedError,
    Modality,
    ModelNotFoundError,
    implemented_families,
    list_specs,
)
from ditserve.models.tiny import FAMILIES as TINY_FAMILIES
from ditserve.models.tiny import make_tiny
from ditserve.features.lora import LoraConfig
from ditserve.features.offload import OffloadConfig
from ditserve.parallel import ParallelConfig
from ditserve.parallel.vae import VaeConfig

from .audio import encode_audio
from .loading import quantize_checkpoint
from .config import AppConfig, AutoscalingOptions, DitStageOptions, SequentialStageOptions, StageOptions, TextEncoderOptions
from .engine import Engine, EngineConfig, GenerationResult
from .images_in import ImageInputConfig
from .local import ParallelEngine
from .schema import GenerationRequest, LoraRequest, RequestError, ResolvedRequest, resolve_request, select_model
from .security import api_key_digests

_LAZY = {"build_app": ".app", "IMPORT_PATH": ".app"}  # need Ray


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "IMPORT_PATH",
    "TINY_FAMILIES",
    "AppConfig",
    "AutoscalingOptions",
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "FamilyNotImplementedError",
    "GenerationRequest",
    "GenerationResult",
    "ImageInputConfig",
    "LoraConfig",
    "LoraRequest",
    "Modality",
    "ModelNotFoundError",
    "OffloadConfig",
    "ParallelConfig",
    "ParallelEngine",
    "QuantizationConfig",
    "RequestError",
    "ResolvedRequest",
    "SequentialStageOptions",
    "DitStageOptions",
    "TextEncoderOptions",
    "StageOptions",
    "VaeConfig",
    "api_key_digests",
    "build_app",
    "encode_audio",
    "implemented_families",
    "list_specs",
    "make_tiny",
    "quantize_checkpoint",
    "resolve_request",
    "select_model",
]
