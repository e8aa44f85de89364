"""FP8 quantization of the DiT's linear layers: the option, the storage format, the kernels, the
load-time conversion and the pre-quantized checkpoint format.

**Storage** (every device): a quantized linear keeps its module class and path; its ``weight``
parameter becomes ``float8_e4m3fn`` (out, in) and a ``weight_scale`` buffer holds one float32 scale
per output channel (``weight ≈ weight_fp8 * weight_scale[:, None]``); the bias stays in the compute
dtype. Both are a parameter / buffer of the module, so moving a block (CPU offload) moves them.

**Kernels**, chosen once from the device the DiT runs on (``select_kernel``) and logged at start-up:

- ``w8a8`` (CUDA, compute capability 8.9+, bfloat16, probed once): dynamic per-token activation
  scales × the per-channel weight scales through ``torch._scaled_mm`` (row-wise scaling), so the
  matmul itself runs in FP8. Layers whose local in/out features are not multiples of 16 (what the
  FP8 tensor cores need) fall back to weight-only.
- ``weight_only`` (older GPUs, other dtypes, CPU): the FP8 weight is upcast at the matmul and the
  product scaled per output channel. The CPU tests therefore run the same storage and scales as
  the GPU path; only the activation side differs.

The matmul is a diffusers ``ModelHook`` named ``ditserve_fp8`` registered on each quantized linear
at load, before the feature table attaches anything, so hooks registered later (LoRA's
``ditserve_lora``) wrap it and add their delta on top of its output.

**Tensor parallel**: the loader quantizes each rank's shards only. A column-sharded linear's scales
are the rows' own and shard with them; a row-sharded linear's scale is the whole output row's (the
ranks agree through a max-reduce of their partial amax at load), so any TP degree stores the same
FP8 values as one rank and the rank's partial products are summed (the all-reduce) as before.

**Pre-quantized checkpoints** (``write_quantized_checkpoint``, ``ditserve quantize``): the
transformer's safetensors hold the FP8 weights and their ``weight_scale`` tensors, and its
``config.json`` carries ``_ditserve_quantization`` (method, ignored layers); such a folder loads
straight into the FP8 layout, never upcast.

Why ours: torchao's ``Float8DynamicActivationFloat8WeightConfig`` does the sm89+ half, but torchao is
not a dependency of this project, its weights are tensor subclasses (``Float8Tensor``) that our
tensor-parallel shards, offload moves and safetensors files would each have to understand, and it
has no CPU path to test against; diffusers' quantizers (bitsandbytes, torchao, GGUF, quanto) load
through ``from_pretrained`` and do not compose with our shard-first loader.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

HOOK_NAME = "ditserve_fp8"
MARKER = "_ditserve_quantization"  # key of the transformer's config.json in a pre-quantized checkpoint
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE = "weight_scale"

#: the quantization methods that exist (name -> what it does); anything else is refused at start-up
METHODS = {"fp8": "float8_e4m3fn weights with per-channel scales (W8A8 on sm89+, weight-only elsewhere)"}


class QuantizationConfig(BaseModel):
    """How the DiT's linear layers are stored and multiplied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quantization: str | None = Field(
        None, description="Quantize the DiT's linear layers: 'fp8' (W8A8 on CUDA sm89+, FP8 weight-only "
        "elsewhere, CPU included); none: as loaded (a pre-quantized checkpoint is always FP8).",
    )
    ignored_layers: tuple[str, ...] | None = Field(
        None, description="fnmatch patterns of DiT module names kept in high precision, as a JSON list, e.g. "
        "'[\"proj_out\", \"*.norm1.linear\"]'; default: the family's (embedders, modulation, output projection).",
    )

    @field_validator("quantization")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in METHODS:
            works = "; ".join(f"{k}: {v}" for k, v in METHODS.items())
            raise ValueError(f"quantization={value!r} is not available; methods that exist: {works} "
                             "(or none)")
        return value

    @property
    def enabled(self) -> bool:
        return self.quantization is not None


def checkpoint_marker(transformer_config: dict[str, Any]) -> dict[str, Any] | None:
    """The pre-quantization marker of a transformer's config.json (``None``: not pre-quantized)."""
    return transformer_config.get(MARKER)


