"""VAE patch parallelism across M VAE workers: an exact mode (halo exchange + group-wide norms
and attention) and a distributed tiled mode (diffusers' tiling, its tiles spread over the
workers); slicing of batches. Why ours: diffusers has no patch-parallel VAE, only one-process
tiling and slicing (which we reuse as they are).

Exact mode (``vae_patch_parallel_size = M``, no tiling). Hooks on the VAE's decoder make every
worker decode one contiguous band of the latent and then gather the bands:

- the decoder's input is split along its longer spatial axis (rows, or columns for a wide image)
  into M bands as equal as possible (the work per row is the same, so equal rows are equal work);
  every frame of a video gets the same split, so the decoder's per-frame feature cache stays
  band-shaped;
- before every convolution whose kernel reaches across the split axis, each worker fetches the
  ``padding`` rows it needs from its neighbours, convolves, and crops what the halo added, so the
  band's rows are exactly the full decode's rows (nearest 2x upsampling keeps bands aligned: the
  halo is exchanged at each resolution, never recomputed);
- operations with global reach are computed across the group: GroupNorm statistics from every
  band's count, mean and centred sum of squares (Chan's combination, float64); mid-block attention
  gathers K and V from every band (queries stay local);
- the decoder's output bands are gathered (every worker ends with the whole image).

Tiled mode (``vae_use_tiling``): diffusers' own ``tiled_decode`` (overlapping tiles, blended) —
approximate against the full decode, bounded memory. With M workers the tiles are dealt out
(greedily by area, so edge tiles count less) in one pass that computes only this worker's tiles,
the tiles are all-gathered, and a second pass replays diffusers' loop with the gathered tiles, so
the blend is diffusers' and the result equals one worker's tiled decode.

Which mode is exact, per VAE class (``VAE_PLANS``; a class without a plan is refused):

==========================  ===================================================  ==========================
VAE class                   exact patch parallel (M workers)                     tiled (1 or M workers)
==========================  ===================================================  ==========================
AutoencoderKL               exact: halo convs, GroupNorm stats reduced,          approximate (overlap 1/4,
                            mid-block attention with gathered K/V                linear blend)
AutoencoderKLQwenImage      exact: halo causal convs (and their frame cache),    approximate (overlap 1/4,
                            RMS norm is per position over channels (local),      linear blend)
                            mid-block attention with gathered K/V
==========================  ===================================================  ==========================
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from pydantic import BaseModel, ConfigDict, Field
from torch.overrides import TorchFunctionMode

from .groups import Group, checked_world_size

logger = logging.getLogger(__name__)

VAE_DECODER_HOOK = "ditserve_vae_decoder"
VAE_HALO_HOOK = "ditserve_vae_halo"
VAE_NORM_HOOK = "ditserve_vae_group_norm"
VAE_ATTENTION_HOOK = "ditserve_vae_attention"
VAE_TILES_HOOK = "ditserve_vae_tiles"
_HOOKS = (VAE_DECODER_HOOK, VAE_HALO_HOOK, VAE_NORM_HOOK, VAE_ATTENTION_HOOK, VAE_TILES_HOOK)


class VaeConfig(BaseModel):
    """How the VAE decodes: patch parallel over M workers, tiled, sliced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vae_patch_parallel_size: int = Field(
        1, ge=1, description="VAE workers per VAE replica, one torch.distributed group; each decodes one band "
        "of the image (exact), or a share of the tiles with vae_use_tiling."
    )
    vae_use_tiling: bool = Field(
        False, description="Decode in overlapping blended tiles (diffusers' tiled decode): bounded memory for very "
        "large outputs, approximate near tile seams; with vae_patch_parallel_size > 1 the tiles are spread over "
        "the workers."
    )
    vae_use_slicing: bool = Field(False, description="Decode the images of a batch one at a time (less memory).")
    vae_tile_size: int | None = Field(
        None, ge=16, description="Tile side in output pixels with vae_use_tiling (a multiple of 4 x the VAE "
        "scale; overlap is 1/4 of it). Default: the VAE's own (AutoencoderKL: its sample_size; Qwen-Image: 256)."
    )

    @property
    def parallel(self) -> bool:
        return self.vae_patch_parallel_size > 1

    def describe(self) -> str:
        mode = "tiled" if self.vae_use_tiling else ("exact patches" if self.parallel else "whole")
        extra = ", sliced" if self.vae_use_slicing else ""
        return f"{self.vae_patch_parallel_size} VAE worker(s), {mode}{extra}"


