"""Model registry and family adapters (no Ray, nothing distributed).

Public surface: the registry (``ModelSpec``, ``registry``, ``get_spec``), model resolution
(``resolve_model``, ``adapter_class``, ``capabilities``), the adapter contract (``FamilyAdapter``
and the data it declares: ``contract.py``; ``SamplingParams``, ``TextConditioning``,
``DenoiseState``, ``StepOutput``) and the request context.
"""

if __name__ != "ditserve.models":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.models, not {__name__}: the layers are subpackages of ditserve only")

from .adapter import (
    ALL_STAGES,
    PRIOR_STAGE,
    STAGES,
    CFGStrategy,
    DenoiseState,
    FamilyAdapter,
    ImageConditioning,
    SamplingParams,
    TextConditioning,
    serial_cfg,
)
from .contract import (
    Audio,
    CacheBlocks,
    Capabilities,
    CFGEvaluation,
    Conditioning,
    LatentLayout,
    Output,
    StepCallback,
    StepOutput,
)
from .builtin import DEFAULT_MODEL
from .context import (
    RequestContext,
    active_request,
    current_request,
    current_step,
    request_context,
    request_state,
    step_context,
)
from .families import ResolvedModel, adapter_class, capabilities, implemented_families, resolve_model, resolve_spec
from .loading import CheckpointError
from .registry import (
    FamilyNotImplementedError,
    Feature,
    Guidance,
    Modality,
    ModelNotFoundError,
    ModelSpec,
    get_spec,
    list_specs,
    registry,
)

__all__ = [
    "DEFAULT_MODEL",
    "STAGES",
    "ALL_STAGES",
    "PRIOR_STAGE",
    "Audio",
    "CFGEvaluation",
    "CFGStrategy",
    "CacheBlocks",
    "Capabilities",
    "Conditioning",
    "LatentLayout",
    "Output",
    "StepCallback",
    "StepOutput",
    "capabilities",
    "CheckpointError",
    "DenoiseState",
    "FamilyAdapter",
    "FamilyNotImplementedError",
    "Feature",
    "Guidance",
    "Modality",
    "ModelNotFoundError",
    "ModelSpec",
    "RequestContext",
    "ResolvedModel",
    "SamplingParams",
    "TextConditioning",
    "ImageConditioning",
    "adapter_class",
    "current_request",
    "current_step",
    "get_spec",
    "implemented_families",
    "list_specs",
    "request_context",
    "request_state",
    "active_request",
    "resolve_model",
    "resolve_spec",
    "serial_cfg",
    "registry",
    "step_context",
]
