"""Loading a stage's denoisers as this rank runs them: tensor-parallel shards, quantized to FP8
shard-first, or as stored in a pre-quantized checkpoint; and ``ditserve quantize``, which writes one.

It joins ``parallel/`` (the TP layout) and ``features/quantization`` (the FP8 storage), which do not
import each other; the feature table (``attach.py``) only checks the options at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ditserve.features import quantization as fp8
from ditserve.models import Feature
from ditserve.models.loading import read_checkpoint
from ditserve.parallel import ParallelGroups, transformer_loader
from ditserve.parallel.groups import Group
from ditserve.parallel.tensor import RowParallelLinear

from .attach import model_support

if TYPE_CHECKING:
    from .engine import EngineConfig


class _RowShards:
    """A row-parallel linear's tp group as ``features.quantization.RowShards`` (NCCL reduces on the GPU)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.group.size == 1:
            return tensor
        on = tensor
        if dist.get_backend(self.group.pg) == "nccl" and tensor.device.type != "cuda":
            on = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return self.group.all_reduce(on, op).to(tensor.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)


def _shards_of(module: torch.nn.Module) -> _RowShards | None:
    return _RowShards(module.group) if isinstance(module, RowParallelLinear) else None


def denoiser_loader(config: EngineConfig, adapter_cls: type, path: Any, groups: ParallelGroups | None) -> Any:
    """The component loader of the denoisers: this rank's tensor-parallel shards, quantized to FP8
    (shard-first, on the CPU before the move to the device) when ``config.quant`` says so, or loaded
    as stored from a pre-quantized checkpoint; ``None``: the class's own ``from_pretrained``."""
    info = read_checkpoint(path)
    marker = fp8.checkpoint_marker(info.config(adapter_cls.denoisers[0]))
    tp = groups is not None and groups.config.tensor_parallel_size > 1
    if not config.quant.enabled and marker is None:
        return transformer_loader(groups, adapter_cls.tensor_plan()) if tp else None
    dtype = config.torch_dtype()
    ignored = tuple(marker["ignored_layers"]) if marker else fp8.resolve_ignored(config.quant,
                                                                                  adapter_cls.quant_ignored_layers)
    plan = fp8.Fp8Plan(ignored, fp8.select_kernel(config.torch_device(), dtype), dtype, _shards_of)

    def load(cls: type, folder: Any, load_dtype: torch.dtype) -> torch.nn.Module:
        if marker is not None:
            prepare = (lambda m: fp8.prepare_prequantized(m, fp8.stored_fp8_names(folder)))  # noqa: E731
            if tp:
                model = transformer_loader(groups, adapter_cls.tensor_plan(), prepare)(cls, folder, load_dtype)
            else:
                model = fp8.load_prequantized(cls, folder, load_dtype)
            fp8.attach_kernels(model, plan)
        else:
            if tp:
                model = transformer_loader(groups, adapter_cls.tensor_plan())(cls, folder, load_dtype)
            else:
                model = cls.from_pretrained(folder.parent, subfolder=folder.name, dtype=load_dtype,
                                            use_safetensors=True, local_files_only=True)
            fp8.quantize_model(model, plan)
        fp8.report(model, plan.kernel, ignored, prequantized=marker is not None)
        return model

    return load


def quantize_checkpoint(model: str, out: Any, quant: fp8.QuantizationConfig | None = None) -> Any:
    """``ditserve quantize``: copy ``model`` (an id or folder) to ``out`` with its denoisers stored in
    FP8 (the family's default ignored layers unless ``quant`` names others)."""
    from ditserve.models import adapter_class, resolve_model

    resolved = resolve_model(model)
    support = model_support(resolved)
    quant = quant or fp8.QuantizationConfig()
    if quant.quantization is None:
        quant = quant.model_copy(update={"quantization": "fp8"})
    fp8.check_quantization(quant, model=support.model, supported=Feature.FP8 in support.features,
                           transformer_config=support.caps.transformer_config, family_default=())
    if fp8.checkpoint_marker(support.caps.transformer_config):
        raise ValueError(f"--model {model}: already stored in FP8")
    cls = adapter_class(resolved.spec.family)
    info = read_checkpoint(resolved.path)
    denoiser_cls = _resolve_denoiser(info, cls)
    return fp8.write_quantized_checkpoint(resolved.path, out, family_default=cls.quant_ignored_layers, cfg=quant,
                                          transformer_cls=denoiser_cls, denoisers=cls.denoisers)


def _resolve_denoiser(info: Any, cls: type) -> type:
    import diffusers

    return getattr(diffusers, info.components[cls.denoisers[0]].class_name)