# ---- per-class plans ----------------------------------------------------------------------------


def _kl_tiles(vae: torch.nn.Module, size: int, scale: int) -> None:
    vae.tile_sample_min_size = size
    vae.tile_latent_min_size = size // scale


def _qwen_tiles(vae: torch.nn.Module, size: int, scale: int) -> None:
    stride = size - size // 4  # the class's default ratio (256 / 192)
    vae.enable_tiling(size, size, stride, stride)


def _qwen_attention() -> tuple[type, ...]:
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageAttentionBlock

    return (QwenImageAttentionBlock,)


def _kl_attention() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention

    return (Attention,)


@dataclasses.dataclass(frozen=True)
class VaePlan:
    """What the exact mode must treat as global in one VAE class's decoder.

    Attributes:
        attention: module classes whose ``scaled_dot_product_attention`` sees the whole image
            (K/V gathered from every band).
        group_norm: whether the decoder normalises with ``nn.GroupNorm`` (statistics reduced).
        set_tile_size: sets the tile side (output pixels) of diffusers' tiled decode.
        exact: one line for the docs: why the patch mode is exact for this class.
    """

    attention: Callable[[], tuple[type, ...]]
    group_norm: bool
    set_tile_size: Callable[[torch.nn.Module, int, int], None]
    exact: str


VAE_PLANS: dict[str, VaePlan] = {
    "AutoencoderKL": VaePlan(
        _kl_attention, True, _kl_tiles,
        "halo convs; GroupNorm statistics reduced over the group; mid-block attention over gathered K/V",
    ),
    "AutoencoderKLQwenImage": VaePlan(
        _qwen_attention, False, _qwen_tiles,
        "halo causal convs (frame cache included); RMS norm is per position (local); mid-block attention "
        "over gathered K/V",
    ),
}


def vae_plan(vae_class: type | str) -> VaePlan | None:
    """The plan of a VAE class (or of its nearest planned base class)."""
    names = [vae_class] if isinstance(vae_class, str) else [c.__name__ for c in vae_class.__mro__]
    return next((VAE_PLANS[n] for n in names if n in VAE_PLANS), None)


# ---- sizes ---------------------------------------------------------------------------------------


def band_sizes(n: int, parts: int) -> list[int]:
    """Rows per band: ``n`` split into ``parts`` contiguous bands as equal as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _split_dim(height: int, width: int) -> int:
    """The axis the bands cut: rows (-2) unless the image is wider than tall (columns, -1)."""
    return -2 if height >= width else -1


def size_error(config: VaeConfig, width: int, height: int, vae_scale: int) -> str | None:
    """Why an output of ``width`` x ``height`` cannot be decoded by the configured workers (or None).

    Exact mode needs one latent row (or column) per worker along the split axis; tiled mode
    decodes any size (a worker without a tile idles).
    """
    m = config.vae_patch_parallel_size
    if m == 1 or config.vae_use_tiling:
        return None
    long_side = max(width, height)
    if long_side // vae_scale >= m:
        return None
    return (
        f"{width}x{height} has {long_side // vae_scale} latent rows along its longer side, fewer than the "
        f"vae_patch_parallel_size={m} VAE workers that each decode one band; use a longer side of at least "
        f"{m * vae_scale} pixels"
    )


def check_vae_config(config: VaeConfig, vae_class: type | str, *, model: str, default_size: tuple[int, int],
                     vae_scale: int) -> None:
    """Refuse at start-up a VAE setting the model cannot run; the message names the option.

    Args:
        vae_class: the checkpoint's VAE class (or its name).
        default_size: the model's default (width, height): a deployment must decode it.
        vae_scale: pixels per latent row.
    """
    name = vae_class if isinstance(vae_class, str) else vae_class.__name__
    plan = vae_plan(vae_class)
    if (config.parallel or config.vae_use_tiling or config.vae_tile_size) and plan is None:
        what = "vae_use_tiling" if config.vae_use_tiling and not config.parallel else (
            f"vae_patch_parallel_size={config.vae_patch_parallel_size}")
        raise ValueError(
            f"{what}: model {model}'s VAE class {name} has no patch-parallel/tiling plan "
            f"(classes with one: {', '.join(VAE_PLANS)}); use vae_patch_parallel_size=1 without tiling"
        )
    if config.vae_tile_size is not None:
        if not config.vae_use_tiling:
            raise ValueError(f"vae_tile_size={config.vae_tile_size} is set but vae_use_tiling is off; enable it")
        if config.vae_tile_size % (4 * vae_scale):
            raise ValueError(
                f"vae_tile_size={config.vae_tile_size} must be a multiple of {4 * vae_scale} (4 x the VAE scale "
                f"{vae_scale} of model {model}, so that tiles and their 1/4 overlap fall on latent rows)"
            )
    width, height = default_size
    why = size_error(config, width, height, vae_scale)
    if why is not None:
        most = max(width, height) // vae_scale
        raise ValueError(
            f"vae_patch_parallel_size={config.vae_patch_parallel_size}: the default size of model {model} cannot be "
            f"split: {why} (at most {most} workers for it, or use vae_use_tiling)"
        )


def build_vae_group(config: VaeConfig) -> Group:
    """The VAE workers' group: the whole torch.distributed world (every worker must call it)."""
    size = config.vae_patch_parallel_size
    world = checked_world_size(size, "VAE", f"vae_patch_parallel_size={size}")
    if world == 1:
        return Group((0,), 0, None)
    return Group(tuple(range(world)), dist.get_rank(), dist.group.WORLD)


