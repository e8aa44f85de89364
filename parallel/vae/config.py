"""The VAE options (``VaeConfig``), the size rules they imply, the start-up check and the VAE
workers' group.

Sizes: the exact mode cuts the decoder's input into M contiguous bands along its longer spatial
axis (rows, or columns for a wide image), as equal as possible — the work per row is the same, so
equal rows are equal work. Each worker needs at least one latent row, so a request smaller than
that is refused (``size_error``, per request) and a deployment whose default size cannot be split
is refused at start-up (``check_vae_config``). Tiled mode decodes any size (a worker without a
tile idles).
"""

from __future__ import annotations

import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from ..groups import Group, checked_world_size
from .plans import VAE_PLANS, vae_plan


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


def band_sizes(n: int, parts: int) -> list[int]:
    """Rows per band: ``n`` split into ``parts`` contiguous bands as equal as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def split_dim(height: int, width: int) -> int:
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
    if config.vae_use_tiling and plan is not None and not plan.tiling:
        raise ValueError(f"vae_use_tiling: model {model}'s VAE class {name} has no tiled decode; "
                         "use vae_patch_parallel_size (exact) without tiling")
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
