"""VAE patch parallelism across M VAE workers — an exact mode (halo exchange + group-wide norms
and attention) and a distributed tiled mode (diffusers' tiling, its tiles spread over the
workers) — and slicing of batches. Why ours: diffusers has no patch-parallel VAE, only
one-process tiling and slicing (which we reuse as they are).

``apply_vae_parallel(vae, config, group, vae_scale)`` installs the configured decode on the VAE
itself, as hooks registered by name in diffusers' ``HookRegistry``; afterwards a plain
``vae.decode(z)`` (what every adapter's ``decode`` calls) runs whole, exact patch-parallel, tiled,
tiled over M workers, or sliced — the caller has no VAE special case. ``remove_vae_parallel(vae)``
takes every hook off and restores diffusers' tiling and slicing settings.

The package, by concern:

- ``config.py``: ``VaeConfig``, the size rules (``band_sizes``, ``size_error``), the start-up
  check and the VAE workers' group;
- ``plans.py``: what each VAE class needs (``VAE_PLANS``) and which mode is exact for it;
- ``exact.py``: the exact patch mode's hooks on the decoder;
- ``tiled.py``: diffusers' tiling on one worker, and its tiles over M workers;
- here: the holder hook (``VaeParallel``) and the apply/remove entry points.
"""

from __future__ import annotations

import logging

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..groups import Group
from .config import VaeConfig, band_sizes, build_vae_group, check_vae_config, size_error, split_dim
from .exact import (
    EXACT_HOOKS,
    VAE_ATTENTION_HOOK,
    VAE_DECODER_HOOK,
    VAE_HALO_HOOK,
    VAE_NORM_HOOK,
    apply_vae_patch_parallel,
    exchange_halo,
)
from .plans import VAE_PLANS, VaePlan, vae_plan
from .tiled import TILED_HOOKS, VAE_TILED_DECODE_HOOK, VAE_TILES_HOOK, apply_distributed_tiling, enable_tiling

logger = logging.getLogger(__name__)

VAE_PARALLEL_HOOK = "ditserve_vae_parallel"
VAE_HOOKS = (VAE_PARALLEL_HOOK, *EXACT_HOOKS, *TILED_HOOKS)

# diffusers' decode switches that apply_vae_parallel may change (enable_tiling/slicing and the
# plans' tile sides); remove restores them
_SETTING_PREFIXES = ("use_", "tile_")


class VaeParallel(ModelHook):
    """The decode strategy installed on one VAE (the hook ``VAE_PARALLEL_HOOK`` on the VAE module).

    It changes nothing in ``forward``: it records what was installed (for callers and tests) and
    diffusers' tiling/slicing settings as they were before, which its removal restores.

    Attributes:
        config: the VAE options.
        group: the VAE workers' group (``None`` with one worker).
        tiles: the tile dealer in the tiled mode over M workers, else ``None``.
    """

    def __init__(self, config: VaeConfig, group: Group | None) -> None:
        super().__init__()
        self.config, self.group = config, group
        self.tiles = None
        self._settings: dict[str, object] = {}

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._settings = {k: v for k, v in vars(module).items()
                          if k.startswith(_SETTING_PREFIXES) and isinstance(v, (bool, int, float))}
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        for name, value in self._settings.items():
            setattr(module, name, value)
        return module


def apply_vae_parallel(vae: torch.nn.Module, config: VaeConfig, group: Group | None, vae_scale: int) -> VaeParallel:
    """Install ``config``'s decode on ``vae`` (every VAE worker calls it with its group).

    Args:
        vae: the diffusers VAE; hooks go on it and its ``decoder``.
        config: the VAE options (checked at start-up by ``check_vae_config``).
        group: the VAE workers' group, of size ``vae_patch_parallel_size`` (``None`` with one).
        vae_scale: output pixels per latent row.

    Returns:
        the installed ``VaeParallel`` (also ``vae_parallel_of(vae)``).
    """
    if config.parallel and (group is None or group.size != config.vae_patch_parallel_size):
        raise ValueError(
            f"vae_patch_parallel_size={config.vae_patch_parallel_size} needs a group of that many VAE workers "
            "(a VAE worker group or local processes)"
        )
    if vae_parallel_of(vae) is not None:
        raise ValueError(f"{type(vae).__name__} already has a VAE decode installed; remove_vae_parallel first")
    plan = vae_plan(type(vae))
    if plan is None and (config.parallel or config.vae_use_tiling):
        what = f"vae_patch_parallel_size={config.vae_patch_parallel_size}" if config.parallel else "vae_use_tiling"
        raise ValueError(f"{what}: {type(vae).__name__} has no patch-parallel/tiling plan "
                         f"(classes: {', '.join(VAE_PLANS)})")
    holder = VaeParallel(config, group)
    HookRegistry.check_if_exists_or_initialize(vae).register_hook(holder, VAE_PARALLEL_HOOK)
    try:
        if config.vae_use_slicing:
            vae.enable_slicing()
        if config.vae_use_tiling:
            enable_tiling(vae, plan, config.vae_tile_size, vae_scale)
            if config.parallel:
                holder.tiles = apply_distributed_tiling(vae, plan, group, vae_scale)
        elif config.parallel:
            apply_vae_patch_parallel(vae.decoder, plan, group)
    except BaseException:
        remove_vae_parallel(vae)  # a half-hooked VAE would hang the others at its first collective
        raise
    logger.debug("VAE decode: %s", config.describe())
    return holder


def vae_parallel_of(vae: torch.nn.Module) -> VaeParallel | None:
    """The ``VaeParallel`` installed on ``vae`` (``None``: nothing installed)."""
    registry = getattr(vae, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(VAE_PARALLEL_HOOK)


def remove_vae_parallel(vae: torch.nn.Module) -> None:
    """Take every hook ``apply_vae_parallel`` installed off ``vae`` (and its modules), last first,
    restoring diffusers' tiling and slicing settings."""
    for module in vae.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in reversed(list(registry.hooks)):
            if name in VAE_HOOKS:
                registry.remove_hook(name, recurse=False)


__all__ = [
    "VAE_ATTENTION_HOOK", "VAE_DECODER_HOOK", "VAE_HALO_HOOK", "VAE_HOOKS", "VAE_NORM_HOOK", "VAE_PARALLEL_HOOK",
    "VAE_PLANS", "VAE_TILED_DECODE_HOOK", "VAE_TILES_HOOK", "VaeConfig", "VaeParallel", "VaePlan",
    "apply_vae_parallel", "apply_vae_patch_parallel", "band_sizes", "build_vae_group", "check_vae_config",
    "exchange_halo", "remove_vae_parallel", "size_error", "split_dim", "vae_parallel_of", "vae_plan",
]
