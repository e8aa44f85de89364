"""Serving: request schema, the Ray-free engine (composer + in-process runner) and, on top of it,
the Ray Serve deployments."""

if __name__ != "ditserve.deployments":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.deployments, not {__name__}: the layers are subpackages of ditserve only")

from .engine import Engine, EngineConfig, GenerationResult
from .local import ParallelEngine
from .schema import GenerationRequest, LoraRequest, RequestError, ResolvedRequest, resolve_request, select_model

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationRequest",
    "GenerationResult",
    "LoraRequest",
    "ParallelEngine",
    "RequestError",
    "ResolvedRequest",
    "resolve_request",
    "select_model",
]
