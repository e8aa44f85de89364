"""The offload options: one pydantic model, nested in ``EngineConfig`` as ``offload``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OffloadConfig(BaseModel):
    """Where a stage's weights wait while they are not computing, and how they come back.

    Two modes (they compose: model-level for the text encoder and VAE, layerwise for the DiT):

    - ``enable_cpu_offload`` (model-level): each stage's modules wait in (pinned) host memory and
      move to the device for the stage's call; stages sharing one GPU take turns (a per-GPU lease),
      so the GPU peak is the largest stage, not their sum.
    - ``enable_layerwise_offload``: the DiT's transformer blocks wait on the host; one group of
      ``offload_blocks_per_group`` blocks computes while the next is prefetched (a copy stream on
      CUDA), so at most two groups are on the device. Embedders, norms and output layers stay.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enable_cpu_offload: bool = Field(
        False, description="Model-level offload: every stage's modules wait in host memory and move to the "
        "device only for the stage's call; co-located stages take turns on the GPU.")
    enable_layerwise_offload: bool = Field(
        False, description="Layerwise offload of the DiT: blocks wait on the host, one group computes while the "
        "next is prefetched; non-block modules stay on the device.")
    offload_blocks_per_group: int = Field(
        1, ge=1, description="Layerwise: blocks moved together (at most twice this many are on the device).")
    offload_device: Literal["cpu", "disk"] = Field(
        "cpu", description="Layerwise: where offloaded blocks wait: 'cpu' (pinned host memory on CUDA) or 'disk' "
        "(safetensors files read through mmap, for hosts short of RAM).")
    offload_disk_dir: str | None = Field(
        None, description="Layerwise with offload_device='disk': folder for the block files (default: a "
        "temporary folder, removed when the model is unloaded).")
    offload_shard_host_copy: bool = Field(
        False, description="Layerwise under sequence parallel: each rank keeps 1/N of every block on the host "
        "and the sequence-parallel group all-gathers it before use (host memory per node drops N times).")
    offload_prefetch: bool = Field(
        True, description="Layerwise: prefetch the next group while the current one computes (a separate "
        "CUDA stream from pinned memory; on CPU the copy is made early, in order).")

    @property
    def enabled(self) -> bool:
        return self.enable_cpu_offload or self.enable_layerwise_offload
