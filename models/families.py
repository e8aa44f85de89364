"""Family adapters by key, and resolution of a ``--model`` argument (registered id or folder) to
a spec and a local diffusers folder.

No network: a registered hub id is looked up in ``$DITSERVE_MODELS_DIR/<id>`` and in the local
Hugging Face cache only; built-in models are built by the project on first use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from .contract import Capabilities
from .loading import CheckpointError, read_checkpoint
from .registry import FamilyNotImplementedError, ModelNotFoundError, ModelSpec, get_spec, list_specs

logger = logging.getLogger(__name__)

# family key -> "module:Class"; imported on demand so listing models stays cheap.
_ADAPTERS = {
    "qwen-image": "ditserve.models.qwen_image:QwenImageAdapter",
    "flux": "ditserve.models.flux:FluxAdapter",
    "sd3": "ditserve.models.sd3:SD3Adapter",
    "z-image": "ditserve.models.z_image:ZImageAdapter",
    "flux2-klein": "ditserve.models.flux2_klein:Flux2KleinAdapter",
    "ovis-image": "ditserve.models.ovis_image:OvisImageAdapter",
    "longcat-image": "ditserve.models.longcat_image:LongCatImageAdapter",
    "glm-image": "ditserve.models.glm_image:GlmImageAdapter",
    "wan2.2": "ditserve.models.wan:WanAdapter",
    "wan2.2-i2v": "ditserve.models.wan:WanI2VAdapter",
    "stable-audio": "ditserve.models.stable_audio:StableAudioAdapter",
    "qwen-image-edit": "ditserve.models.qwen_image_edit:QwenImageEditAdapter",
    "qwen-image-edit-plus": "ditserve.models.qwen_image_edit:QwenImageEditPlusAdapter",
    "qwen-image-layered": "ditserve.models.qwen_image_edit:QwenImageLayeredAdapter",
    "longcat-image-edit": "ditserve.models.longcat_image_edit:LongCatImageEditAdapter",
}

SPEC_OVERRIDES_FILE = "ditserve.json"  # optional: ModelSpec fields a checkpoint folder overrides


def implemented_families() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(family: str) -> type:
    """The adapter class of ``family``; a registered family without one raises clearly."""
    target = _ADAPTERS.get(family)
    if target is None:
        known = sorted({s.family for s in list_specs()})
        if family in known:
            raise FamilyNotImplementedError(
                f"model family {family!r} is registered but not implemented yet; "
                f"implemented families: {', '.join(implemented_families())}"
            )
        raise FamilyNotImplementedError(f"unknown model family {family!r}; known families: {', '.join(known)}")
    module_name, cls_name = target.split(":")
    import importlib

    return getattr(importlib.import_module(module_name), cls_name)


def home_dir() -> Path:
    """Where ditserve keeps built models: ``$DITSERVE_HOME`` or ``~/.cache/ditserve``."""
    return Path(os.environ.get("DITSERVE_HOME") or Path.home() / ".cache" / "ditserve")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: its spec (with folder overrides applied) and its folder."""

    spec: ModelSpec
    path: Path


def _family_of_folder(path: Path) -> ModelSpec:
    """The registered model a folder is a checkpoint of: its pipeline class's entry, the one whose
    checkpoint facts (``checkpoint_spec_fields``: e.g. Wan2.2's expert boundary, its size multiple)
    agree when several share the class."""
    info = read_checkpoint(path)
    candidates = [s for s in list_specs() if s.components.pipeline == info.pipeline_class and not s.builtin]
    for spec in candidates:
        facts = adapter_class(spec.family).checkpoint_spec_fields(info) if spec.family in _ADAPTERS else {}
        if all(getattr(spec, k) == v for k, v in facts.items()):
            return spec
    if candidates:
        return candidates[0]
    raise CheckpointError(
        f"{path}: pipeline class {info.pipeline_class!r} belongs to no registered model family "
        f"(implemented: {', '.join(implemented_families())})"
    )


def _apply_overrides(spec: ModelSpec, path: Path, model_id: str) -> ModelSpec:
    update: dict = {"id": model_id}
    override_file = path / SPEC_OVERRIDES_FILE
    if override_file.is_file():
        update.update(json.loads(override_file.read_text()))
        if "features" in update:  # a checkpoint narrows what its family runs; it cannot add to it
            update["feature_limit"] = update.pop("features")
    # Sizes (and other facts of the checkpoint) must follow the checkpoint, whatever its family's
    # flagship uses.
    adapter = adapter_class(spec.family)
    for key, value in adapter.checkpoint_spec_fields(read_checkpoint(path)).items():  # e.g. an audio model's sample rate
        update.setdefault(key, value)
    return ModelSpec.model_validate({**spec.model_dump(), **update})