# ---- exact mode: hooks ---------------------------------------------------------------------------


class _PatchState:
    """Shared by the hooks of one decoder: the split axis while a band is being decoded."""

    def __init__(self) -> None:
        self.dim: int | None = None
        self.sizes: list[int] = []  # every worker's band, in latent rows along ``dim``


def exchange_halo(x: torch.Tensor, dim: int, halo: int, group: Group) -> tuple[torch.Tensor, int, int]:
    """``x`` with ``halo`` rows of each neighbour's band along ``dim`` attached.

    Returns:
        (extended tensor, rows added before, rows added after); the first and last band get
        nothing on their outer side (the convolution's own zero padding is the image border there).
    """
    prev, nxt = group.rank - 1, group.rank + 1
    shape = list(x.shape)
    shape[dim] = halo
    send, recv = {}, {}
    if prev >= 0:
        send[prev] = x.narrow(dim, 0, halo)
        recv[prev] = x.new_empty(shape)
    if nxt < group.size:
        send[nxt] = x.narrow(dim, x.shape[dim] - halo, halo)
        recv[nxt] = x.new_empty(shape)
    group.exchange(send, recv)
    parts = [t for t in (recv.get(prev), x, recv.get(nxt)) if t is not None]
    return torch.cat(parts, dim=dim), halo if prev >= 0 else 0, halo if nxt < group.size else 0


def _conv_halo(module: torch.nn.Module) -> dict[int, int]:
    """Rows a convolution reads beyond each output row, per spatial axis (-2, -1); refuses a
    convolution the halo exchange cannot make exact."""
    if hasattr(module, "_padding"):  # causal 3-D convs pad themselves: (w, w, h, h, 2t, 0)
        pads = {-1: module._padding[0], -2: module._padding[2]}
    else:
        pads = {-2: module.padding[-2], -1: module.padding[-1]}
    kernel = module.kernel_size[-2:]
    for axis, k in zip((-2, -1), kernel):
        ok = (module.stride[axis] == 1 and module.dilation[axis] == 1 and k == 2 * pads[axis] + 1
              and module.padding_mode == "zeros")
        if k > 1 and not ok:
            raise ValueError(
                f"{type(module).__name__}(kernel={tuple(module.kernel_size)}, stride={tuple(module.stride)}, "
                f"padding={pads}) is not a 'same' zero-padded stride-1 convolution: no exact patch plan"
            )
    return pads


class _HaloConvHook(ModelHook):
    """Attaches neighbours' rows before the convolution and crops them from its output; a frame
    cache passed along (causal 3-D convs) gets the same halo."""

    def __init__(self, group: Group, state: _PatchState, halo: dict[int, int]) -> None:
        super().__init__()
        self.group, self.state, self.halo = group, state, halo

    def new_forward(self, module, x, *args, **kwargs):
        dim = self.state.dim
        if dim is None or self.halo[dim] == 0:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        halo = self.halo[dim]
        x, before, after = exchange_halo(x, dim, halo, self.group)
        args = list(args)
        if args and torch.is_tensor(args[0]):
            args[0] = exchange_halo(args[0], dim, halo, self.group)[0]
        if torch.is_tensor(kwargs.get("cache_x")):
            kwargs["cache_x"] = exchange_halo(kwargs["cache_x"], dim, halo, self.group)[0]
        out = self.fn_ref.original_forward(x, *args, **kwargs)
        return out.narrow(dim, before, out.shape[dim] - before - after)


