"""VAE patch parallelism: M VAE workers (gloo, local processes) decode what one worker decodes
(exact mode, both families, M = 2 and 4, rows and columns, uneven bands, batches, video frames);
tiling spread over M workers equals one worker's tiling (images and video frames); removing the
hooks leaves a fresh VAE; bad options fail at start-up naming the option, too-small sizes fail
per request naming ``size``. The served graph with 2 VAE workers is checked in test_parallel.py,
in the same app as the served Ulysses layout (one deploy for both)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ditserve.deployments import Engine, EngineConfig, GenerationRequest, RequestError
from ditserve.deployments.local import run_processes
from ditserve.parallel.groups import Group
from ditserve.parallel.vae import (
    VAE_HOOKS,
    VAE_PARALLEL_HOOK,
    VaeConfig,
    VaeParallel,
    apply_vae_parallel,
    band_sizes,
    check_vae_config,
    remove_vae_parallel,
    vae_parallel_of,
)

pytestmark = pytest.mark.timeout(300)

FAMILIES = ("qwen-image", "flux")
# 80x48: a wide image, split by columns (10 latent columns: bands 3,3,2,2 for 4 workers);
# 48x96: a tall one, split by rows; n=2: a batch (sliced for M=4).
ITEMS = [dict(size="80x48", n=1, seed=1), dict(size="48x96", n=2, seed=2)]
TILED = dict(vae_use_tiling=True, vae_tile_size=32)
VIDEO_FRAMES = 3


def _packed_latents(engine: Engine, size: str, n: int, seed: int) -> torch.Tensor:
    """Random final latents in the family's packed layout (what the DiT hands the VAE)."""
    width, height = (int(v) for v in size.split("x"))
    vae = engine.adapter.components["vae"]
    channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim
    scale = engine.adapter.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, channels, height // scale, width // scale, generator=g)
    return engine.adapter.pipe._pack_latents(latents, n, channels, height // scale, width // scale)


def _request(item: dict) -> GenerationRequest:
    return GenerationRequest(prompt="x", size=item["size"], n=item["n"], seed=item["seed"])


def _video_latent(z_dim: int) -> torch.Tensor:
    return torch.randn(1, z_dim, VIDEO_FRAMES, 6, 5, generator=torch.Generator().manual_seed(9))


def _decode_all(engine: Engine) -> list[np.ndarray]:
    out = []
    for item in ITEMS:
        req = engine.resolve(_request(item))
        out.append(engine.postprocess(engine.decode(req, _packed_latents(engine, **item)), output_type="np"))
    return out


def _worker(paths: dict[str, str]) -> dict:
    """One of 4 local workers: for M = 2 (groups {0,1} and {2,3}) and M = 4, decode every item in
    exact mode (sliced at M = 4) and tiled, and a 3-frame latent with the Qwen VAE."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank makes both
    groups = {2: Group((0, 1) if rank < 2 else (2, 3), rank % 2, pairs[rank // 2]),
              4: Group((0, 1, 2, 3), rank, dist.group.WORLD)}
    out: dict = {}
    for family, path in paths.items():
        for m, group in groups.items():
            exact = EngineConfig(model=path, device="cpu", vae={"vae_patch_parallel_size": m,
                                                                "vae_use_slicing": m == 4})
            engine = Engine(exact, ["decode"], vae_group=group)
            sent = group.sent
            out[(family, m, "exact")] = _decode_all(engine)
            out[(family, m, "bytes")] = group.sent - sent
            tiled = EngineConfig(model=path, device="cpu", vae={"vae_patch_parallel_size": m, **TILED})
            tiled_engine = Engine(tiled, ["decode"], vae_group=group)
            out[(family, m, "tiled")] = _decode_all(tiled_engine)
            if family == "qwen-image":
                vae = engine.adapter.components["vae"]
                tiled_vae = tiled_engine.adapter.components["vae"]
                with torch.inference_mode():
                    out[(family, m, "video")] = vae.decode(_video_latent(vae.config.z_dim)).sample.numpy()
                    out[(family, m, "video_tiled")] = tiled_vae.decode(_video_latent(vae.config.z_dim)).sample.numpy()
    return out


@pytest.fixture(scope="module")
def single(tiny_checkpoints):
    """One worker's decodes: exact, tiled, and the video latent."""
    out = {}
    for family in FAMILIES:
        path = str(tiny_checkpoints[family])
        engine = Engine(EngineConfig(model=path, device="cpu"), ["decode"])
        out[(family, "exact")] = _decode_all(engine)
        tiled_engine = Engine(EngineConfig(model=path, device="cpu", vae=TILED), ["decode"])
        out[(family, "tiled")] = _decode_all(tiled_engine)
        if family == "qwen-image":
            vae = engine.adapter.components["vae"]
            tiled_vae = tiled_engine.adapter.components["vae"]
            with torch.inference_mode():
                out[(family, "video")] = vae.decode(_video_latent(vae.config.z_dim)).sample.numpy()
                out[(family, "video_tiled")] = tiled_vae.decode(_video_latent(vae.config.z_dim)).sample.numpy()
    return out


@pytest.fixture(scope="module")
def workers(tiny_checkpoints):
    return run_processes(4, _worker, {f: str(tiny_checkpoints[f]) for f in FAMILIES})


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_parallel_decode_matches_single_worker(workers, single, family, m):
    ranks = range(m) if m == 4 else (0, 1, 2, 3)  # two groups of 2 for M = 2
    for rank in ranks:
        for ref, got in zip(single[(family, "exact")], workers[rank][(family, m, "exact")]):
            assert got.shape == ref.shape
            assert float(np.abs(got - ref).max()) <= 1e-4, (family, m, rank)
        assert workers[rank][(family, m, "bytes")] > 0  # the workers did talk (halos, norms, K/V, bands)


@pytest.mark.parametrize("m", [2, 4])
def test_every_video_frame_decodes_with_the_same_split(workers, single, m):
    ref = single[("qwen-image", "video")]
    assert ref.shape[2] == 1 + 4 * (VIDEO_FRAMES - 1)  # the causal VAE upsamples time too
    for rank in range(4):
        assert float(np.abs(workers[rank][("qwen-image", m, "video")] - ref).max()) <= 1e-4


@pytest.mark.parametrize("m", [2, 4])
def test_video_tiles_over_workers_equal_one_worker_tiling(workers, single, m):
    ref = single[("qwen-image", "video_tiled")]
    assert ref.shape == single[("qwen-image", "video")].shape  # every frame came back
    assert not np.array_equal(ref, single[("qwen-image", "video")])  # tiling was really on
    for rank in range(4):  # each tile's frames share the decoder's frame cache: one worker decodes them all
        assert float(np.abs(workers[rank][("qwen-image", m, "video_tiled")] - ref).max()) <= 1e-5


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiles_over_workers_equal_one_worker_tiling_within_stated_psnr(workers, single, family, m):
    for i, (ref_tiled, ref_exact) in enumerate(zip(single[(family, "tiled")], single[(family, "exact")])):
        for rank in range(4):
            assert float(np.abs(workers[rank][(family, m, "tiled")][i] - ref_tiled).max()) <= 1e-5
        # Tiling is approximate: 32-pixel tiles on a random-weight VAE are its worst case (no
        # smoothness for the blend to hide); README reports the PSNR. It must still be an image
        # of the full decode, far from noise (~8 dB).
        assert _psnr(ref_tiled, ref_exact) >= 14.0, (family, i, _psnr(ref_tiled, ref_exact))
        assert not np.array_equal(ref_tiled, ref_exact)  # tiling was really on


def test_band_sizes_are_balanced_and_contiguous():
    assert band_sizes(10, 4) == [3, 3, 2, 2]
    assert band_sizes(8, 4) == [2, 2, 2, 2]
    assert sum(band_sizes(127, 4)) == 127 and max(band_sizes(127, 4)) - min(band_sizes(127, 4)) <= 1


@pytest.mark.parametrize(
    ("vae", "message"),
    [
        ({"vae_patch_parallel_size": 32}, r"vae_patch_parallel_size=32: the default size of model .* cannot be split: "
                                          r"128x128 has 16 latent rows .* \(at most 16 workers"),
        ({"vae_use_tiling": True, "vae_tile_size": 40}, r"vae_tile_size=40 must be a multiple of 32"),
        ({"vae_tile_size": 64}, r"vae_tile_size=64 is set but vae_use_tiling is off"),
    ],
)
def test_bad_vae_options_fail_at_start_up_naming_them(tiny_qwen, vae, message):
    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(model=str(tiny_qwen), device="cpu", vae=vae), ["decode"])


