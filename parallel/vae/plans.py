"""What each VAE class needs from the exact and tiled modes, declared as data (``VAE_PLANS``);
a class without a plan is refused at start-up.

Which mode is exact, per VAE class:

==========================  ===================================================  ==========================
VAE class                   exact patch parallel (M workers)                     tiled (1 or M workers)
==========================  ===================================================  ==========================
AutoencoderKL               exact: halo convs, GroupNorm stats reduced,          approximate (overlap 1/4,
                            mid-block attention with gathered K/V                linear blend)
AutoencoderKLQwenImage      exact: halo causal convs (and their frame cache),    approximate (overlap 1/4,
                            RMS norm is per position over channels (local),      linear blend)
                            mid-block attention with gathered K/V
AutoencoderKLWan            exact: as AutoencoderKLQwenImage (the same           approximate (overlap 1/4,
                            Wan2.1 decoder design)                               linear blend)
AutoencoderKLFlux2          exact: the AutoencoderKL decoder (halo convs,        approximate (overlap 1/4,
                            GroupNorm stats reduced, gathered K/V); its latent   linear blend)
                            batch-norm is undone by the adapter before decode
AutoencoderOobleck          exact: 1-D bands over time; halo (dilated) convs     none (refused: diffusers
                            and transposed-conv upsampling; Snake is pointwise,  has no tiled decode for
                            no norm or attention                                 it)
==========================  ===================================================  ==========================

A plan names only what differs between classes (which attention modules see the whole image,
whether GroupNorm must be reduced, how the tile side is set); the convolutions are found and
checked generically by the exact mode (``exact.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


def _kl_tiles(vae: torch.nn.Module, size: int, scale: int) -> None:
    vae.tile_sample_min_size = size
    vae.tile_latent_min_size = size // scale


def _qwen_tiles(vae: torch.nn.Module, size: int, scale: int) -> None:
    stride = size - size // 4  # the class's default ratio (256 / 192)
    vae.enable_tiling(size, size, stride, stride)


def _qwen_frames(decoder: torch.nn.Module) -> int:
    return 2 ** sum(decoder.temperal_upsample)  # diffusers' spelling


def _no_frames(decoder: torch.nn.Module) -> int:
    return 1


def _no_tiles(vae: torch.nn.Module, size: int, scale: int) -> None:
    raise ValueError(f"vae_use_tiling: {type(vae).__name__} has no tiled decode")


def _no_attention() -> tuple[type, ...]:
    return ()


def _qwen_attention() -> tuple[type, ...]:
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageAttentionBlock

    return (QwenImageAttentionBlock,)


def _wan_attention() -> tuple[type, ...]:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    return (WanAttentionBlock,)


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
        frame_scale: output frames per latent frame of a decoder call after a video's first (a
            causal video decoder turns the first latent frame into one frame); the tiled mode
            over M workers sizes the tiles it does not decode with it.
        tiling: whether diffusers has a tiled decode for the class (``vae_use_tiling``).
    """

    attention: Callable[[], tuple[type, ...]]
    group_norm: bool
    set_tile_size: Callable[[torch.nn.Module, int, int], None]
    exact: str
    frame_scale: Callable[[torch.nn.Module], int] = _no_frames
    tiling: bool = True


VAE_PLANS: dict[str, VaePlan] = {
    "AutoencoderKL": VaePlan(
        _kl_attention, True, _kl_tiles,
        "halo convs; GroupNorm statistics reduced over the group; mid-block attention over gathered K/V",
    ),
    "AutoencoderKLQwenImage": VaePlan(
        _qwen_attention, False, _qwen_tiles,
        "halo causal convs (frame cache included); RMS norm is per position (local); mid-block attention "
        "over gathered K/V", _qwen_frames,
    ),
    "AutoencoderKLWan": VaePlan(
        _wan_attention, False, _qwen_tiles,
        "Qwen-Image's VAE is Wan2.1's: halo causal convs (frame cache included); RMS norm is per position "
        "(local); mid-block attention over gathered K/V", _qwen_frames,
    ),
    "AutoencoderKLFlux2": VaePlan(
        _kl_attention, True, _kl_tiles,
        "AutoencoderKL's decoder: halo convs; GroupNorm statistics reduced over the group; mid-block attention "
        "over gathered K/V",
    ),
    "AutoencoderOobleck": VaePlan(
        _no_attention, False, _no_tiles,
        "1-D bands over time: halo convs (dilated ones reach dilation x 3 rows) and transposed-conv upsampling "
        "(neighbours' input rows, output cropped by the stride); Snake activations are pointwise",
        tiling=False,
    ),
}


def vae_plan(vae_class: type | str) -> VaePlan | None:
    """The plan of a VAE class (or of its nearest planned base class)."""
    names = [vae_class] if isinstance(vae_class, str) else [c.__name__ for c in vae_class.__mro__]
    return next((VAE_PLANS[n] for n in names if n in VAE_PLANS), None)
