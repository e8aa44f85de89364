"""Loading components from a diffusers-format folder: ``model_index.json`` plus one subfolder per
component, weights in safetensors only, never from the network.

diffusers' ``DiffusionPipeline.from_pretrained`` loads every component at once; a served model
loads only the components of one stage (the text encoder replica never holds the transformer),
so each component is loaded here with its own class's ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


class CheckpointError(ValueError):
    """A folder that is not a loadable diffusers-format checkpoint; the message says why."""


@dataclass(frozen=True)
class ComponentRef:
    """One entry of model_index.json."""

    name: str
    library: str
    class_name: str


@dataclass(frozen=True)
class CheckpointInfo:
    """What a diffusers folder declares, read from its JSON files only (no weights)."""

    path: Path
    pipeline_class: str
    components: dict[str, ComponentRef]

    def config(self, component: str) -> dict[str, Any]:
        """The component's config.json (or scheduler_config.json) as a dict."""
        folder = self.path / component
        for filename in ("config.json", "scheduler_config.json"):
            if (folder / filename).is_file():
                return json.loads((folder / filename).read_text())
        raise CheckpointError(f"{folder}: no config.json or scheduler_config.json")


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Parse ``model_index.json`` of a diffusers-format folder."""
    root = Path(path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} is not a diffusers-format folder: model_index.json is missing")
    index = json.loads(index_file.read_text())
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        if not name.isidentifier():  # a component is a subfolder named by an identifier, never a path
            raise CheckpointError(f"{index_file}: component name {name!r} is not a plain name")
        components[name] = ComponentRef(name=name, library=value[0], class_name=value[1])
    return CheckpointInfo(path=root, pipeline_class=index.get("_class_name", ""), components=components)


def _check_confined(root: Path, folder: Path) -> None:
    """A component folder, and every file in it, must resolve inside the checkpoint folder: a
    crafted ``model_index.json`` (``"../x"``) or a symlink pointing out would otherwise have us read
    files the operator never meant to serve."""
    top = root.resolve()
    if top.parent.name == "snapshots":  # the Hugging Face cache: snapshot files link to the repo's blobs/
        top = top.parent.parent
    for path in (folder, *folder.iterdir()):
        try:
            path.resolve().relative_to(top)
        except ValueError:
            raise CheckpointError(f"{path.relative_to(root) if path.is_relative_to(root) else path.name}: "
                                  "resolves outside the model folder (a symlink or '..' pointing out); "
                                  "copy the files into it") from None


def _check_safetensors_only(folder: Path) -> None:
    weights = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    if weights and not any(p.suffix == ".safetensors" for p in weights):
        names = ", ".join(sorted(p.name for p in weights))
        raise CheckpointError(
            f"{folder}: only safetensors weights are loaded, found {names}; convert them with "
            "`safetensors.torch.save_file` or re-save with `save_pretrained(..., safe_serialization=True)`"
        )


def _library_module(ref: ComponentRef) -> Any:
    """The module a component's class lives in: ``diffusers`` or ``transformers``, or what
    diffusers' ``save_pretrained`` records instead for some classes — a transformers model module
    (``["glm_image", "GlmImageProcessor"]``: transformers) or a diffusers pipeline package
    (``["stable_audio", "StableAudioProjectionModel"]``)."""
    import importlib
    import importlib.util

    if ref.library in ("diffusers", "transformers"):
        return importlib.import_module(ref.library)
    if ref.library.isidentifier():
        if importlib.util.find_spec(f"transformers.models.{ref.library}") is not None:
            return importlib.import_module("transformers")
        try:
            return importlib.import_module(f"diffusers.pipelines.{ref.library}")
        except ImportError:
            pass
    raise CheckpointError(f"component {ref.name!r}: library {ref.library!r} is not supported")


def _resolve_class(ref: ComponentRef, expected: type) -> type:
    module = _library_module(ref)
    cls = getattr(module, ref.class_name, None)
    if cls is None:
        raise CheckpointError(f"component {ref.name!r}: {ref.library} has no class {ref.class_name!r}")
    if not issubclass(cls, expected):
        raise CheckpointError(
            f"component {ref.name!r}: class {ref.class_name} is not a {expected.__name__} (what this family uses)"
        )
    return cls


def load_component(
    info: CheckpointInfo, name: str, expected: type, *, dtype: torch.dtype, loader: Callable | None = None
) -> Any:
    """Load one component of the checkpoint on CPU with the class named in model_index.json.

    Args:
        info: the parsed checkpoint.
        name: component name, e.g. ``"transformer"``.
        expected: the class the family adapter works with; the declared class must subclass it.
        dtype: dtype of floating point weights (ignored for schedulers and tokenizers).
        loader: ``loader(cls, folder, dtype)`` instead of ``cls.from_pretrained`` (torch modules,
            processors).
    """
    if name not in info.components:
        raise CheckpointError(f"{info.path}: model_index.json declares no component {name!r}")
    ref = info.components[name]
    cls = _resolve_class(ref, expected)
    folder = info.path / name
    if not folder.is_dir():
        raise CheckpointError(f"{info.path}: component folder {name}/ is missing")
    _check_confined(info.path, folder)
    _check_safetensors_only(folder)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        if loader is not None:
            module = loader(cls, folder, dtype)
        elif ref.library == "diffusers":
            module = cls.from_pretrained(
                info.path, subfolder=name, dtype=dtype, use_safetensors=True, local_files_only=True
            )
        else:
            module = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
        return module.eval().requires_grad_(False)
    if loader is not None:  # e.g. a processor built without the classes an absent library provides
        return loader(cls, folder, dtype)
    if ref.library == "diffusers":  # schedulers: config only
        return cls.from_pretrained(info.path, subfolder=name, local_files_only=True)
    return cls.from_pretrained(folder, local_files_only=True)  # tokenizers
