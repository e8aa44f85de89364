"""The ``ditserve`` command line: ``models``, ``make-tiny``, ``generate``, ``run``, ``config``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("ditserve")


def _cmd_models(args: argparse.Namespace) -> int:
    from ditserve.models import implemented_families, list_specs

    implemented = set(implemented_families())
    # FEATURES: what runs (declared and verified by the family's adapter); SEED: the seed table's row
    rows = [("MODEL", "FAMILY", "OUTPUT", "STEPS", "GUIDANCE", "SIZE (default/multiple/max)", "READY", "FEATURES",
             "SEED")]
    for s in list_specs():
        scale = s.true_cfg_scale if s.true_cfg_scale is not None else s.guidance_scale
        rows.append((
            s.id,
            s.family,
            s.modality.value,
            str(s.num_inference_steps),
            f"{s.guidance.value}={scale}" if scale is not None else s.guidance.value,
            f"{s.default_width}x{s.default_height}/{s.size_multiple}/{s.max_size}",
            "yes" if s.family in implemented else "no",
            ",".join(sorted(f.value for f in s.features)) or "-",
            ",".join(sorted(f.value for f in s.seed_features)) or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from ditserve.models.tiny import make_tiny

    out = make_tiny(args.family, args.out, seed=args.seed)
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """In process: the reference runner, or, with parallel degrees, the same composition with the
    DiT ranks and VAE workers as local processes (``ParallelEngine``)."""
    if args.server:
        return _generate_remote(args)
    from tqdm import tqdm

    from ditserve.deployments import Engine, EngineConfig, GenerationRequest, ParallelEngine, RequestError

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, parallel=_parallel(args),
                          vae=_vae(args), **_cache(args))
    parallel = config.parallel.world_size > 1 or config.vae.parallel
    try:
        request = GenerationRequest.parse(_request_fields(args))
        engine = ParallelEngine(config) if parallel else Engine(config)
        resolved = engine.resolve(request)
    except RequestError as exc:
        print(f"error: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    request = request.model_copy(update={"seed": resolved.seed})  # every rank draws the same noise
    bar = tqdm(total=resolved.params.num_inference_steps, desc="denoising", unit="step", file=sys.stderr,
               disable=config.parallel.world_size > 1)  # the ranks' steps are not reported across processes
    result = engine.generate(request, callback=lambda step: bar.update(1))
    bar.close()

    paths = _output_paths(Path(args.output), len(result.images))
    for image, path in zip(result.images, paths):
        image.save(path)
    for path in paths:
        print(f"wrote {path}")
    timings = "  ".join(f"{k}={v:.3f}s" for k, v in result.timings.items())
    print(f"model={result.model} seed={result.seed} request_id={result.request_id}")
    if parallel:
        print(f"layout={config.parallel.describe()}; {config.vae.describe()}")
    print(f"timings: {timings}  total={sum(result.timings.values()):.3f}s")
    _print_cache(result.cache)
    return 0


def _print_cache(stats: dict | None) -> None:
    if stats:
        print(f"cache: {stats['backend']} blocks {stats['blocks_evaluated']}/{stats['blocks_total']} "
              f"(x{stats['block_ratio']} fewer) steps {stats['decisions']} (C computed, S skipped)")


def _request_fields(args: argparse.Namespace) -> dict:
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "n": args.n,
        "size": args.size,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "true_cfg_scale": args.true_cfg_scale,
        "seed": args.seed,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _generate_remote(args: argparse.Namespace) -> int:
    """``generate --server URL``: the same request, through a running server's HTTP API."""
    from .client import ServerError, generate_images

    body = _request_fields(args)
    if args.model_given:
        body["model"] = args.model
    cache = _cache(args)
    if cache or args.cache_backend == "none":  # a client cannot change the server's default: the flags
        # become this request's `cache` field
        body["cache"] = {"backend": args.cache_backend, "config": cache.get("cache_config", {})}
    try:
        images, reply = generate_images(args.server, body, output_format=_format_of(args.output))
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = _output_paths(Path(args.output), len(images))
    for data, path in zip(images, paths):
        path.write_bytes(data)
        print(f"wrote {path}")
    timings = "  ".join(f"{k}={v:.3f}s" for k, v in reply["timings"].items())
    print(f"model={reply['model']} seed={reply['seed']} request_id={reply['request_id']}")
    print(f"timings: {timings}")
    _print_cache(reply.get("cache"))
    return 0


def _format_of(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}.get(suffix, "png")


def _output_paths(out: Path, count: int) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def _app_config(args: argparse.Namespace):
    from ditserve.deployments.config import AppConfig, AutoscalingOptions

    def scaling(prefix: str) -> dict:
        lo, hi = getattr(args, f"{prefix}_min_replicas"), getattr(args, f"{prefix}_max_replicas")
        return {"autoscaling": AutoscalingOptions(min_replicas=lo, max_replicas=max(lo, hi))}

    return AppConfig(
        engine={"model": args.model, "device": args.device, "dtype": args.dtype, "parallel": _parallel(args),
                "vae": _vae(args), **_cache(args)},
        accelerator=args.accelerator,
        placement_strategy=args.placement_strategy,
        text_encoder={"num_cpus": 0.2, "max_ongoing_requests": 16, **scaling("encoder")},
        dit={"max_ongoing_requests": 1, **scaling("dit")},
        vae={"max_ongoing_requests": 1, **scaling("vae")},
    )


