"""LoRA adapters for the tests, made the way users make them: peft on the tiny checkpoint's
transformer (non-zero A and B), saved with the family pipeline's ``save_lora_weights``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import diffusers
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def transformer_class(checkpoint: Path) -> type:
    return getattr(diffusers, json.loads((Path(checkpoint) / "transformer" / "config.json").read_text())["_class_name"])


def block_linears(transformer: torch.nn.Module) -> list[str]:
    """Every linear inside the transformer's numbered blocks/layers (what LoRA trainers target)."""
    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name)]


def save_peft_lora(pipeline_cls: type, checkpoint: Path, out: Path, *, seed: int, rank: int = 4,
                   alpha: float = 8, targets: list[str] | None = None) -> Path:
    """A random LoRA (scaled to change the output visibly, not wreck it) saved as diffusers saves one."""
    transformer = transformer_class(checkpoint).from_pretrained(Path(checkpoint) / "transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or block_linears(transformer),
                        init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config, adapter_name="default")
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    layers = get_peft_model_state_dict(transformer, adapter_name="default")
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict())
    return out


def add_bad_entries(root: Path) -> None:
    """Entries of a lora_dir that must be refused when asked for: a pickle-only adapter folder
    (``binary``) and a file that is not safetensors (``corrupt``)."""
    (root / "binary").mkdir()
    torch.save({"x": torch.zeros(1)}, root / "binary" / "adapter.bin")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
