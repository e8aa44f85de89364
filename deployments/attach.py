"""The feature table: every feature that attaches to a loaded adapter, in one place, in one order,
with its start-up check, how it is applied and removed, and what it conflicts with.

``check_support(config, stages)`` gives every start-up refusal (an option the model or the
combination cannot run fails here, naming the option and what would work), from what the
model declares as data (``models.capabilities``) — nothing is loaded. ``attach(adapter, config,
groups)`` applies the enabled entries of a stage in table order; ``detach`` removes them in
reverse. It lives in ``deployments/`` because it joins ``parallel/`` and ``features/``, which do
not import each other.

Tensor parallelism and FP8 act while loading (``loading.denoiser_loader``): each rank reads only its shards
and quantizes only them, and the FP8 matmul hooks go on before any entry here attaches, so hooks
registered later (LoRA) wrap them. Their entries only check.

Order matters where hooks wrap hooks: a hook registered later wraps the earlier ones, so the
layerwise offload's block hooks go on first (inside the cache's: a block the cache skips is never
onloaded), then the cache hooks, then sequence parallelism, whose split of block 0's inputs then
runs first and the cache sees this rank's shard. A feature may also give a ``scope``, entered
around each call of its stage (``stage_scope``): model-level offload onloads there.
Tensor parallelism is cut while loading (each rank reads
only its shards), so its entry only checks; the adapter is loaded with its loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ditserve.features import quantization as fp8
from ditserve.features.cache import apply_cache, check_blocks, may_skip, remove_cache
from ditserve.features.lora import LoraStore
from ditserve.features.offload import (
    apply_layerwise_offload,
    apply_model_offload,
    device_lease,
    offload_session,
    remove_layerwise_offload,
    remove_model_offload,
)
from ditserve.models import Capabilities, Feature, ResolvedModel, capabilities
from ditserve.models.loading import read_checkpoint
from ditserve.parallel import ParallelGroups, check_parallel
from ditserve.parallel.cfg import CFGParallel
from ditserve.parallel.sequence import apply_sequence_parallel, remove_sequence_parallel
from ditserve.parallel.tensor import TensorParallelLora
from ditserve.parallel.vae import apply_vae_parallel, check_vae_config, remove_vae_parallel

if TYPE_CHECKING:
    from .engine import EngineConfig


@dataclasses.dataclass(frozen=True)
class FeatureEntry:
    """One row of the table.

    Attributes:
        name: the feature (a ``Feature`` value where the registry has one).
        stage: the stage whose adapter it attaches to (``denoise`` or ``decode``).
        order: application order within the stage (lower first).
        enabled: whether a config turns it on.
        check: start-up check against the model's capabilities; raises ``ValueError`` naming
            the option.
        apply: attaches it to a loaded adapter (``None``: nothing to attach after loading).
        remove: detaches it.
        conflicts: features it cannot be combined with (checked at start-up).
        attached: whether ``attach`` applies it (default: ``enabled``); the cache's hooks go on
            every model that has cache support, idle until a request asks for a cache.
        scope: ``scope(adapter, config)``: a context entered around each call of the stage while
            the feature is attached (``stage_scope``).
    """

    name: str
    stage: str
    order: int
    enabled: Callable[[EngineConfig], bool]
    check: Callable[[Support, EngineConfig], None]
    apply: Callable[[Any, EngineConfig, Any], None] | None = None
    remove: Callable[[Any], None] | None = None
    conflicts: tuple[str, ...] = ()
    attached: Callable[[EngineConfig, Support], bool] | None = None
    scope: Callable[[Any, EngineConfig], contextlib.AbstractContextManager] | None = None


@dataclasses.dataclass(frozen=True)
class Support:
    """What the start-up checks read about one model: its adapter's declared capabilities
    (``models.capabilities``, no weights loaded) and its registry entry's VAE facts.

    Attributes:
        model: the model id (for messages).
        caps: the adapter's capabilities (features, guidance, denoisers, transformer config, plans).
        vae_class: the VAE class name.
        vae_scale: spatial down-sampling of the VAE (output pixels per latent row).
        default_size: the model's default (width, height).
    """

    model: str
    caps: Capabilities
    vae_class: str | None
    vae_scale: int
    default_size: tuple[int, int]

    @property
    def features(self) -> frozenset[Feature]:
        return self.caps.supported_features

    @property
    def num_blocks(self) -> int | None:
        return self.caps.num_blocks


def model_support(resolved: ResolvedModel) -> Support:
    spec = resolved.spec
    caps = capabilities(resolved)
    info = read_checkpoint(resolved.path)
    # what the VAE decodes for a default request: the default image, or the adapter's own extent (audio)
    extent = caps.adapter.decoded_extent_from_config(info) or (spec.default_width, spec.default_height)
    return Support(spec.id, caps, spec.components.vae, caps.adapter.vae_scale_from_config(info), extent)


# ---- checks ----------------------------------------------------------------------------------------


def _check_parallel(caps: Support, config: EngineConfig) -> None:
    check_parallel(
        config.parallel, caps.caps.transformer_config, model=caps.model,
        cfg_ok=Feature.CFG_PARALLEL in caps.features,
        sp_ok=Feature.SEQUENCE_PARALLEL in caps.features and caps.caps.has_cp_plan,
        tp_ok=Feature.TENSOR_PARALLEL in caps.features and caps.caps.has_tp_plan,
    )


def _check_cache(caps: Support, config: EngineConfig) -> None:
    default = config.cache()
    feature = Feature(default.backend)
    if feature not in caps.features or caps.num_blocks is None:
        works = [f.value for f in (Feature.TEA_CACHE, Feature.CACHE_DIT) if f in caps.features] or "none"
        raise ValueError(f"cache_backend={default.backend}: model {caps.model} does not support it "
                         f"(supported caches: {works})")
    check_blocks(default, caps.num_blocks)


def _check_lora(caps: Support, config: EngineConfig) -> None:
    from pathlib import Path

    if Feature.LORA not in caps.features:
        raise ValueError(f"lora_dir={config.lora.lora_dir}: model {caps.model} does not support LoRA")
    if not Path(config.lora.lora_dir).is_dir():
        raise ValueError(f"lora_dir={config.lora.lora_dir} is not a folder (adapters are its subfolders and "
                         ".safetensors files)")


def _check_vae(caps: Support, config: EngineConfig) -> None:
    check_vae_config(config.vae, caps.vae_class or "?", model=caps.model, vae_scale=caps.vae_scale,
                     default_size=caps.default_size)


def _check_offload(caps: Support, config: EngineConfig) -> None:
    o = config.offload
    if o.enable_layerwise_offload and (Feature.LAYERWISE_OFFLOAD not in caps.features or caps.num_blocks is None):
        raise ValueError(f"enable_layerwise_offload=True: model {caps.model} does not support layerwise offload "
                         "(use enable_cpu_offload=True, model-level offload, which every model supports)")
    if not o.enable_layerwise_offload:
        return  # its options: _check_idle_options
    if o.offload_disk_dir is not None and o.offload_device != "disk":
        raise ValueError(f"offload_disk_dir={o.offload_disk_dir!r} needs offload_device='disk' "
                         f"(offload_device={o.offload_device!r})")
    if o.offload_shard_host_copy and config.parallel.sp_degree < 2:
        raise ValueError("offload_shard_host_copy=True shards the host copy over the sequence-parallel group, "
                         f"but {config.parallel.describe()} has none: set ulysses_degree or ring_degree > 1, or "
                         "offload_shard_host_copy=False")


def _changed_options(options: Any, keep: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The fields of a pydantic config that differ from its defaults (``keep``: fields not asked
    about), in field order."""
    defaults = type(options)()
    names = [n for n in type(options).model_fields if n not in keep]
    return [(n, getattr(options, n)) for n in names if getattr(options, n) != getattr(defaults, n)]