def _cmd_config(args: argparse.Namespace) -> int:
    from .serve_config import serve_config_yaml

    print(serve_config_yaml(_app_config(args), host=args.host or "0.0.0.0", port=args.port), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .server import run_server

    return run_server(_app_config(args), host=args.host or "127.0.0.1", port=args.port, blocking=True)


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ulysses-degree", type=int, default=1, help="Ulysses sequence parallel degree")
    p.add_argument("--ring-degree", type=int, default=1, help="Ring attention degree")
    p.add_argument("--cfg-parallel-size", type=int, default=1, choices=[1, 2], help="CFG branches on 2 rank sets")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="tensor parallel degree")


def _add_vae_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae-patch-parallel-size", type=int, default=1,
                   help="VAE workers decoding one image together (exact patches; tiles with --vae-use-tiling)")
    p.add_argument("--vae-use-tiling", action="store_true", help="decode in overlapping blended tiles (approximate)")
    p.add_argument("--vae-use-slicing", action="store_true", help="decode the images of a batch one at a time")
    p.add_argument("--vae-tile-size", type=int, help="tile side in pixels with --vae-use-tiling (default: the VAE's)")


def _vae(args: argparse.Namespace) -> dict:
    vae = {
        "vae_patch_parallel_size": args.vae_patch_parallel_size,
        "vae_use_tiling": args.vae_use_tiling,
        "vae_use_slicing": args.vae_use_slicing,
    }
    return vae if args.vae_tile_size is None else {**vae, "vae_tile_size": args.vae_tile_size}


def _parallel(args: argparse.Namespace) -> dict:
    return {
        "ulysses_degree": args.ulysses_degree,
        "ring_degree": args.ring_degree,
        "cfg_parallel_size": args.cfg_parallel_size,
        "tensor_parallel_size": args.tensor_parallel_size,
    }


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-backend", choices=["tea_cache", "cache_dit", "none"],
                   help="cache acceleration of the DiT (requests may override it with their `cache` field)")
    p.add_argument("--cache-config", help='knobs of the cache backend as JSON, e.g. \'{"rel_l1_thresh": 0.2}\'')


def _cache(args: argparse.Namespace) -> dict:
    """``cache_backend``/``cache_config`` from the flags (empty when none given)."""
    import json

    out: dict = {}
    if args.cache_backend and args.cache_backend != "none":
        out["cache_backend"] = args.cache_backend
    if args.cache_config:
        try:
            config = json.loads(args.cache_config)
        except ValueError as exc:
            raise ValueError(f"--cache-config is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError("--cache-config must be a JSON object, e.g. '{\"rel_l1_thresh\": 0.2}'")
        out["cache_config"] = config
    if args.cache_backend == "none" and "cache_config" in out:
        raise ValueError("--cache-config given with --cache-backend none")
    return out


def _add_app_options(p: argparse.ArgumentParser) -> None:
    _add_parallel_options(p)
    _add_cache_options(p)
    _add_vae_options(p)
    from ditserve.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered id or diffusers folder (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cpu"],
                   help="give each text encoder replica, DiT rank and VAE worker a GPU (auto: if the cluster has GPUs)")
    p.add_argument("--placement-strategy", default="STRICT_PACK", choices=["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"])
    p.add_argument("--host", help="HTTP host (run: 127.0.0.1 by default; config: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    for prefix, name in (("encoder", "text encoder"), ("dit", "DiT"), ("vae", "VAE")):
        p.add_argument(f"--{prefix}-min-replicas", type=int, default=1, help=f"{name} replicas, lower bound")
        p.add_argument(f"--{prefix}-max-replicas", type=int, default=1, help=f"{name} replicas, upper bound (autoscaling)")


def build_parser() -> argparse.ArgumentParser:
    from ditserve.models import DEFAULT_MODEL
    from ditserve.models.tiny import FAMILIES

    parser = argparse.ArgumentParser(prog="ditserve", description="Serving for diffusion transformers on Ray Serve.")
    parser.add_argument("--log-level", default=os.environ.get("DITSERVE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (diffusers format)")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("run", help="serve the app on a Ray cluster (local, or RAY_ADDRESS)")
    _add_app_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="write a Ray Serve config file (serve deploy / KubeRay RayService)")
    _add_app_options(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("generate", help="generate in this process (the reference runner), or via --server")
    p.add_argument("--model", default=None, help=f"registered id or diffusers folder (default {DEFAULT_MODEL})")
    p.add_argument("--server", help="URL of a running server (e.g. http://127.0.0.1:8000); default: in process")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--n", type=int, help="number of images (default 1)")
    p.add_argument("--num-inference-steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--true-cfg-scale", type=float)
    p.add_argument("--seed", type=int, help="seed, as torch.Generator('cpu').manual_seed in diffusers")
    _add_parallel_options(p)
    _add_cache_options(p)
    _add_vae_options(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", default="out.png", help="image path (n>1: out-1.png, ...)")
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever downloaded at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from ditserve.models import DEFAULT_MODEL

        args.model_given = args.model is not None
        args.model = args.model or DEFAULT_MODEL
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ditserve.models import CheckpointError, FamilyNotImplementedError, ModelNotFoundError

    try:
        return args.func(args)
    except (ModelNotFoundError, FamilyNotImplementedError, CheckpointError, ValueError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: Exception) -> str:
    """A config error in one line (pydantic's own text names the model, not the option)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            loc = ".".join(str(p) for p in err["loc"])
            parts.append(msg if not loc or msg.startswith(loc) else f"{loc}: {msg}")
        return "; ".join(parts)
    return str(exc)
