"""The conditioning cache: what an input image costs to encode, kept by its content key.

Editing sessions send the same image many times with new prompts. The TextEncoder keeps the image's
vision features (the vision tower's output, which does not depend on the prompt) and the VAE keeps
its latents, each in a ``ConditioningCache``: an LRU bounded in bytes per replica
(``ImageInputConfig.conditioning_cache_mb``), keyed by the SHA-256 of the decoded pixels
(``images_in.image_key``), so a repeat skips both encodes. Hits and misses go into the stage's
report (``StageReport.conditioning``), the response and the Router's metrics.

Why ours: the encodes run inside our stage objects on tensors no HTTP-level cache sees, and the key
must be the content, not a URL or a file name.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import torch

_MIB = 1024 * 1024


def nbytes(value: Any) -> int:
    """Bytes held by a tensor, or by the tensors of a tuple/list/dict (others count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


class ConditioningCache:
    """A size-bounded LRU of encoded conditioning (CPU tensors) by content key; thread-safe.

    Args:
        max_mb: capacity in MiB; 0 keeps nothing (every lookup misses).
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * _MIB)
        self._items: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        """The value stored for ``key`` (now the most recently used), counting a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (its tensors moved to the CPU by the caller); evicts the least recently
        used entries to stay within ``max_bytes``; a value larger than the cache is not kept."""
        size = nbytes(value)
        with self._lock:
            if size > self.max_bytes:
                return
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}