def _check_idle_options(config: EngineConfig) -> None:
    """Options of a feature that is off would be accepted and ignored: refused instead, naming the
    option and the switch that turns its feature on."""
    switches = ("enable_cpu_offload", "enable_layerwise_offload")
    if not config.offload.enable_layerwise_offload and (changed := _changed_options(config.offload, keep=switches)):
        name, value = changed[0]
        raise ValueError(f"{name}={value!r} applies to layerwise offload only: set "
                         "enable_layerwise_offload=True, or leave it at its default")
    if config.lora.lora_dir is None and (changed := _changed_options(config.lora)):
        # max_loras_per_request last: its default follows a smaller max_loras_per_replica
        name, value = sorted(changed, key=lambda item: item[0] == "max_loras_per_request")[0]
        raise ValueError(f"{name}={value!r} applies to LoRA only: set lora_dir (the adapters' folder), "
                         "or leave it at its default")


def _check_quant(caps: Support, config: EngineConfig) -> None:
    fp8.check_quantization(config.quant, model=caps.model, supported=Feature.FP8 in caps.features,
                           transformer_config=caps.caps.transformer_config,
                           family_default=caps.caps.adapter.quant_ignored_layers)


# ---- apply / remove ----------------------------------------------------------------------------------


def _apply_cache(adapter: Any, config: EngineConfig, groups: Any) -> None:
    for module in adapter.denoiser_modules():  # each expert keeps its own cache state
        apply_cache(module, adapter.cache_blocks)