def test_vae_without_a_plan_is_refused_naming_the_option():
    import re

    from ditserve.parallel.vae.plans import VAE_PLANS

    assert {"AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderKLWan", "AutoencoderOobleck"} <= set(VAE_PLANS)
    with pytest.raises(ValueError, match=r"vae_patch_parallel_size=2: model m's VAE class AutoencoderNoPlan has no "
                                         r"patch-parallel/tiling plan \(classes with one: "
                                         + re.escape(", ".join(VAE_PLANS)) + r"\)"):
        check_vae_config(VaeConfig(vae_patch_parallel_size=2), "AutoencoderNoPlan", model="m",
                         default_size=(1024, 1024), vae_scale=8)


def test_patch_parallel_engine_needs_a_vae_group(tiny_flux):
    with pytest.raises(ValueError, match="vae_patch_parallel_size=2 needs a group of that many VAE workers"):
        Engine(EngineConfig(model=str(tiny_flux), device="cpu", vae={"vae_patch_parallel_size": 2}), ["decode"])


def test_too_small_size_is_refused_per_request_naming_size(tiny_flux):
    config = EngineConfig(model=str(tiny_flux), device="cpu", vae={"vae_patch_parallel_size": 4})
    engine = Engine(config, ["encode"])  # no VAE loaded: the check is the request's
    with pytest.raises(RequestError, match=r"size: 16x16 has 2 latent rows .* fewer than the vae_patch_parallel_size=4"):
        engine.resolve(GenerationRequest(prompt="x", size="16x16"))
    assert engine.resolve(GenerationRequest(prompt="x", size="32x16")).params.width == 32  # one row per worker


