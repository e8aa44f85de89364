"""The tiled mode (``vae_use_tiling``): diffusers' own tiled decode (overlapping tiles, linearly
blended) — approximate against the full decode, bounded memory — on one worker, or with its tiles
spread over M workers so the result equals one worker's tiled decode.

One worker: ``enable_tiling`` sets the plan's tile side and turns diffusers' tiling on; nothing
is hooked.

M workers, in two passes over diffusers' own tile loop:

1. compute: the decoder's calls are dealt out greedily by area (edge tiles count less), a video
   tile's frames (one call each, sharing the decoder's frame cache) to one owner; a call owned
   here is decoded and kept, the others get an empty stand-in of the right shape (that pass's
   blend is thrown away);
2. the kept tiles are all-gathered, in call order;
3. replay: the loop runs again and every decoder call returns the gathered tile, so diffusers
   blends the real tiles with its own code.

Where the passes hook in: the loop to run twice is the VAE's ``tiled_decode``, which both planned
classes' ``_decode`` call per batch slice when the latent is larger than one tile. A diffusers
``ModelHook`` wraps only ``forward``, which ``decode`` does not go through, so the hook on the VAE
module (``VAE_TILED_DECODE_HOOK``) shadows ``tiled_decode`` on that one instance when it is
registered and drops the shadow when it is removed: no class is patched, the registry lists it
by name beside the other hooks, and ``remove_vae_parallel`` takes it off like any other. Hooking
``tiled_decode`` rather than ``decode`` keeps diffusers' slicing, its "larger than one tile"
test and its offload hook (``apply_forward_hook`` on ``decode``) outside the two passes; a latent
that fits in one tile is decoded whole by every worker (the dealer is idle), which is what one
worker's tiled decode does too.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..groups import Group
from .plans import VaePlan

VAE_TILES_HOOK = "ditserve_vae_tiles"
VAE_TILED_DECODE_HOOK = "ditserve_vae_tiled_decode"
TILED_HOOKS = (VAE_TILES_HOOK, VAE_TILED_DECODE_HOOK)


def enable_tiling(vae: torch.nn.Module, plan: VaePlan, tile_size: int | None, vae_scale: int) -> None:
    """Turn on diffusers' tiled decode, with the plan's tile side when one is configured."""
    if tile_size is not None:
        plan.set_tile_size(vae, tile_size, vae_scale)
    vae.enable_tiling()


class _TileDealerHook(ModelHook):
    """Deals diffusers' tiled-decode decoder calls out to the workers (on the VAE's decoder).

    ``compute`` pass: a call owned here is decoded and kept, other calls get an empty stand-in
    of the right shape (that pass's blended result is thrown away). ``replay`` pass: every call
    returns the gathered tile, so diffusers blends the real tiles. ``off``: the decoder runs.
    """

    def __init__(self, group: Group, out_channels: int, scale: int, frame_scale: int = 1) -> None:
        super().__init__()
        self.group, self.out_channels, self.scale, self.frame_scale = group, out_channels, scale, frame_scale
        self.frames = 1  # decoder calls per tile: one per latent frame (set per decode)
        self.reset("off")

    def reset(self, phase: str) -> None:
        self.phase = phase
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []
        self.owners: list[int] = []
        self.kept: dict[int, torch.Tensor] = {}
        self.loads = [0] * self.group.size
        self.tiles: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def _output_shape(self, x: torch.Tensor, index: int) -> tuple[int, ...]:
        shape = list(x.shape)
        shape[1] = self.out_channels
        shape[-2] *= self.scale
        shape[-1] *= self.scale
        if x.dim() == 5 and index % self.frames:  # a video tile's later frames are upsampled in time
            shape[2] *= self.frame_scale
        return tuple(shape)

    def new_forward(self, module, x, *args, **kwargs):
        index = self.calls
        self.calls += 1
        if self.phase == "off":
            return self.fn_ref.original_forward(x, *args, **kwargs)
        if self.phase == "replay":
            return self.tiles[index]
        if index % self.frames == 0:  # a new tile (its frames share a cache: one owner)
            owner = min(range(self.group.size), key=lambda r: (self.loads[r], r))
            self.loads[owner] += x.shape[-2] * x.shape[-1]
        else:
            owner = self.owners[-1]
        self.owners.append(owner)
        shape = self._output_shape(x, index)
        self.shapes.append(shape)
        dtype = module.conv_out.weight.dtype
        self.dtype, self.device = dtype, x.device
        if owner != self.group.rank:
            return x.new_empty(shape, dtype=dtype)
        out = self.fn_ref.original_forward(x, *args, **kwargs)
        if tuple(out.shape) != shape:
            raise RuntimeError(f"decoder tile output {tuple(out.shape)}, expected {shape}")
        self.kept[index] = out.clone()  # diffusers blends its tiles in place
        return out

    def gather(self) -> None:
        """All-gather the tiles of every worker, in call order."""
        mine = [self.kept[i].reshape(-1) for i in sorted(self.kept)]
        numel = [0] * self.group.size
        for shape, owner in zip(self.shapes, self.owners):
            numel[owner] += int(torch.Size(shape).numel())
        flat = torch.cat(mine) if mine else torch.empty(0, dtype=self.dtype, device=self.device)
        everything = self.group.all_gather_uneven(flat, 0, numel)
        pieces = list(everything.split(numel))
        offsets = [0] * self.group.size
        self.tiles = []
        for shape, owner in zip(self.shapes, self.owners):
            n = int(torch.Size(shape).numel())
            self.tiles.append(pieces[owner][offsets[owner]:offsets[owner] + n].view(shape).clone())
            offsets[owner] += n
        self.kept = {}


class _TiledDecodeHook(ModelHook):
    """On the VAE module: runs its ``tiled_decode`` twice (compute, gather, replay) around the
    dealer. ``forward`` passes through; the hook point is the per-instance ``tiled_decode``
    shadow set up by ``initialize_hook`` (see the module docstring for why)."""

    def __init__(self, dealer: _TileDealerHook) -> None:
        super().__init__()
        self.dealer = dealer
        self._original = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._original = module.tiled_decode  # the class's, bound to this VAE
        module.tiled_decode = self._two_passes  # an instance attribute: this VAE only
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        if module.__dict__.get("tiled_decode") == self._two_passes:
            del module.tiled_decode
        self._original = None
        return module

    def _two_passes(self, z: torch.Tensor, return_dict: bool = True):
        dealer = self.dealer
        # a video tile's frames go through the decoder one by one, sharing its frame cache: one owner
        dealer.frames = z.shape[2] if z.dim() == 5 else 1
        # collective: every worker runs the same loop over the same shapes, so all deal alike
        dealer.reset("compute")
        try:
            self._original(z, return_dict=return_dict)
            dealer.gather()
            dealer.calls, dealer.phase = 0, "replay"
            return self._original(z, return_dict=return_dict)
        finally:
            dealer.reset("off")


def apply_distributed_tiling(vae: torch.nn.Module, plan: VaePlan, group: Group, vae_scale: int) -> _TileDealerHook:
    """Spread the tiles of ``vae``'s tiled decode over ``group`` (tiling must be enabled).

    Returns:
        the dealer (on ``vae.decoder``).
    """
    decoder = vae.decoder
    dealer = _TileDealerHook(group, decoder.conv_out.out_channels, vae_scale, plan.frame_scale(decoder))
    HookRegistry.check_if_exists_or_initialize(decoder).register_hook(dealer, VAE_TILES_HOOK)
    HookRegistry.check_if_exists_or_initialize(vae).register_hook(_TiledDecodeHook(dealer), VAE_TILED_DECODE_HOOK)
    return dealer
