"""The exact patch mode (``vae_patch_parallel_size = M``, no tiling): hooks on a VAE's decoder
make every worker decode one contiguous band of the latent and then gather the bands, so each
worker ends with exactly the image one worker decodes alone. Why ours: diffusers has no
patch-parallel VAE.

- the decoder's input is split along its longer spatial axis into M bands (``config.band_sizes``);
  every frame of a video gets the same split, so the decoder's per-frame feature cache stays
  band-shaped; a 1-D (audio) decoder's input (B, C, T) is split along time;
- before every convolution whose kernel reaches across the split axis, each worker fetches the
  ``padding`` rows it needs from its neighbours, convolves, and crops what the halo added, so the
  band's rows are exactly the full decode's rows (nearest 2x upsampling keeps bands aligned: the
  halo is exchanged at each resolution, never recomputed); dilated 'same' convolutions reach
  ``dilation x (kernel - 1) / 2`` rows; a 1-D transposed convolution (AutoencoderOobleck's
  upsampling) gets the input rows its band's outputs read and its output is cropped by ``stride``
  rows per halo row;
- operations with global reach are computed across the group: GroupNorm statistics from every
  band's count, mean and centred sum of squares (Chan's combination, float64); mid-block attention
  gathers K and V from every band (queries stay local);
- the decoder's output bands are gathered (every worker ends with the whole image).

The hooks are idle outside a band decode (``_PatchState.dim is None``), so a hooked module called
on its own computes as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from ..groups import Group
from .config import band_sizes, split_dim
from .plans import VaePlan

VAE_DECODER_HOOK = "ditserve_vae_decoder"
VAE_HALO_HOOK = "ditserve_vae_halo"
VAE_NORM_HOOK = "ditserve_vae_group_norm"
VAE_ATTENTION_HOOK = "ditserve_vae_attention"
EXACT_HOOKS = (VAE_DECODER_HOOK, VAE_HALO_HOOK, VAE_NORM_HOOK, VAE_ATTENTION_HOOK)


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
    """Rows a convolution reads beyond each output row, per spatial axis (-2, -1; -1 alone for a
    1-D convolution over time); refuses a convolution the halo exchange cannot make exact."""
    axes = (-1,) if isinstance(module, torch.nn.Conv1d) else (-2, -1)
    if hasattr(module, "_padding"):  # causal 3-D convs pad themselves: (w, w, h, h, 2t, 0)
        pads = {-1: module._padding[0], -2: module._padding[2]}
    else:
        pads = {axis: module.padding[axis] for axis in axes}
    kernel = module.kernel_size[-len(axes):]
    for axis, k in zip(axes, kernel):
        # a 'same' convolution: stride 1, its reach (dilated or not) padded equally on both sides
        ok = (module.stride[axis] == 1 and module.dilation[axis] * (k - 1) == 2 * pads[axis]
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


def _transposed_halo(module: torch.nn.ConvTranspose1d) -> int:
    """Input rows a 1-D transposed convolution needs from each neighbour so that its output over a
    band is exactly the full output's rows of that band; refuses one whose output does not tile
    its input's bands (output length = input length x stride needs kernel - 2 x padding = stride).

    Output row ``o`` sums input rows ``i`` with ``o + padding - kernel < i x stride <= o + padding``:
    the band's first output row reaches ``(kernel - padding - 1) // stride`` rows before the band,
    its last one ``(padding - 1) // stride + 1`` rows after it (none without padding)."""
    k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
    if k - 2 * p != s or module.dilation[0] != 1 or module.output_padding[0] != 0 or module.padding_mode != "zeros":
        raise ValueError(
            f"{type(module).__name__}(kernel={k}, stride={s}, padding={p}, output_padding={module.output_padding[0]}) "
            "does not map input bands onto output bands (kernel - 2 x padding must equal stride): no exact patch plan"
        )
    return max((k - p - 1) // s, (p - 1) // s + 1 if p else 0)


class _HaloTransposedConvHook(ModelHook):
    """Attaches neighbours' input rows before a 1-D transposed convolution (the upsampling of a
    1-D decoder) and crops the output rows they produced (``stride`` per input row)."""

    def __init__(self, group: Group, state: _PatchState, halo: int, stride: int) -> None:
        super().__init__()
        self.group, self.state, self.halo, self.stride = group, state, halo, stride

    def new_forward(self, module, x, *args, **kwargs):
        dim = self.state.dim
        if dim is None or self.halo == 0:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        x, before, after = exchange_halo(x, dim, self.halo, self.group)
        out = self.fn_ref.original_forward(x, *args, **kwargs)
        crop = before * self.stride
        return out.narrow(dim, crop, out.shape[dim] - crop - after * self.stride)


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
        # a 1-D decoder's input (B, C, T) is cut along time; an image's along its longer side
        dim = -1 if x.dim() == 3 else split_dim(x.shape[-2], x.shape[-1])
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


def apply_vae_patch_parallel(decoder: torch.nn.Module, plan: VaePlan, group: Group) -> None:
    """Hook a VAE decoder for the exact patch mode (see the module docstring)."""
    state = _PatchState()
    min_rows = 1
    attention = plan.attention()
    scale = 1  # rows per latent row at this point of the decoder (1-D transposed convs upsample)
    for module in decoder.modules():  # in call order for the decoders planned
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            halo = _conv_halo(module)
            if any(halo.values()):
                min_rows = max(min_rows, *(-(-h // scale) for h in halo.values()))
                HookRegistry.check_if_exists_or_initialize(module).register_hook(
                    _HaloConvHook(group, state, halo), VAE_HALO_HOOK)
        elif isinstance(module, torch.nn.ConvTranspose1d):
            halo = _transposed_halo(module)
            min_rows = max(min_rows, -(-halo // scale))
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                _HaloTransposedConvHook(group, state, halo, module.stride[0]), VAE_HALO_HOOK)
            scale *= module.stride[0]
        elif isinstance(module, torch.nn.GroupNorm):
            if not plan.group_norm:
                raise ValueError(f"{type(decoder).__name__} has a GroupNorm its plan does not declare")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_GroupNormHook(group, state), VAE_NORM_HOOK)
        elif isinstance(module, attention):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_AttentionHook(group, state), VAE_ATTENTION_HOOK)
    # the decoder's own hook goes last: it must run outermost
    HookRegistry.check_if_exists_or_initialize(decoder).register_hook(
        _DecoderBandHook(group, state, min_rows), VAE_DECODER_HOOK)