def test_tiling_alone_is_diffusers_tiled_decode(tiny_flux):
    engine = Engine(EngineConfig(model=str(tiny_flux), device="cpu", vae=TILED), ["decode"])
    vae = engine.adapter.components["vae"]
    assert vae.use_tiling and vae.tile_sample_min_size == 32 and vae.tile_latent_min_size == 4
    installed = vae_parallel_of(vae)  # the decode strategy is a hook on the VAE itself
    assert isinstance(installed, VaeParallel) and installed.tiles is None


def _vae_hook_names(vae: torch.nn.Module) -> set[str]:
    return {name for module in vae.modules() if hasattr(module, "_diffusers_hook") for name in module._diffusers_hook.hooks}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("vae_options", [{"vae_patch_parallel_size": 2, "vae_use_slicing": True},
                                         {"vae_patch_parallel_size": 2, **TILED}, TILED])
def test_remove_vae_parallel_restores_a_fresh_vae(tiny_checkpoints, family, vae_options):
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    cls = AutoencoderKLQwenImage if family == "qwen-image" else AutoencoderKL
    path = str(tiny_checkpoints[family])
    fresh, vae = (cls.from_pretrained(path, subfolder="vae").eval() for _ in range(2))
    settings = {k: v for k, v in vars(fresh).items() if k.startswith(("use_", "tile_"))}
    # installing talks to no one (only a decode would), so one process can hold a 2-worker group
    apply_vae_parallel(vae, VaeConfig(**vae_options), Group((0, 1), 0, None), 8)
    installed = _vae_hook_names(vae)
    assert VAE_PARALLEL_HOOK in installed and (len(installed) > 1 or vae_options == TILED)  # mode hooks too
    remove_vae_parallel(vae)
    assert not _vae_hook_names(vae) & set(VAE_HOOKS) and vae_parallel_of(vae) is None
    assert "tiled_decode" not in vars(vae)  # the tiled mode's per-instance hook point is gone
    assert {k: v for k, v in vars(vae).items() if k.startswith(("use_", "tile_"))} == settings
    channels = fresh.config.z_dim if family == "qwen-image" else fresh.config.latent_channels
    frames = (1,) if family == "qwen-image" else ()
    z = torch.randn(2, channels, *frames, 10, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(vae.decode(z).sample, fresh.decode(z).sample)
