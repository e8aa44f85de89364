"""The stage composition, one function for every caller: TextEncoder (and Prior, and the VAE's
encode of input images) -> DiT -> VAE.

The Router (synchronous requests) and the Jobs deployment (video jobs) both call ``compose``: the
stages' ``DeploymentResponse``s are passed on unawaited, so the conditioning and the latents travel
through the object store once, replica to replica, and only the VAE's reply is awaited.

Cancellation: when the awaiting coroutine is cancelled (a client disconnect, a cancelled handle
call, a deleted job), every stage call of the request is cancelled explicitly. Serve then cancels
the DiT and VAE coordinators' handlers, which abort their ranks at the next step
(``RayExecutor.call_all_async``). Serve 2.60 cancels an ingress request's child calls itself only
for gRPC and direct ingress (``replica._on_request_cancelled``); this makes it hold for every path.

Overload: a stage call refused by Serve's ``max_queued_requests`` (``BackPressureError``, which does
not say whose queue was full) surfaces from the last awaited reply; ``compose`` finds the stage
whose call was refused and raises ``overload.StageBusy`` naming it (HTTP 429).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from .overload import StageBusy

from .schema import ResolvedRequest
from .stages import Decoded


@dataclasses.dataclass(frozen=True)
class StageHandles:
    """The handles of one app's model stages (``prior`` only for models with an autoregressive prior)."""

    encoder: DeploymentHandle
    dit: DeploymentHandle
    vae: DeploymentHandle
    prior: DeploymentHandle | None = None


async def compose(stages: StageHandles, resolved: ResolvedRequest, return_latents: bool = False,
                  progress_key: str | None = None) -> Decoded:
    """Run one resolved request through the stages; only the last reply is awaited.

    Args:
        progress_key: when set, the DiT coordinator reports rank 0's step count under this key to
            the Jobs deployment (``Jobs.report``): a job's id, or a synchronous request's id.
    """
    encoded = stages.encoder.encode.remote(resolved)
    prior = stages.prior.generate.remote(resolved) if stages.prior is not None else None
    # input images (editing) go to the TextEncoder (read with the prompt, in ``encoded``) and to the
    # VAE's ``encode`` (latents) side by side with the prior; later stages get the request without
    # its pixels (read already)
    images = stages.vae.encode.remote(resolved) if resolved.images else None
    lean = dataclasses.replace(resolved, images=()) if resolved.images else resolved
    # multiplexing: Serve prefers a DiT replica that holds the first adapter (the others
    # follow it: a client that combines adapters tends to combine the same ones)
    dit = stages.dit.options(multiplexed_model_id=resolved.lora[0].name) if resolved.lora else stages.dit
    extra: dict[str, Any] = {"progress_key": progress_key} if progress_key else {}
    denoised = dit.denoise.remote(lean, encoded, prior, images, **extra)
    decoded = stages.vae.decode.remote(lean, denoised, return_latents)
    try:
        return await decoded
    except asyncio.CancelledError:
        for response in (decoded, denoised, prior, images, encoded):
            if response is not None:
                response.cancel()
        raise
    except BackPressureError as exc:
        calls = {"TextEncoder": encoded, "Prior": prior, "VAE": images, "DiT": denoised}
        stage = next((name for name, r in calls.items() if r is not None and _refused(r)), "VAE")
        for response in (decoded, denoised, prior, images, encoded):
            if response is not None:
                response.cancel()
        raise StageBusy(stage, str(exc)) from None


def _refused(response: Any) -> bool:
    """Whether Serve refused this call for backpressure. Serve 2.60 keeps the assignment's future
    on the response (private; untested: the Router's own bound refuses first in the tests): done
    with BackPressureError."""
    future = getattr(response, "_replica_result_future", None)
    try:
        return future is not None and future.done() and isinstance(future.exception(), BackPressureError)
    except BaseException:  # noqa: BLE001 - cancelled, or another loop's future
        return False
