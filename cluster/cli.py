"""The ``ditserve`` command line: ``models``, ``make-tiny``, ``generate``, ``run``, ``config``, ``quantize``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path

from .flags import FlagSet

logger = logging.getLogger("ditserve")


def _cmd_models(args: argparse.Namespace) -> int:
    from ditserve.deployments import implemented_families, list_specs

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
    from ditserve.deployments import make_tiny

    out = make_tiny(args.family, args.out, seed=args.seed)
    print(out)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ditserve.deployments import quantize_checkpoint

    quant = _flags().quant.build(args)
    out = quantize_checkpoint(args.model, args.out, quant)
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """In process: the reference runner, or, with parallel degrees, the same composition with the
    DiT ranks and VAE workers as local processes (``ParallelEngine``)."""
    if args.server:
        return _generate_remote(args)
    from tqdm import tqdm

    from ditserve.deployments import Engine, GenerationRequest, Modality, ParallelEngine, RequestError, encode_audio

    config = _engine_config(args)
    parallel = config.parallel.world_size > 1 or config.vae.parallel
    try:
        request = GenerationRequest.parse(_request_fields(args))
        engine = ParallelEngine(config) if parallel else Engine(config)
        resolved = engine.resolve(request)
    except RequestError as exc:
        print(f"error: {_flag_of(exc.field)}: {exc.message}", file=sys.stderr)
        return 2
    request = request.model_copy(update={"seed": resolved.seed})  # every rank draws the same noise
    bar = tqdm(total=resolved.params.num_inference_steps, desc="denoising", unit="step", file=sys.stderr,
               disable=config.parallel.world_size > 1)  # the ranks' steps are not reported across processes
    audio = engine.spec.modality == Modality.AUDIO
    result = engine.generate(request, output_type="np" if audio else "pil", callback=lambda step: bar.update(1))
    bar.close()

    paths = _output_paths(Path(args.output), len(result.images))
    for image, path in zip(result.images, paths):
        if audio:  # a clip: 16-bit WAV or FLAC by the output's suffix, as the HTTP route writes it
            fmt = "flac" if path.suffix.lower() == ".flac" else "wav"
            path.write_bytes(encode_audio(image, engine.spec.audio_sample_rate, fmt))
        else:
            image.save(path)
    for path in paths:
        print(f"wrote {path}")
    timings = "  ".join(f"{k}={v:.3f}s" for k, v in result.timings.items())
    print(f"model={result.model} seed={result.seed} request_id={result.request_id}")
    if parallel:
        print(f"layout={config.parallel.describe()}; {config.vae.describe()}")
    print(f"timings: {timings}  total={sum(result.timings.values()):.3f}s")
    _print_cache(result.cache)
    _print_lora(result.lora)
    return 0


def _flag_of(field: str) -> str:
    """The flag of a request field an error names (``lora.0.name`` is given by ``--lora``)."""
    if field.startswith("lora"):
        return "--lora" if field == "lora" else f"--lora ({field})"
    return "--" + field.replace("_", "-")


def _print_lora(stats: dict | None) -> None:
    if stats:
        counts = " ".join(f"{k}={stats[k]}" for k in ("loads", "hits", "restores", "evictions"))
        print(f"lora: {', '.join(stats['adapters'])} ({counts})")


def _print_cache(stats: dict | None) -> None:
    if stats:
        print(f"cache: {stats['backend']} blocks {stats['blocks_evaluated']}/{stats['blocks_total']} "
              f"(x{stats['block_ratio']} fewer) steps {stats['decisions']} (C computed, S skipped)")


def _request_fields(args: argparse.Namespace) -> dict:
    """The request fields given as flags (``--prompt``, ``--size``, ..., ``--lora``)."""
    fields = _flags().request.values(args)
    if getattr(args, "lora", None):
        fields["lora"] = lora_field(args.lora)
    return fields


def lora_field(values: list[str]) -> dict | list[dict]:
    """``--lora NAME[:SCALE]`` (repeatable) as the request's ``lora`` field: one adapter, or a list.

    Raises:
        ValueError: a value not of the form NAME or NAME:SCALE, naming ``--lora``.
    """
    out = []
    for value in values:
        name, sep, scale = value.rpartition(":") if ":" in value else (value, "", "")
        try:
            if not name or (sep and not scale):
                raise ValueError
            out.append({"name": name, "scale": float(scale) if sep else 1.0})
        except ValueError:
            raise ValueError(f"--lora: {value!r} is not NAME or NAME:SCALE (SCALE a number, default 1), "
                             "e.g. --lora my-style:0.8") from None
    return out[0] if len(out) == 1 else out


def _generate_remote(args: argparse.Namespace) -> int:
    """``generate --server URL``: the same request, through a running server's HTTP API."""
    from .client import ServerError, generate_images

    body = _request_fields(args)
    engine = _flags().engine.values(args)
    if "model" in engine:
        body["model"] = engine["model"]
    if "cache_backend" in engine or "cache_config" in engine:  # a client cannot change the server's
        # default: the flags become this request's `cache` field (backend "none", a backend, or knobs
        # merged over the server's)
        body["cache"] = {"backend": args.cache_backend, "config": engine.get("cache_config") or {}}
    try:
        images, reply = generate_images(args.server, body, output_format=_format_of(args.output),
                                        api_key=args.api_key)
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
    _print_lora(reply.get("lora"))
    return 0


