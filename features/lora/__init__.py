"""LoRA per request: adapters from ``lora_dir``, several at once, applied unmerged on a rank's DiT.

``LoraConfig`` (deployment options), ``list_adapters``/``adapter_path`` (what ``lora_dir`` holds,
confined to it), ``read_adapter`` (diffusers/peft and community formats through the family's
diffusers loader), ``LoraStore`` (a rank's LRU and hooks; ``store.run(loras)`` around a request).
"""

from .config import LoraConfig, LoraError
from .files import AdapterWeights, ModuleLora, adapter_path, list_adapters, read_adapter
from .store import HOOK_NAME, LoadedLora, LoraRun, LoraStats, LoraStore, Sharder, WholeLinears

__all__ = [
    "HOOK_NAME",
    "AdapterWeights",
    "LoadedLora",
    "LoraConfig",
    "LoraError",
    "LoraRun",
    "LoraStats",
    "LoraStore",
    "ModuleLora",
    "Sharder",
    "WholeLinears",
    "adapter_path",
    "list_adapters",
    "read_adapter",
]
