"""LoRA adapters on disk: which ones a ``lora_dir`` holds, confined to it, and reading one into
per-module low-rank factors in our model's module names.

An adapter is a subfolder of ``lora_dir`` holding one ``.safetensors`` file (diffusers'
``save_lora_weights``: ``pytorch_lora_weights.safetensors``; peft's ``save_pretrained``:
``adapter_model.safetensors`` + ``adapter_config.json``) or a ``.safetensors`` file directly in it,
named by the folder or file stem. Only safetensors are read; a name or path that leaves
``lora_dir`` (``..``, absolute, a symlink pointing out) is refused.

Formats: the keys are handed to the family pipeline's own ``lora_state_dict`` (diffusers' LoRA
mixins), whose converters turn kohya/sd-scripts (``lora_unet_…``), ``diffusion_model.…`` and the
other community layouts into diffusers' ``transformer.<module>.lora_A/B.weight`` — we reuse them
rather than keep a copy of every family's key map. The scaling ``alpha / r`` comes from the
adapter's own record: peft's ``adapter_config.json``, diffusers' safetensors metadata
(``lora_adapter_metadata``), or per-module ``alpha`` entries; none means ``alpha = r`` (peft's
loaders do the same).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .config import LoraError

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
# files a diffusers / peft save writes, in the order we look for them in an adapter folder
_WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclasses.dataclass(frozen=True)
class ModuleLora:
    """One module's low-rank update: ``delta(x) = scaling * (x @ a.T) @ b.T``.

    Attributes:
        a: (rank, in_features), ``lora_A``.
        b: (out_features, rank), ``lora_B``.
        scaling: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


@dataclasses.dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from disk, on the CPU, in the model's module names."""

    name: str
    modules: dict[str, ModuleLora]

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


# ---- discovery -----------------------------------------------------------------------------------------


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def list_adapters(lora_dir: str | Path | None) -> dict[str, Path]:
    """The adapters in ``lora_dir`` by name (sorted); entries that are neither an adapter folder
    nor a ``.safetensors`` file, hidden entries and links out of the folder are not adapters."""
    if lora_dir is None:
        return {}
    root = Path(lora_dir)
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not _inside(root, entry):
            continue
        if entry.is_dir():
            name = entry.name
        elif entry.suffix == ".safetensors":
            name = entry.stem
        else:
            continue
        if _NAME_RE.match(name):
            found.setdefault(name, entry)
    return found


def adapter_path(lora_dir: str | Path | None, name: str, field: str = "lora.name",
                 known: dict[str, Path] | None = None) -> Path:
    """The path of adapter ``name`` inside ``lora_dir`` (``known``: its ``list_adapters``, when the
    caller already listed it).

    Raises:
        LoraError: no adapters are served (422), the name is not a plain adapter name (422), or
            ``lora_dir`` has no adapter of that name (404, listing the known ones).
    """
    if lora_dir is None:
        raise LoraError(field, f"adapter {name!r} is not available: no LoRA adapters are served (no lora_dir)")
    if not _NAME_RE.match(name) or ".." in name:
        raise LoraError(field, f"{name!r} is not an adapter name (letters, digits and ._+- only, no paths)")
    known = list_adapters(lora_dir) if known is None else known
    if name not in known:
        listed = ", ".join(known) or "none"
        raise LoraError(field, f"unknown adapter {name!r}; known adapters: {listed}", status=404)
    return known[name]


# ---- reading -------------------------------------------------------------------------------------------


def _weights_file(path: Path, name: str) -> Path:
    if path.is_file():
        return path
    for candidate in _WEIGHT_FILES:
        if (path / candidate).is_file():
            return path / candidate
    tensors = sorted(p for p in path.glob("*.safetensors") if _inside(path, p))
    if len(tensors) == 1:
        return tensors[0]
    unsafe = sorted(p.name for p in path.iterdir() if p.suffix in _UNSAFE_SUFFIXES)
    if not tensors and unsafe:
        raise LoraError("lora.name", f"adapter {name!r} has only {', '.join(unsafe)}: only .safetensors adapters "
                        "are loaded (convert it with safetensors)")
    if not tensors:
        raise LoraError("lora.name", f"adapter {name!r} has no .safetensors file")
    raise LoraError("lora.name", f"adapter {name!r} has several .safetensors files ({', '.join(p.name for p in tensors)}); "
                    "keep one per adapter folder")