def _format_of(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}.get(suffix, "png")


def _output_paths(out: Path, count: int) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def _engine_config(args: argparse.Namespace):
    """``EngineConfig`` from its flags, with ``parallel``, ``vae``, ``offload`` and ``lora`` from theirs."""
    f = _flags()
    return f.engine.build(args, parallel=f.parallel.build(args), vae=f.vae.build(args), offload=f.offload.build(args),
                          lora=f.lora.build(args), quant=f.quant.build(args), images=f.images.build(args))


def _stage(args: argparse.Namespace, stage: _StageFlags):
    scaling = stage.scaling.values(args)
    if "min_replicas" in scaling and "max_replicas" not in scaling:  # --dit-min-replicas 2 alone: 2..2
        scaling["max_replicas"] = max(scaling["min_replicas"], stage.scaling.base.max_replicas)
    return stage.options.build(args, autoscaling=stage.scaling.validate(scaling))


def _app_config(args: argparse.Namespace):
    f = _flags()
    return f.app.build(args, engine=_engine_config(args), **{s.field: _stage(args, s) for s in f.stages})


def _cmd_config(args: argparse.Namespace) -> int:
    from .serve_config import serve_config_yaml

    print(serve_config_yaml(_app_config(args), host=args.host or "0.0.0.0", port=args.port), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .server import run_server

    return run_server(_app_config(args), host=args.host or "127.0.0.1", port=args.port, blocking=True)


@dataclasses.dataclass(frozen=True)
class _StageFlags:
    field: str  # AppConfig's field (text_encoder, prior, dit, vae)
    options: FlagSet  # resources
    scaling: FlagSet  # replicas


@dataclasses.dataclass(frozen=True)
class _Flags:
    engine: FlagSet
    parallel: FlagSet
    vae: FlagSet
    offload: FlagSet
    lora: FlagSet
    quant: FlagSet
    images: FlagSet
    app: FlagSet
    stages: tuple[_StageFlags, ...]
    request: FlagSet


@functools.cache
def _flags() -> _Flags:
    """Every config flag, generated from the config models (``flags.py``): a new field of
    ``ParallelConfig``, ``VaeConfig``, ``OffloadConfig``, ``LoraConfig``, ``QuantizationConfig``, ``EngineConfig`` or
    ``AppConfig`` gets its flag by itself."""
    from ditserve.deployments import (
        AppConfig,
        AutoscalingOptions,
        EngineConfig,
        GenerationRequest,
        ImageInputConfig,
        LoraConfig,
        OffloadConfig,
        ParallelConfig,
        QuantizationConfig,
        VaeConfig,
    )

    nested = ("engine", "text_encoder", "prior", "dit", "vae", "router")  # objects with flags of their own
    stages = []
    for prefix, field, label in (("encoder", "text_encoder", "text encoder"), ("prior", "prior", "prior"),
                                 ("dit", "dit", "DiT"), ("vae", "vae", "VAE")):
        info = AppConfig.model_fields[field]
        default = info.get_default(call_default_factory=True)
        # max_ongoing_requests is no field of the DiT/VAE options (fixed at 1), so they get no flag
        resources = ("num_cpus", "num_gpus", "max_ongoing_requests", "max_queued_requests") + (
            ("worker_cpus",) if field not in ("text_encoder", "prior") else ()) + (
            "prompt_cache_mb", "max_batch_size", "batch_wait_timeout_s", "request_router")  # where the stage's options have them
        stages.append(_StageFlags(
            field,
            FlagSet(info.annotation, prefix, fields=resources, label=f"{label}: ", base=default),
            FlagSet(AutoscalingOptions, prefix, fields=("min_replicas", "max_replicas"), label=f"{label}: ",
                    base=default.autoscaling),
        ))
    return _Flags(
        engine=FlagSet(EngineConfig, exclude=("parallel", "vae", "offload", "lora", "quant", "images")),
        parallel=FlagSet(ParallelConfig),
        vae=FlagSet(VaeConfig),
        offload=FlagSet(OffloadConfig),
        lora=FlagSet(LoraConfig),
        quant=FlagSet(QuantizationConfig),
        images=FlagSet(ImageInputConfig),
        app=FlagSet(AppConfig, exclude=nested),
        stages=tuple(stages),
        request=FlagSet(GenerationRequest, exclude=("model", "lora", "cache", "images")),
    )


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    f = _flags()
    for flags in (f.engine, f.parallel, f.vae, f.offload, f.lora, f.quant, f.images):
        flags.add_to(p)


def _add_app_options(p: argparse.ArgumentParser) -> None:
    _add_engine_options(p)
    f = _flags()
    f.app.add_to(p)
    for stage in f.stages:
        stage.options.add_to(p)
        stage.scaling.add_to(p)
    p.add_argument("--host", help="HTTP host (run: 127.0.0.1 by default; config: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")


def build_parser() -> argparse.ArgumentParser:
    from ditserve.deployments import TINY_FAMILIES

    parser = argparse.ArgumentParser(prog="ditserve", description="Serving for diffusion transformers on Ray Serve.")
    parser.add_argument("--log-level", default=os.environ.get("DITSERVE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (diffusers format)")
    p.add_argument("--family", required=True, choices=TINY_FAMILIES)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("run", help="serve the app on a Ray cluster (local, or RAY_ADDRESS)")
    _add_app_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="write a Ray Serve config file (serve deploy / KubeRay RayService)")
    _add_app_options(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("quantize", help="write a copy of a diffusers folder with its DiT stored in FP8")
    p.add_argument("--model", required=True, help="registered model id or diffusers-format folder")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    _flags().quant.add_to(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("generate", help="generate in this process (the reference runner), or via --server")
    p.add_argument("--server", help="URL of a running server (e.g. http://127.0.0.1:8000); default: in process")
    p.add_argument("--api-key", help="with --server: the server's API key (sent as 'Authorization: Bearer')")
    _flags().request.add_to(p)
    p.add_argument("--lora", action="append", metavar="NAME[:SCALE]",
                   help="a LoRA adapter of --lora-dir (or of the server's) at SCALE (default 1); repeat to combine "
                   "several (a weighted sum)")
    _add_engine_options(p)
    p.add_argument("--output", default="out.png", help="image path (n>1: out-1.png, ...); an audio model writes "
                   "16-bit WAV, or FLAC for a .flac path")
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever downloaded at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ditserve.deployments import CheckpointError, FamilyNotImplementedError, ModelNotFoundError

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
