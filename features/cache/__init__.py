"""Cache acceleration: TeaCache and Cache-DiT (DBCache, TaylorSeer, SCM) as block hooks on a DiT.

``apply_cache(transformer, blocks)`` at load; ``cache_run(settings, transformer, blocks, ...)``
around each request's denoising loop, where ``blocks`` is the ``CacheBlocks`` the model's adapter
declares (``ditserve.models.contract``): the caches keep no table of model classes. Settings come from the deployment (``cache_backend``/``cache_config``) merged with
the request's ``cache`` field (``merge_cache``). See ``hooks.py`` for the mechanics and
``policies.py`` for the decisions.
"""

from .config import (
    BACKENDS,
    CACHE_KINDS,
    NO_CACHE,
    AnyCacheSettings,
    CacheBackend,
    CacheConfigError,
    CacheDiTConfig,
    CacheDiTSettings,
    CacheKnobs,
    CacheOff,
    CacheOverride,
    CacheRequest,
    CacheSettings,
    TeaCacheConfig,
    TeaCacheSettings,
    cache_error,
    merge_cache,
    parse_cache_settings,
)
from .hooks import CacheRun, CacheStats, apply_cache, cache_run, check_blocks, has_cache, may_skip, remove_cache
from .policies import TaylorSeer, steps_mask

__all__ = [
    "BACKENDS",
    "CACHE_KINDS",
    "NO_CACHE",
    "AnyCacheSettings",
    "CacheBackend",
    "CacheConfigError",
    "CacheDiTConfig",
    "CacheDiTSettings",
    "CacheKnobs",
    "CacheOff",
    "CacheOverride",
    "CacheRequest",
    "CacheRun",
    "CacheSettings",
    "CacheStats",
    "TaylorSeer",
    "TeaCacheConfig",
    "TeaCacheSettings",
    "apply_cache",
    "cache_error",
    "cache_run",
    "check_blocks",
    "has_cache",
    "may_skip",
    "merge_cache",
    "parse_cache_settings",
    "remove_cache",
    "steps_mask",
]
