"""The one app config: model, resources and scaling of every deployment.

``AppConfig`` is what ``ditserve run`` builds from its flags, what ``ditserve config`` writes into a
Serve config file (as the app's ``args``), and what ``build_app`` turns into a bound graph. Each
deployment's Ray options (actor resources, placement bundles, autoscaling) are derived from it, in
one place, so the test, the CLI and a KubeRay RayService all get the same placement. It is pure
data: what a running cluster can hold is checked by the builder (``placement.py``), not here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine import EngineConfig
from .security import split_keys


class AutoscalingOptions(BaseModel):
    """Ray Serve autoscaling of one deployment (``autoscaling_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero; adds a cold start).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default min_replicas).")
    target_ongoing_requests: float = Field(1.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="How long load must stay high before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long load must stay low before scaling down.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window over which load is averaged.")
    metrics_interval_s: float = Field(
        2.0, gt=0, description="How often callers' handles report queued requests (Ray marks it deprecated, but "
        "in 2.60 handles still push at this period; Ray's default of 10 s makes scaling slow)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class StageOptions(BaseModel):
    """Resources and scaling of one deployment.

    CPUs are fractional on purpose: on a 2-core machine every replica must fit (Ray's default is
    one whole CPU per replica). ``custom_resources`` pins a deployment to labelled nodes in a
    multi-node cluster (e.g. ``{"encoder_node": 0.01}``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(0.1, ge=0, description="CPUs of the replica (coordinator).")
    worker_cpus: float = Field(0.25, ge=0, description="CPUs of each worker actor (DiT and VAE ranks).")
    num_gpus: float = Field(
        1.0, ge=0, le=1, description="GPUs of each rank (or of the text encoder replica) when accelerator is gpu; "
        "below 1 shares a GPU (text encoder, VAE; DiT ranks need a whole GPU each for NCCL)."
    )
    custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources of the replica and of each worker."
    )
    max_ongoing_requests: int = Field(4, ge=1, description="Requests a replica holds at once.")
    max_queued_requests: int = Field(64, ge=-1, description="Requests queued per caller before 503 (-1: no limit).")
    autoscaling: AutoscalingOptions = Field(default_factory=AutoscalingOptions, description="Replica autoscaling.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Health check timeout.")


class TextEncoderOptions(StageOptions):
    """Resources and scaling of the TextEncoder deployment, and its prompt cache."""

    prompt_cache_mb: float = Field(
        64.0, ge=0, description="MiB of encoded prompts (and negative prompts) each TextEncoder replica keeps, least "
        "recently used out first: a repeated text skips the encoder (counted as prompt_hits/prompt_misses in the "
        "response's conditioning and ditserve_conditioning_cache_total); 0 disables it.",
    )


# Why the DiT and VAE deployments take one request at a time per replica.
ONE_AT_A_TIME = ("a replica runs one request at a time so that its workers' collectives (all-to-all, ring, "
                 "gather) of two requests never interleave")


class SequentialStageOptions(StageOptions):
    """Resources and scaling of the DiT or the VAE deployment. ``max_ongoing_requests`` is not an
    option: it is fixed at 1 (``ONE_AT_A_TIME``); scale with replicas instead."""

    max_ongoing_requests: ClassVar[int] = 1

    @model_validator(mode="before")
    @classmethod
    def _fixed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_ongoing_requests" in data:
            raise ValueError(f"max_ongoing_requests is fixed at 1 because {ONE_AT_A_TIME}")
        return data


class DitStageOptions(SequentialStageOptions):
    """Resources and scaling of the DiT deployment, and its request batching: a replica runs one
    batch at a time (``ONE_AT_A_TIME`` holds for batches); Serve lets up to ``max_batch_size``
    requests into a replica so that they can meet there."""

    max_batch_size: int = Field(
        1, ge=1, le=64, description="Most requests a DiT replica denoises together as one batch (1: batching off). "
        "Only requests that can share a forward batch (same size, frames, steps, guidance kind, LoRA set, text "
        "shapes; no cache, no input images); each keeps its own seed, CFG scale and negative prompt.",
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a DiT replica waits for more requests to fill a batch once one has come "
        "(with max_batch_size > 1).",
    )
    request_router: Literal["power_of_two", "least_cost"] = Field(
        "power_of_two", description="How callers pick a DiT replica: 'power_of_two' (Serve's default: the shorter "
        "queue of two, by request count) or 'least_cost' (the least queued work as this caller sent it: pixels x "
        "frames x steps x CFG branches x n; after LoRA multiplexing's preference).",
    )


class VideoJobsOptions(BaseModel):
    """The ``/v1/videos`` job store (the ``Jobs`` deployment, deployed for video models only): how
    many jobs it keeps and how long and how much of their results."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    result_ttl_s: float = Field(3600.0, gt=0, description="Seconds a finished job (and its video) is kept after it "
                                "ends; then GET answers 404.")
    max_result_bytes: int = Field(2 * 1024**3, gt=0, description="Bytes of results (MP4 + frames) kept in all; past "
                                  "it the oldest finished jobs are dropped first.")
    max_jobs: int = Field(1000, ge=1, description="Jobs kept (queued, running and finished); past it the oldest "
                          "finished job is dropped, and a new job is refused with 429 when none has finished.")
    max_seconds: float = Field(20.0, gt=0, description="Longest video a request may ask for, in seconds (also bounded "
                               "by the model's max_frames).")
    num_cpus: float = Field(0.1, ge=0, description="CPUs of the Jobs replica (MP4 encoding runs there).")