def _peft_config(path: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
    """The adapter's LoRA hyper-parameters (r, lora_alpha, patterns), wherever the save put them."""
    config_file = path / "adapter_config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        return json.loads(config_file.read_text())
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        data = json.loads(raw)
        # diffusers prefixes each key with the component ("transformer.r")
        return {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith("transformer.")} or data
    return {}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern``: a key matches a module whose name ends with it."""
    for pattern, value in patterns.items():
        if re.search(rf"(^|\.){pattern}$", module):
            return value
    return default


def _normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's ``base_model.model.`` prefix dropped; bare diffusers module keys (``transformer.save_lora_adapter``)
    get the ``transformer.`` prefix the pipeline loaders expect. Community layouts pass through."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        out[key] = value
    bare = all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in out)
    known_prefix = any(k.startswith(("transformer.", "text_encoder", "unet.")) for k in out)
    if bare and not known_prefix:
        out = {f"transformer.{k}": v for k, v in out.items()}
    return out


def _convert(loader: type, state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Keys in diffusers' layout through the family pipeline's ``lora_state_dict``; network alphas
    when the converter returns them."""
    params = inspect.signature(loader.lora_state_dict).parameters
    try:
        if "return_alphas" in params:
            converted, alphas = loader.lora_state_dict(state, return_alphas=True)
        else:
            converted, alphas = loader.lora_state_dict(state), None
    except Exception as exc:  # noqa: BLE001 - a converter's refusal is the adapter's fault, named as such
        raise LoraError("lora.name", f"adapter {name!r} is not a LoRA this model's loader reads: {exc}") from None
    if isinstance(converted, tuple):  # loaders that return (state, alphas)
        converted, alphas = converted[0], converted[1]
    return converted, alphas or {}


def read_adapter(path: Path, name: str, loader: type) -> AdapterWeights:
    """Read adapter ``name`` at ``path`` (inside ``lora_dir``) into per-module factors.

    Args:
        loader: the family pipeline class (its diffusers LoRA mixin converts community formats).

    Raises:
        LoraError: not safetensors, corrupt, DoRA or LoRA biases (not supported), text-encoder
            keys (the text encoder stays unadapted: say so rather than half-apply), or a
            module with only one of its two factors.
    """
    file = _weights_file(path, name)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError("lora.name", f"adapter {name!r}: {file.name} is not a readable safetensors file ({exc})") from None
    config = _peft_config(path, metadata)
    if config.get("use_dora"):
        raise LoraError("lora.name", f"adapter {name!r} is a DoRA adapter; only plain LoRA is supported")
    converted, alphas = _convert(loader, _normalize_keys(state), name)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        if not key.startswith("transformer."):
            raise LoraError("lora.name", f"adapter {name!r} has text-encoder weights ({key}); text-encoder LoRA is "
                            "not applied by ditserve: use a transformer-only adapter")
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind in ("A.weight", "B.weight"):
            factors.setdefault(module, {})[kind[0]] = tensor
        elif "magnitude" in key:
            raise LoraError("lora.name", f"adapter {name!r} is a DoRA adapter ({key}); only plain LoRA is supported")
        elif key.endswith(".alpha"):
            continue
        else:
            raise LoraError("lora.name", f"adapter {name!r}: key {key} is not a LoRA A/B weight (LoRA biases and "
                            "other extras are not supported)")
    if not factors:
        raise LoraError("lora.name", f"adapter {name!r} holds no LoRA weights")

    alpha_default = config.get("lora_alpha")
    modules = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise LoraError("lora.name", f"adapter {name!r}: module {module} has lora_{set('AB') - set(ab)} missing")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraError("lora.name", f"adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)}, which are not the two factors of one linear")
        r = a.shape[0]  # the factors' own rank (what rank_pattern says, when it is right)
        alpha = alphas.get(f"transformer.{module}.alpha", alphas.get(f"{module}.alpha"))
        alpha = float(alpha) if alpha is not None else _pattern_value(config.get("alpha_pattern") or {}, module,
                                                                       alpha_default if alpha_default is not None else r)
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = ModuleLora(a.contiguous(), b.contiguous(), float(scaling))
    return AdapterWeights(name, modules)