def _apply_lora(adapter: Any, config: EngineConfig, groups: ParallelGroups) -> None:
    # every rank of the world agrees on each request's loads: the branch group (sp x tp) times cfg
    adapter.lora_store = LoraStore(
        adapter.transformer, config.lora, adapter.pipeline_class, adapter.device, adapter.dtype,
        sharder=TensorParallelLora() if groups.tp.size > 1 else None, reducers=(groups.branch, groups.cfg),
    )


def _remove_lora(adapter: Any) -> None:
    adapter.lora_store.remove()
    adapter.lora_store = None


def _apply_sp(adapter: Any, config: EngineConfig, groups: ParallelGroups) -> None:
    for module in adapter.denoiser_modules():
        apply_sequence_parallel(module, groups, adapter.sequence_plan(), adapter.cp_attention)


def _apply_cfg(adapter: Any, config: EngineConfig, groups: ParallelGroups) -> None:
    adapter.cfg_strategy = CFGParallel(groups.cfg)


def _remove_cfg(adapter: Any) -> None:
    from ditserve.models import serial_cfg

    adapter.cfg_strategy = serial_cfg


def _apply_vae(adapter: Any, config: EngineConfig, group: Any) -> None:
    # hooks on the VAE itself: the adapter's plain decode then runs the configured mode
    apply_vae_parallel(adapter.components["vae"], config.vae, group, adapter.vae_scale_factor)


def _stage_modules(adapter: Any, stage: str) -> list[torch.nn.Module]:
    """The torch modules ``stage`` loaded (text encoders; denoisers; the VAE)."""
    names = adapter.stage_components.get(stage, ())
    return [m for n in names if isinstance(m := adapter.components.get(n), torch.nn.Module)]


def offloaded_components(config: EngineConfig, stages: Sequence[str], adapter_cls: Any) -> tuple[str, ...]:
    """Components the offload rows place themselves: loaded onto the host, not the device (a DiT
    larger than the GPU never has to fit on it)."""
    o = config.offload
    out: list[str] = []
    for stage in stages:
        if o.enable_cpu_offload or (stage == "denoise" and o.enable_layerwise_offload):
            out += [n for n in adapter_cls.stage_components.get(stage, ()) if n in adapter_cls.component_types]
    return tuple(out)