def _builtin_path(spec: ModelSpec) -> Path:
    from .builtin import SHIPPED

    if spec.id in SHIPPED:
        return Path(__file__).resolve().parent / SHIPPED[spec.id]
    from .tiny import ensure_builtin

    return ensure_builtin(spec.id, home_dir() / "models" / spec.id)


def _local_copy(model_id: str) -> Path | None:
    root = os.environ.get("DITSERVE_MODELS_DIR")
    if root and (Path(root) / model_id / "model_index.json").is_file():
        try:  # confined to the root, symlinks resolved
            (Path(root) / model_id).resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise ModelNotFoundError(f"model {model_id!r}: $DITSERVE_MODELS_DIR/{model_id} resolves outside "
                                     "$DITSERVE_MODELS_DIR (a symlink pointing out); copy the folder in") from None
        return Path(root) / model_id
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not in the local cache (no network is ever tried)
        return None


def resolve_spec(model: str | os.PathLike) -> ModelSpec:
    """The spec ``model`` will be served with, without building or loading anything (for
    processes that validate requests but hold no model, like the router)."""
    path = Path(model)
    if path.is_dir():
        return resolve_model(path).spec
    spec = get_spec(str(model))
    if spec.builtin:
        from .builtin import SHIPPED

        adapter_class(spec.family)
        # a shipped checkpoint's folder is at hand (its ditserve.json counts); tiny ones are built on use
        return resolve_model(spec.id).spec if spec.id in SHIPPED else spec
    return resolve_model(spec.id).spec


def resolve_model(model: str | os.PathLike) -> ResolvedModel:
    """Resolve a registered model id or a diffusers-format folder.

    Raises:
        ModelNotFoundError: neither a registered id nor a folder.
        FamilyNotImplementedError: registered, but its family has no adapter yet.
        CheckpointError: a folder that is not a loadable checkpoint.
    """
    path = Path(model)
    if path.is_dir():
        spec = _family_of_folder(path)
        adapter_class(spec.family)
        return ResolvedModel(_apply_overrides(spec, path, str(path)), path)
    spec = get_spec(str(model))
    adapter_class(spec.family)  # fail early and clearly for unimplemented families
    if spec.builtin:
        path = _builtin_path(spec)
        return ResolvedModel(_apply_overrides(spec, path, spec.id), path)
    local = _local_copy(spec.id)
    if local is None:
        raise ModelNotFoundError(
            f"model {spec.id!r} is registered but no local copy was found (nothing is downloaded at run "
            f"time): put its diffusers folder at $DITSERVE_MODELS_DIR/{spec.id} or pass --model <folder>"
        )
    return ResolvedModel(_apply_overrides(spec, local, spec.id), local)


def capabilities(resolved: ResolvedModel) -> Capabilities:
    """What ``resolved``'s adapter declares and its denoiser's config says, without loading weights
    (start-up checks read this; see ``contract.Capabilities``)."""
    cls = adapter_class(resolved.spec.family)
    info = read_checkpoint(resolved.path)
    name = cls.denoisers[0]
    ref = info.components.get(name)
    config = info.config(name) if ref is not None else {}
    denoiser = cls.denoiser_class()
    heads = config.get("num_attention_heads", config.get("n_heads"))  # n_heads: Z-Image's name
    return Capabilities(
        family=cls.family,
        adapter=cls,
        supported_features=resolved.spec.features,  # the adapter's verified ones, narrowed by the checkpoint
        guidance=cls.guidance,
        cfg_evaluation=cls.cfg_evaluation,
        denoisers=cls.denoisers,
        latent_layout=cls.latent_layout,
        output=cls.output,
        conditioning=cls.conditioning,
        transformer_class=ref.class_name if ref is not None else denoiser.__name__,
        transformer_config=dict(config),
        num_heads=int(heads) if heads is not None else None,
        num_blocks=cls.cache_blocks.count(config) if cls.cache_blocks is not None and config else None,
        has_cp_plan=bool(cls.sequence_plan()),
        has_tp_plan=bool(cls.tensor_plan()),
    )