def resolve_ignored(cfg: QuantizationConfig, family_default: Sequence[str]) -> tuple[str, ...]:
    """The patterns in force: the option's, else the family's defaults."""
    return tuple(family_default) if cfg.ignored_layers is None else tuple(cfg.ignored_layers)


def check_quantization(cfg: QuantizationConfig, *, model: str, supported: bool,
                       transformer_config: dict[str, Any], family_default: Sequence[str]) -> None:
    """Start-up check (nothing loaded).

    Raises:
        ValueError: FP8 on a model whose family does not declare it, or ``ignored_layers`` that
            differ from what a pre-quantized checkpoint was written with.
    """
    marker = checkpoint_marker(transformer_config)
    if (cfg.enabled or marker) and not supported:
        raise ValueError(f"quantization={cfg.quantization or marker.get('method')!r}: model {model} does not "
                         "support FP8 (its family does not declare it); use quantization=none")
    if marker and cfg.ignored_layers is not None and tuple(cfg.ignored_layers) != tuple(marker["ignored_layers"]):
        raise ValueError(f"ignored_layers={list(cfg.ignored_layers)}: model {model} is stored pre-quantized with "
                         f"ignored_layers={marker['ignored_layers']}; leave ignored_layers unset, or quantize "
                         "the unquantized checkpoint at load")


# ---- which layers -----------------------------------------------------------------------------------


def is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear and the tensor-parallel shards (anything with a 2-D weight and in/out features)."""
    weight = getattr(module, "weight", None)
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def target_names(model: torch.nn.Module, ignored: Iterable[str]) -> list[str]:
    """Names of the linears to quantize: every linear whose name matches no ignored pattern."""
    ignored = tuple(ignored)
    return [name for name, m in model.named_modules()
            if is_linear(m) and not any(fnmatch.fnmatchcase(name, p) for p in ignored)]


def quantized_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if getattr(m, SCALE, None) is not None and is_linear(m)]


# ---- storage ----------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (FP8 weight, float32 per-output-channel scale).

    Args:
        amax_reduce: max over the ranks holding other column slices of the same rows (row-sharded
            tensor parallel), so every rank uses the whole row's scale.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if amax_reduce is not None:
        amax = amax_reduce(amax)
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a quantized linear multiplies by (tests, the checkpoint writer's checks)."""
    return (module.weight.float() * getattr(module, SCALE).float()[:, None]).to(dtype)


def _store(module: torch.nn.Module, q: torch.Tensor, scale: torch.Tensor) -> None:
    module.weight = torch.nn.Parameter(q, requires_grad=False)
    module.register_buffer(SCALE, scale)


