"""VAE patch parallelism: per-worker peak activation memory and wall time, 1 worker vs M.

Realistically sized VAEs with random weights (FLUX.1's AutoencoderKL: 128/256/512/512 channels,
2 resnets per level, 32 norm groups, 16 latent channels; Qwen-Image's AutoencoderKLQwenImage:
base 96, multipliers 1/2/4/4, 2 resnets per level, z 16), decoding one image of 1024² and 2048²
in the exact patch mode (``parallel/vae/exact.py``). The Wan2.2 video VAEs (``--vaes
AutoencoderKLWan AutoencoderKLWan2.2 --sizes 1280x720 --frames 81``): A14B's ``AutoencoderKLWan``
(Wan2.1's: base 96, z 16, 8x spatial) and TI2V-5B's (base 160, decoder base 256, z 48, residual,
2x2-patchified output, 16x spatial), decoding ``--frames`` frames (4k + 1) of a WxH video.

Peak memory: on GPU ``torch.cuda.max_memory_allocated`` minus the weights; on CPU a
``TorchDispatchMode`` that tracks the bytes of live tensor storages created during the decode
(each new storage is counted once when an op returns it and released by a weakref finalizer when
it dies; views share their storage): the activations' peak, without allocator caching or
kernel-internal scratch buffers.

Two ways to run:

- real (default): M local processes joined by gloo (NCCL, one GPU each, when there are M GPUs);
  wall time of the decode as rank 0 sees it. On a CPU, each worker gets
  ``DITSERVE_LOCAL_THREADS`` threads (default 1): give every worker its own cores
  (M x threads <= cores) or the wall time measures contention, not parallelism.
- ``--shape-only``: the same hooks on the ``meta`` device (shapes, no arithmetic) in one
  process, one simulated worker at a time (collectives only allocate their outputs): exact
  activation peaks per worker for sizes too slow to compute here, no times.

    python benchmarks/vae_parallel.py --sizes 1024 --workers 1 2 4
    python benchmarks/vae_parallel.py --shape-only --sizes 1024 2048 --workers 1 2 4
    python benchmarks/vae_parallel.py --vaes AutoencoderKLWan --sizes 256x160 --frames 5 --workers 1 2 4
    python benchmarks/vae_parallel.py --shape-only --vaes AutoencoderKLWan AutoencoderKLWan2.2 --sizes 1280x720 \
        --frames 81 --workers 1 2 4

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VAES = {
    "AutoencoderKL": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
    ),
    "AutoencoderKLQwenImage": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   temperal_downsample=[False, True, True]),
    # Wan2.2 A14B (T2V, I2V): the Wan2.1 VAE's config.json
    "AutoencoderKLWan": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True]),
    # Wan2.2 TI2V-5B: its VAE's config.json
    "AutoencoderKLWan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4),
}
CLASSES = {"AutoencoderKLWan2.2": "AutoencoderKLWan"}  # label -> diffusers class (default: the label)
SCALES = {"AutoencoderKLWan2.2": 16}  # pixels per latent row (default 8)
VIDEO = ("AutoencoderKLWan", "AutoencoderKLWan2.2")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._release, key)
        return out


def _make_vae(name: str, device: str) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        return getattr(diffusers, CLASSES.get(name, name))(**VAES[name]).eval()


def _scale(name: str) -> int:
    return SCALES.get(name, 8)


def _latent(name: str, size: tuple[int, int], device: str, frames: int = 1) -> torch.Tensor:
    """The latent of a (width, height) output: one image, or ``frames`` video frames (Wan)."""
    g = torch.Generator().manual_seed(1)
    width, height = size
    h, w = height // _scale(name), width // _scale(name)
    z = VAES[name].get("z_dim", VAES[name].get("latent_channels"))
    latent_frames = (frames - 1) // 4 + 1 if name in VIDEO else 1
    shape = (1, z, h, w) if name == "AutoencoderKL" else (1, z, latent_frames, h, w)
    if device == "meta":
        return torch.empty(shape, device="meta")
    return torch.randn(shape, generator=g).to(device)


def _size(text: str) -> tuple[int, int]:
    """'1024' (square) or 'WIDTHxHEIGHT'."""
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def _decode_measured(vae: torch.nn.Module, z: torch.Tensor) -> tuple[int, float]:
    with torch.inference_mode():
        if z.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            vae.decode(z)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, time.perf_counter() - start
        tracker = LiveBytes()
        start = time.perf_counter()
        with tracker:
            vae.decode(z)
        return tracker.peak, time.perf_counter() - start


def _real_worker(payload: tuple[str, int, int, str]) -> dict[str, Any]:
    import torch.distributed as dist

    from ditserve.parallel.vae import VaeConfig, apply_vae_parallel, build_vae_group

    name, size, m, device, frames = payload
    if device == "cuda":
        device = f"cuda:{dist.get_rank()}"
    vae = _make_vae(name, device)
    config = VaeConfig(vae_patch_parallel_size=m)
    apply_vae_parallel(vae, config, build_vae_group(config) if m > 1 else None, _scale(name))
    peak, seconds = _decode_measured(vae, _latent(name, size, device, frames))
    return {"peak_bytes": peak, "seconds": seconds}


class _SimulatedGroup:
    """One worker's view of an M-worker group in one process: collectives allocate and return
    outputs of the right shape (contents meaningless; used on the meta device only)."""

    def __init__(self, rank: int, size: int) -> None:
        from ditserve.parallel.groups import Group

        self.group = Group(tuple(range(size)), rank, None)
        self.group.all_gather = lambda t: [torch.empty_like(t) for _ in range(size)]  # type: ignore[method-assign]
        self.group.exchange = lambda send, recv: None  # type: ignore[method-assign]


def _shape_only(name: str, size: tuple[int, int], m: int, frames: int) -> list[int]:
    from ditserve.parallel.vae import VaeConfig, apply_vae_parallel

    peaks = []
    for rank in range(m):
        vae = _make_vae(name, "meta")
        group = _SimulatedGroup(rank, m).group if m > 1 else None
        apply_vae_parallel(vae, VaeConfig(vae_patch_parallel_size=m), group, _scale(name))
        peaks.append(_decode_measured(vae, _latent(name, size, "meta", frames))[0])
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vaes", nargs="+", default=list(VAES), choices=list(VAES))
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(1024, 1024), (2048, 2048)],
                        help="outputs, '1024' (square) or 'WIDTHxHEIGHT'")
    parser.add_argument("--frames", type=int, default=17, help="video VAEs: frames decoded (k x 4 + 1)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--shape-only", action="store_true", help="meta device: activation peaks only, no times")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    from ditserve.deployments.local import run_processes

    results = []
    for name in args.vaes:
        for size in args.sizes:
            base: dict[str, Any] | None = None
            for m in args.workers:
                row: dict[str, Any] = {"vae": name, "size": f"{size[0]}x{size[1]}", "workers": m}
                if name in VIDEO:
                    row["frames"] = args.frames
                if args.shape_only:
                    peaks = _shape_only(name, size, m, args.frames)
                    row["peak_mib_per_worker"] = [round(p / 2**20, 1) for p in peaks]
                else:
                    backend = "nccl" if args.device == "cuda" else "gloo"
                    if args.device == "cuda" and torch.cuda.device_count() < m:
                        row["skipped"] = f"needs {m} GPUs"
                        results.append(row)
                        continue
                    out = run_processes(m, _real_worker, (name, size, m, args.device, args.frames), backend=backend)
                    row["peak_mib_per_worker"] = [round(o["peak_bytes"] / 2**20, 1) for o in out]
                    row["seconds"] = round(max(o["seconds"] for o in out), 3)
                if base is None and m == 1:
                    base = row
                if base is not None:
                    row["peak_ratio_vs_1"] = round(max(row["peak_mib_per_worker"]) / max(base["peak_mib_per_worker"]), 3)
                    if "seconds" in row:
                        row["speedup_vs_1"] = round(base["seconds"] / row["seconds"], 3)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    print(json.dumps({
        "benchmark": "vae_parallel",
        "mode": "shape-only (meta device)" if args.shape_only else f"real ({args.device})",
        "threads_per_worker": int(os.environ.get("DITSERVE_LOCAL_THREADS", "1")),
        "cpu_cores": os.cpu_count(),
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" and not args.shape_only
        else "peak live tensor-storage bytes (TorchDispatchMode)",
        "results": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