class _GroupNormHook(ModelHook):
    """GroupNorm with statistics over the whole image: every band's (count, mean, centred sum of
    squares) per (sample, group), combined in float64."""

    def __init__(self, group: Group, state: _PatchState) -> None:
        super().__init__()
        self.group, self.state = group, state

    def new_forward(self, module, x):
        if self.state.dim is None:
            return self.fn_ref.original_forward(x)
        b, c, g = x.shape[0], x.shape[1], module.num_groups
        xv = x.reshape(b, g, -1)
        var, mean = torch.var_mean(xv.float(), dim=-1, correction=0)
        n = xv.shape[-1]
        local = torch.stack([torch.full_like(mean, n), mean, var * n]).double()  # (3, B, G)
        parts = self.group.all_gather(local)
        counts = torch.stack([p[0] for p in parts])
        means = torch.stack([p[1] for p in parts])
        total = counts.sum(0)
        mean_all = (counts * means).sum(0) / total
        m2 = sum(p[2] + p[0] * (p[1] - mean_all) ** 2 for p in parts)
        rstd = torch.rsqrt(m2 / total + module.eps)
        scale = rstd[..., None].expand(b, g, c // g)
        if module.affine:
            scale = scale * module.weight.double().view(1, g, c // g)
        shift = -mean_all[..., None] * scale
        if module.affine:
            shift = shift + module.bias.double().view(1, g, c // g)
        spatial = (1,) * (x.dim() - 2)
        scale = scale.reshape(b, c, *spatial).to(x.dtype)
        shift = shift.reshape(b, c, *spatial).to(x.dtype)
        return torch.addcmul(shift, x, scale)


class _GatheredKVAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` of the local queries over every band's keys and values."""

    def __init__(self, group: Group, state: _PatchState) -> None:
        super().__init__()
        self.group, self.state = group, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask")
        bound = {**dict(zip(names, args)), **kwargs}
        if bound.get("attn_mask") is not None or bound.get("is_causal"):
            raise NotImplementedError("VAE patch parallel attention supports no attention mask or causal attention")
        q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
        # every band's tokens: its latent rows x the tokens per latent row (the same on all bands)
        per_row, rest = divmod(k.shape[-2], self.state.sizes[self.group.rank])
        assert rest == 0, (k.shape, self.state.sizes)
        sizes = [n * per_row for n in self.state.sizes]
        kv = self.group.all_gather_uneven(torch.stack([k, v]), -2, sizes)
        return func(q, kv[0], kv[1], **bound)


class _AttentionHook(ModelHook):
    def __init__(self, group: Group, state: _PatchState) -> None:
        super().__init__()
        self.state = state
        self.mode = _GatheredKVAttention(group, state)

    def new_forward(self, module, *args, **kwargs):
        if self.state.dim is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        with self.mode:
            return self.fn_ref.original_forward(*args, **kwargs)


class _DecoderBandHook(ModelHook):
    """Decodes this worker's band of the decoder's input and gathers the output bands."""

    def __init__(self, group: Group, state: _PatchState, min_rows: int) -> None:
        super().__init__()
        self.group, self.state, self.min_rows = group, state, min_rows

    def new_forward(self, module, x, *args, **kwargs):
        dim = _split_dim(x.shape[-2], x.shape[-1])
        sizes = band_sizes(x.shape[dim], self.group.size)
        if min(sizes) < self.min_rows:  # the same on every worker: all refuse, none waits
            raise ValueError(
                f"a latent of {x.shape[-2]}x{x.shape[-1]} gives bands of {min(sizes)} rows to "
                f"vae_patch_parallel_size={self.group.size} workers; the decoder needs {self.min_rows}"
            )
        start = sum(sizes[: self.group.rank])
        band = x.narrow(dim, start, sizes[self.group.rank])
        self.state.dim, self.state.sizes = dim, sizes
        try:
            out = self.fn_ref.original_forward(band, *args, **kwargs)
        finally:
            self.state.dim = None
        scale = out.shape[dim] // band.shape[dim]
        return self.group.all_gather_uneven(out, dim, [s * scale for s in sizes])


# ---- tiled mode over M workers ---------------------------------------------------------------------


class _TileDealerHook(ModelHook):
    """Deals diffusers' tiled-decode decoder calls out to the workers.

    ``compute`` pass: a call owned here is decoded and kept, other calls get an empty stand-in
    of the right shape (that pass's blended result is thrown away). ``replay`` pass: every call
    returns the gathered tile, so diffusers blends the real tiles.
    """

    def __init__(self, group: Group, out_channels: int, scale: int, frames: int = 1) -> None:
        super().__init__()
        self.group, self.out_channels, self.scale, self.frames = group, out_channels, scale, frames
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

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        shape = list(x.shape)
        shape[1] = self.out_channels
        shape[-2] *= self.scale
        shape[-1] *= self.scale
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
        shape = self._output_shape(x)
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


# ---- attach / decode / remove ---------------------------------------------------------------------


class VaeParallel:
    """The decode strategy of one loaded VAE: whole, exact patches over a group, or tiles.

    Args:
        vae: the diffusers VAE (its ``decoder`` gets the hooks).
        config: the VAE options.
        group: the VAE workers' group (size ``vae_patch_parallel_size``).
        vae_scale: output pixels per latent row.
    """

    def __init__(self, vae: torch.nn.Module, config: VaeConfig, group: Group | None, vae_scale: int) -> None:
        if config.parallel and (group is None or group.size != config.vae_patch_parallel_size):
            raise ValueError(
                f"vae_patch_parallel_size={config.vae_patch_parallel_size} needs a group of that many VAE workers "
                "(a VAE worker group or local processes)"
            )
        self.vae, self.config, self.group = vae, config, group
        plan = vae_plan(type(vae))
        if config.vae_use_slicing:
            vae.enable_slicing()
        if config.vae_use_tiling:
            if plan is None:
                raise ValueError(f"vae_use_tiling: {type(vae).__name__} has no tiling plan (classes: {', '.join(VAE_PLANS)})")
            if config.vae_tile_size is not None:
                plan.set_tile_size(vae, config.vae_tile_size, vae_scale)
            vae.enable_tiling()
        self.tiles: _TileDealerHook | None = None
        if not config.parallel:
            return
        decoder = vae.decoder
        if config.vae_use_tiling:
            self.tiles = _TileDealerHook(group, decoder.conv_out.out_channels, vae_scale)
            HookRegistry.check_if_exists_or_initialize(decoder).register_hook(self.tiles, VAE_TILES_HOOK)
            return
        if plan is None:
            raise ValueError(
                f"vae_patch_parallel_size={config.vae_patch_parallel_size}: {type(vae).__name__} has no "
                f"patch-parallel plan (classes: {', '.join(VAE_PLANS)})"
            )
        apply_vae_patch_parallel(decoder, plan, group)

    def decode(self, run: Callable[[], Any]) -> Any:
        """Run ``run`` (one decode through the VAE) the way this strategy needs."""
        if self.tiles is None:
            return run()
        # collective: every worker sees the same calls with the same shapes, so all deal alike
        self.tiles.reset("compute")
        try:
            run()
            self.tiles.gather()
            self.tiles.calls, self.tiles.phase = 0, "replay"
            return run()
        finally:
            self.tiles.reset("off")

    def remove(self) -> None:
        remove_vae_parallel(self.vae.decoder)


def apply_vae_patch_parallel(decoder: torch.nn.Module, plan: VaePlan, group: Group) -> None:
    """Hook a VAE decoder for the exact patch mode (see the module docstring)."""
    state = _PatchState()
    min_rows = 1
    attention = plan.attention()
    for module in decoder.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            halo = _conv_halo(module)
            if any(halo.values()):
                min_rows = max(min_rows, *halo.values())
                HookRegistry.check_if_exists_or_initialize(module).register_hook(
                    _HaloConvHook(group, state, halo), VAE_HALO_HOOK)
        elif isinstance(module, torch.nn.GroupNorm):
            if not plan.group_norm:
                raise ValueError(f"{type(decoder).__name__} has a GroupNorm its plan does not declare")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_GroupNormHook(group, state), VAE_NORM_HOOK)
        elif isinstance(module, attention):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_AttentionHook(group, state), VAE_ATTENTION_HOOK)
    # the decoder's own hook goes last: it must run outermost
    HookRegistry.check_if_exists_or_initialize(decoder).register_hook(
        _DecoderBandHook(group, state, min_rows), VAE_DECODER_HOOK)


def remove_vae_parallel(decoder: torch.nn.Module) -> None:
    for module in decoder.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in list(registry.hooks):
            if name in _HOOKS:
                registry.remove_hook(name, recurse=False)