class AppConfig(BaseModel):
    """Everything the served app needs, as one validated object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(default_factory=EngineConfig, description="Model, device and dtype.")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="Whether DiT/VAE workers and the text encoder each take one GPU: 'auto' asks the "
        "Ray cluster whether it has GPUs.",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Placement strategy of each DiT/VAE replica's bundles."
    )
    distributed_timeout_s: float = Field(
        120.0, gt=0, description="Timeout of rendezvous and of one collective (a dead rank fails the request "
        "after this); not a request's deadline (request_timeout_s)."
    )
    request_timeout_s: float | None = Field(
        None, gt=0, description="A request's own deadline in the DiT and VAE replicas (None: none; video runs for "
        "minutes). Past it every rank is aborted at its next step and the request fails with 504. Separate from "
        "distributed_timeout_s, which bounds one collective.",
    )
    max_timeout_s: float = Field(
        600.0, gt=0, description="Largest timeout_s a request may ask for (422 naming timeout_s above it). A "
        "request's timeout_s covers its queues and every stage; past it the stage calls are cancelled (the DiT's "
        "ranks stop at their next step) and the answer is 504.",
    )
    max_request_cost: float | None = Field(
        None, gt=0, description="Budget of one request: n x width x height x frames x steps x CFG branches "
        "(2 when the negative branch runs). A request above it is refused with 422 naming the budget and the field "
        "to lower (None: no budget). E.g. 1024x1024, 50 steps, CFG: 1.05e8.",
    )
    text_encoder: TextEncoderOptions = Field(
        default_factory=lambda: TextEncoderOptions(num_cpus=0.2, max_ongoing_requests=16),
        description="TextEncoder deployment.",
    )
    prior: StageOptions = Field(
        default_factory=lambda: StageOptions(num_cpus=0.2, max_ongoing_requests=4),
        description="Prior deployment: the autoregressive prior of models that have one (GLM-Image); not "
        "deployed for the others. A replica generates one request at a time (the seed drives torch's generator).",
    )
    dit: DitStageOptions = Field(
        default_factory=DitStageOptions, description="DiT deployment (one request, or one batch of max_batch_size "
        "requests, at a time per replica)."
    )
    vae: SequentialStageOptions = Field(
        default_factory=SequentialStageOptions, description="VAE deployment (one request at a time per replica)."
    )
    router: StageOptions = Field(
        default_factory=lambda: StageOptions(num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256),
        description="Router (ingress) deployment.",
    )
    encode_batch_size: int = Field(8, ge=1, description="Most prompts the text encoder batches at once.")
    encode_batch_wait_s: float = Field(0.005, ge=0, description="How long the text encoder waits to fill a batch.")
    max_request_bytes: int = Field(1_000_000, gt=0, description="Largest HTTP body accepted (413 beyond).")
    video_jobs: VideoJobsOptions = Field(
        default_factory=VideoJobsOptions, description="Video models: the /v1/videos job store (results kept, budget)."
    )
    api_key: tuple[str, ...] = Field(
        (), json_schema_extra={"repeatable": True},
        description="API key(s) the HTTP routes require as 'Authorization: Bearer <key>' (repeat the flag, or "
        "separate with commas; /health stays open; none: every route is open). Stored as 'sha256:<hex>' digests "
        "only, so the config file and logs never hold a key in clear; a value already of that form is kept.",
    )
    api_key_file: str | None = Field(
        None, description="File of API keys, one per line (blank lines and '#' comments skipped), read by each "
        "Router replica at start (a mounted secret on a cluster), in addition to api_key.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT (`ditserve run`) or a redeploy: how long in-flight requests "
        "may finish before the replicas are stopped.",
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _digests(cls, value: Any) -> tuple[str, ...]:
        return split_keys(value)

    @model_validator(mode="before")
    @classmethod
    def _sequential(cls, data: Any) -> Any:
        """Name the option in full when a config (e.g. an older serve file) still sets it."""
        if isinstance(data, dict):
            for name in ("dit", "vae"):
                if isinstance(data.get(name), dict) and "max_ongoing_requests" in data[name]:
                    raise ValueError(f"{name}.max_ongoing_requests is fixed at 1 because {ONE_AT_A_TIME}; "
                                     f"remove it (scale with {name}.autoscaling instead)")
        return data

    @model_validator(mode="after")
    def _dit_whole_gpus(self) -> AppConfig:
        if self.dit.num_gpus not in (0.0, 1.0):
            raise ValueError(f"dit.num_gpus={self.dit.num_gpus}: each DiT rank needs a whole GPU (1) for NCCL")
        return self

    @property
    def dit_world_size(self) -> int:
        """DiT ranks per replica: the product of the parallel degrees (``engine.parallel``)."""
        return self.engine.parallel.world_size

    @property
    def vae_world_size(self) -> int:
        """VAE workers per replica: ``engine.vae.vae_patch_parallel_size``."""
        return self.engine.vae.vae_patch_parallel_size