def _model_offload_row(stage: str, order: int) -> FeatureEntry:
    def on(config: EngineConfig) -> bool:
        # the DiT under layerwise offload: its blocks move layer by layer, the rest stays
        o = config.offload
        return o.enable_cpu_offload and not (stage == "denoise" and o.enable_layerwise_offload)

    return FeatureEntry(
        f"cpu_offload.{stage}", stage, order, on, _check_offload,
        lambda adapter, config, groups: apply_model_offload(_stage_modules(adapter, stage), adapter.device),
        lambda adapter: remove_model_offload(_stage_modules(adapter, stage)),
        scope=lambda adapter, config: offload_session(_stage_modules(adapter, stage)),
    )


def _apply_layerwise(adapter: Any, config: EngineConfig, groups: Any) -> None:
    sp = groups.sp if groups is not None and config.offload.offload_shard_host_copy else None
    blocks = adapter.cache_blocks
    offload = apply_layerwise_offload(adapter.transformer, blocks.blocks(adapter.transformer), adapter.device,
                                      config.offload, gather=sp, skip_hint=may_skip)
    # TeaCache's probe reads block 0's modulation weights before block 0 runs (the cache's hook sits
    # outside the offload's): this adapter's probe onloads block 0's group first (not the next one:
    # the whole call may be skipped)
    probe = blocks.modulated_input

    def onloading_probe(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        offload.enter(0, prefetch=False)
        return probe(block, kwargs)

    adapter.cache_blocks = dataclasses.replace(blocks, modulated_input=onloading_probe)


def _remove_layerwise(adapter: Any) -> None:
    remove_layerwise_offload(adapter.transformer)
    vars(adapter).pop("cache_blocks", None)  # the class's again


@contextlib.contextmanager
def _layerwise_scope(adapter: Any, config: EngineConfig) -> Iterator[None]:
    # with model-level offload also on (encoder, VAE), the DiT takes its turn on the GPU too
    with device_lease(adapter.device).hold() if config.offload.enable_cpu_offload else contextlib.nullcontext():
        yield


def _has_cache(config: EngineConfig, caps: Support) -> bool:
    return caps.num_blocks is not None and bool({Feature.TEA_CACHE, Feature.CACHE_DIT} & caps.features)


FEATURES: tuple[FeatureEntry, ...] = (
    _model_offload_row("prior", 0),  # families with an autoregressive prior (its own stage)
    _model_offload_row("encode", 0),
    FeatureEntry("tensor_parallel", "denoise", 0, lambda c: c.parallel.tensor_parallel_size > 1, _check_parallel),
    # quantized while loading (loading.denoiser_loader), so its row only checks; always checked, since a
    # pre-quantized checkpoint is FP8 with or without the option
    FeatureEntry("fp8", "denoise", 5, lambda c: True, _check_quant),
    # each rank offloads the blocks it holds (its tensor-parallel shards); before the cache, so its
    # block hooks sit inside the cache's (a skipped block is never onloaded)
    FeatureEntry("layerwise_offload", "denoise", 5, lambda c: c.offload.enable_layerwise_offload, _check_offload,
                 _apply_layerwise, _remove_layerwise, scope=_layerwise_scope),
    _model_offload_row("denoise", 6),
    # the cache hooks are always attached where the model has them (idle until a request asks),
    # so a request may turn a cache on even when the deployment has no default
    FeatureEntry("cache", "denoise", 10, lambda c: c.cache_backend is not None, _check_cache, _apply_cache,
                 lambda a: [remove_cache(m, a.cache_blocks) for m in a.denoiser_modules()], attached=_has_cache),
    # hooks on the linears (leaves): orthogonal to the block-level cache and SP hooks
    FeatureEntry("lora", "denoise", 15, lambda c: c.lora.lora_dir is not None, _check_lora, _apply_lora,
                 _remove_lora),
    FeatureEntry("sequence_parallel", "denoise", 20, lambda c: c.parallel.sp_degree > 1, _check_parallel,
                 _apply_sp, lambda a: [remove_sequence_parallel(m) for m in a.denoiser_modules()]),
    FeatureEntry("cfg_parallel", "denoise", 30, lambda c: c.parallel.cfg_parallel_size > 1, _check_parallel,
                 _apply_cfg, _remove_cfg),
    FeatureEntry("vae_parallel", "decode", 0, lambda c: True, _check_vae, _apply_vae,
                 lambda a: remove_vae_parallel(a.components["vae"])),
    _model_offload_row("decode", 10),
)


def check_support(config: EngineConfig, stages: Sequence[str] = ("encode", "denoise", "decode"),
                  caps: Support | None = None) -> Support:
    """Every start-up refusal for ``config`` on the stages given (nothing is loaded).

    Returns:
        the model's capabilities (for callers that need more of them).

    Raises:
        ValueError: the first unsupported option, named, with what works instead.
    """
    from ditserve.models import resolve_model

    caps = caps or model_support(resolve_model(config.model))
    _check_idle_options(config)
    on = [e for e in FEATURES if e.stage in stages and e.enabled(config)]
    names = {e.name for e in on}
    for entry in on:
        clash = names.intersection(entry.conflicts)
        if clash:
            raise ValueError(f"{entry.name} cannot be combined with {', '.join(sorted(clash))}")
        try:
            entry.check(caps, config)
        except ValueError as exc:
            why = _unsupported_reason(caps, entry.name)
            if why:
                raise ValueError(f"{exc} ({why})") from None
            raise
    return caps


# table rows whose name is not the Feature they offer
_ROW_FEATURES = {"cache": (Feature.TEA_CACHE, Feature.CACHE_DIT), "vae_parallel": (Feature.VAE_PATCH_PARALLEL,)}


def _unsupported_reason(caps: Support, row: str) -> str | None:
    """The adapter's reason for not offering the feature of table row ``row``, if it gives one."""
    features = _ROW_FEATURES.get(row) or tuple(f for f in Feature if f.value == row)
    adapter = caps.caps.adapter
    reasons = dict(getattr(adapter, "unsupported", {}))
    pipeline = getattr(adapter, "pipeline_class", None)
    if pipeline is not None and not hasattr(pipeline, "lora_state_dict"):  # LoRA files are read through it
        reasons.setdefault(Feature.LORA, f"{pipeline.__name__} has no LoRA loader (lora_state_dict) to read "
                                         "adapter files with")
    return next((reasons[f] for f in features if f in reasons and f not in caps.features), None)


def attach(adapter: Any, config: EngineConfig, groups: Any, stage: str, caps: Support) -> list[str]:
    """Apply the table's entries for ``stage`` in order; returns the names applied.

    Args:
        groups: the DiT rank's ``ParallelGroups`` (``denoise``) or the VAE workers' group (``decode``).
    """
    applied = []
    for entry in sorted((e for e in FEATURES if e.stage == stage), key=lambda e: e.order):
        on = entry.attached(config, caps) if entry.attached is not None else entry.enabled(config)
        if entry.apply is not None and on:
            entry.apply(adapter, config, groups)
            applied.append(entry.name)
    return applied


@contextlib.contextmanager
def stage_scope(adapter: Any, config: EngineConfig, names: Sequence[str]) -> Iterator[None]:
    """Enter the scopes of the attached features ``names`` (in table order) around one call of a stage."""
    by_name = {e.name: e for e in FEATURES}
    with contextlib.ExitStack() as stack:
        for name in names:
            scope = by_name[name].scope
            if scope is not None:
                stack.enter_context(scope(adapter, config))
        yield


def detach(adapter: Any, names: Sequence[str]) -> None:
    """Remove what ``attach`` applied, last first."""
    by_name = {e.name: e for e in FEATURES}
    for name in reversed(list(names)):
        remove = by_name[name].remove
        if remove is not None:
            remove(adapter)