def prepare_prequantized(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Turn ``names`` (on a meta-built model, after any sharding) into FP8 placeholders so that a
    pre-quantized state dict loads into them as is (``load_state_dict(assign=True)``)."""
    for name in names:
        module = model.get_submodule(name)
        out_f, in_f = module.weight.shape
        _store(module, torch.empty(out_f, in_f, dtype=FP8, device="meta"),
               torch.empty(out_f, dtype=torch.float32, device="meta"))


# ---- kernels ----------------------------------------------------------------------------------------


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ dequant(weight).T: the FP8 values upcast exactly (e4m3 fits bf16/fp16/fp32),
    the per-channel scale applied to the product (the same as scaling the weight rows)."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) quantized per token (dynamic amax scale) to FP8, multiplied with the FP8 weight on
    the tensor cores with row-wise scales (``torch._scaled_mm``, bfloat16 out)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1).float(),
                           out_dtype=x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class Kernel:
    """The kernel chosen for a device, and why (the start-up report)."""

    name: str  # "w8a8" or "weight_only"
    reason: str

    def for_layer(self, in_features: int, out_features: int, dtype: torch.dtype) -> Callable:
        if self.name == "w8a8" and in_features % 16 == 0 and out_features % 16 == 0 and dtype == torch.bfloat16:
            return w8a8_matmul
        return weight_only_matmul


def _probe_scaled_mm(device: torch.device) -> str | None:
    """Run one small row-wise scaled FP8 matmul; ``None`` if it works and matches, else why not."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(32, 64, generator=gen).to(device, torch.bfloat16)
        w = torch.randn(48, 64, generator=gen)
        q, s = quantize_weight(w)
        q, s = q.to(device), s.to(device)
        got = w8a8_matmul(x, q, s).float()
        ref = weight_only_matmul(x.float(), q, s)
        err = float((got - ref).abs().max() / ref.abs().max())
        return None if err < 0.1 else f"torch._scaled_mm probe differs from the reference by {err:.3f}"
    except Exception as exc:  # noqa: BLE001 - any failure means: not on this device/build
        return f"torch._scaled_mm row-wise is not available here ({type(exc).__name__}: {exc})"


def select_kernel(device: torch.device | str, dtype: torch.dtype) -> Kernel:
    """``w8a8`` on CUDA compute capability 8.9+ with bfloat16 (probed once), else ``weight_only``."""
    device = torch.device(device)
    if device.type != "cuda":
        return Kernel("weight_only", f"device {device.type}: FP8 weights upcast at the matmul")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return Kernel("weight_only", f"sm{major}{minor} has no FP8 tensor cores (W8A8 needs sm89+)")
    if dtype != torch.bfloat16:
        return Kernel("weight_only", f"dtype {dtype}: the W8A8 kernel writes bfloat16")
    why_not = _probe_scaled_mm(device)
    if why_not:
        return Kernel("weight_only", why_not)
    return Kernel("w8a8", f"sm{major}{minor}: per-token activation × per-channel weight scales, torch._scaled_mm")


class RowShards(Protocol):
    """A linear whose input features are split over ranks (tensor parallel's row-wise linears), as
    the caller sees its group (``features/`` does not import ``parallel/``)."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks (the partial products)."""
        ...

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the ranks (the rows' amax at load)."""
        ...


class _Fp8Hook(ModelHook):
    """The quantized linear's forward: kernel, then the row-parallel sum, then the bias."""

    def __init__(self, matmul: Callable, kernel: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        super().__init__()
        self.matmul, self.kernel, self.reduce = matmul, kernel, reduce

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.matmul(x, module.weight, getattr(module, SCALE))
        if self.reduce is not None:
            out = self.reduce(out)
        return out + module.bias if module.bias is not None else out


def _register(module: torch.nn.Module, kernel: Kernel, dtype: torch.dtype, shards: RowShards | None) -> None:
    out_f, in_f = module.weight.shape
    matmul = kernel.for_layer(in_f, out_f, dtype)
    name = "w8a8" if matmul is w8a8_matmul else "weight_only"
    HookRegistry.check_if_exists_or_initialize(module).register_hook(
        _Fp8Hook(matmul, name, shards.sum if shards is not None else None), HOOK_NAME)


def layer_kernel(module: torch.nn.Module) -> str | None:
    """The kernel a quantized linear runs (``None``: not quantized)."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.kernel if hook is not None else None


# ---- load -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Plan:
    """What the loader does to the DiT: quantize (or load pre-quantized) the linears not ignored.

    Attributes:
        ignored: the ignored-layer patterns in force.
        kernel: the kernel for the device the DiT runs on.
        dtype: the compute dtype.
        shards_of: the row-parallel group of a module (``None``: not row-sharded).
    """

    ignored: tuple[str, ...]
    kernel: Kernel
    dtype: torch.dtype
    shards_of: Callable[[torch.nn.Module], RowShards | None] = lambda module: None


def quantize_model(model: torch.nn.Module, plan: Fp8Plan) -> list[str]:
    """Quantize the linears of ``model`` (already this rank's shards) in place, on the device they
    are on, and register their kernels; returns the quantized names."""
    names = target_names(model, plan.ignored)
    for name in names:
        module = model.get_submodule(name)
        shards = plan.shards_of(module)
        q, scale = quantize_weight(module.weight, shards.max if shards is not None else None)
        _store(module, q, scale)
    return attach_kernels(model, plan, names)


def attach_kernels(model: torch.nn.Module, plan: Fp8Plan, names: Sequence[str] | None = None) -> list[str]:
    """Register the FP8 matmul hook on every stored-FP8 linear (pre-quantized: after loading)."""
    names = quantized_names(model) if names is None else names
    for name in names:
        module = model.get_submodule(name)
        _register(module, plan.kernel, plan.dtype, plan.shards_of(module))
    _check_dtype(model, plan)
    return list(names)


def _check_dtype(model: torch.nn.Module, plan: Fp8Plan) -> None:
    # diffusers' ModelMixin.dtype is the first floating parameter's, and adapters cast inputs to it
    first = next((n for n, p in model.named_parameters() if p.is_floating_point()), None)
    if first is not None and model.get_parameter(first).dtype == FP8:
        raise ValueError(f"ignored_layers={list(plan.ignored)}: the DiT's first parameter {first} would be FP8, "
                         f"and the model's dtype is read from it; add {first.rpartition('.')[0]!r} to ignored_layers")


def load_prequantized(cls: type, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Build ``cls`` from a pre-quantized component folder: FP8 weights and their scales loaded as
    stored, everything else in ``dtype`` (no kernels yet: ``attach_kernels``)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    config = cls.load_config(folder)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                state[key] = keep_or_cast(key, f.get_tensor(key), dtype)
    prepare_prequantized(model, stored_fp8_names(folder))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def stored_fp8_names(folder: str | Path) -> list[str]:
    """The linears a pre-quantized component folder stores in FP8 (those with a stored scale)."""
    from safetensors import safe_open

    names = []
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names += [k[: -len(SCALE) - 1] for k in f.keys() if k.endswith("." + SCALE)]
    return names


def keep_or_cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor in the load dtype, except FP8 weights and their float32 scales (never upcast)."""
    if not tensor.is_floating_point() or tensor.dtype == FP8 or key.endswith("." + SCALE):
        return tensor
    return tensor.to(dtype)


def bytes_of(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the modules' own parameters and buffers (not their children's)."""
    total = 0
    for m in modules:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            total += t.numel() * t.element_size()
    return total


def report(model: torch.nn.Module, kernel: Kernel, ignored: Sequence[str], *, prequantized: bool) -> dict[str, Any]:
    """What was quantized and how (logged once at start-up)."""
    names = quantized_names(model)
    kernels = sorted({layer_kernel(model.get_submodule(n)) or "-" for n in names})
    info = {
        "method": "fp8", "kernel": kernel.name, "reason": kernel.reason, "layer_kernels": kernels,
        "quantized_layers": len(names), "ignored_layers": list(ignored), "prequantized": prequantized,
        "quantized_bytes": bytes_of(model.get_submodule(n) for n in names),
        "dit_bytes": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())),
    }
    logger.info("fp8: %s", json.dumps(info))
    return info


# ---- pre-quantized checkpoints --------------------------------------------------------------------------


def write_quantized_checkpoint(src: str | Path, out: str | Path, *, family_default: Sequence[str],
                               cfg: QuantizationConfig, transformer_cls: type,
                               denoisers: Sequence[str] = ("transformer",)) -> Path:
    """Copy the diffusers folder ``src`` to ``out`` with its denoisers stored in FP8: float8_e4m3fn
    weights + float32 ``weight_scale`` tensors in safetensors, and the marker in config.json.

    Quantized on the CPU in float32 from the stored weights, with the same ``quantize_weight`` as
    quantize-at-load, so both give the same FP8 values.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder exists and is not empty")
    ignored = resolve_ignored(cfg, family_default)
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*[f"{d}" for d in denoisers]))
    for name in denoisers:
        model = transformer_cls.from_pretrained(src, subfolder=name, dtype=torch.float32, use_safetensors=True,
                                                local_files_only=True).eval()
        names = target_names(model, ignored)
        for layer in names:
            module = model.get_submodule(layer)
            _store(module, *quantize_weight(module.weight))
        folder = out / name
        folder.mkdir(parents=True)
        config = json.loads((src / name / "config.json").read_text())
        config[MARKER] = {"method": "fp8", "format": "float8_e4m3fn, per-output-channel float32 weight_scale",
                          "ignored_layers": list(ignored)}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        stored: dict[str, torch.dtype] = {}  # the other tensors keep the dtype they were stored in
        for file in sorted((src / name).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        state = {k: _stored_dtype(v, stored.get(k)).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_dtype(tensor: torch.Tensor, stored: str | None) -> torch.Tensor:
    if tensor.dtype == FP8 or stored not in _SAFETENSORS_DTYPES or not tensor.is_floating_point():
        return tensor
    return tensor.to(_SAFETENSORS_DTYPES[stored])
