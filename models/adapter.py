"""The family adapter interface: the steps of the served path as separate calls.

    encode_prompt -> prepare (latents, timesteps) -> [predict_noise -> scheduler_step]* -> decode
    -> postprocess

A family adapter is built on its diffusers pipeline: the adapter holds a *helper pipeline*
instance made of whichever components this stage loaded (the others are ``None``) and calls its
own methods (``encode_prompt``, ``prepare_latents``, ``_unpack_latents``, ``image_processor``)
and the module's helper functions (``calculate_shift``, ``retrieve_timesteps``), so no model math
is written here. Only the denoising loop is ours, because it carries the extension points:

- ``adapter.transformer`` is the module features hook into (diffusers ``HookRegistry``);
  every call runs inside ``transformer.cache_context(branch)`` and our ``step_context``;
- ``adapter.cfg_strategy`` decides how the CFG branches are computed (serially here; in
  parallel across ranks by ``parallel/``);
- ``DenoiseState`` carries all per-request state, including a per-request scheduler copy.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from .context import step_context
from .loading import CheckpointInfo, load_component, read_checkpoint

logger = logging.getLogger(__name__)

Stage = str  # "encode" | "denoise" | "decode"
STAGES: tuple[Stage, ...] = ("encode", "denoise", "decode")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the denoiser (already validated and defaulted)."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    num_images_per_prompt: int = 1


@dataclasses.dataclass
class TextConditioning:
    """Encoder output, as keyword arguments of the family's transformer.

    Attributes:
        positive: transformer kwargs for the prompt branch (e.g. ``encoder_hidden_states``).
        negative: the same for the negative prompt, or ``None`` when CFG is off.
        batch_size: number of prompts (before ``num_images_per_prompt``).
    """

    positive: dict[str, torch.Tensor | None]
    negative: dict[str, torch.Tensor | None] | None
    batch_size: int

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        def move(kw: dict[str, torch.Tensor | None] | None) -> dict[str, torch.Tensor | None] | None:
            if kw is None:
                return None
            out = {}
            for k, v in kw.items():
                if v is not None:
                    v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                out[k] = v
            return out

        return TextConditioning(move(self.positive), move(self.negative), self.batch_size)


@dataclasses.dataclass
class DenoiseState:
    """Everything one request's denoising loop needs; built by ``prepare``.

    Attributes:
        latents: packed latents, (B, seq, C).
        timesteps: scheduler timesteps, (num_steps,).
        scheduler: this request's own scheduler copy (schedulers are stateful).
        branch_kwargs: transformer kwargs shared by all branches (e.g. ``img_shapes``, ``guidance``).
        cfg_scale: scale used to combine the branches, or ``None`` when CFG is off.
        params: the request's sampling parameters.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    branch_kwargs: dict[str, Any]
    cfg_scale: float | None
    params: SamplingParams

    @property
    def branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.cfg_scale is not None else ("cond",)


class CFGStrategy(Protocol):
    """Computes the guided prediction of one step from the per-branch predictions."""

    def __call__(
        self,
        branches: Sequence[str],
        run_branch: Callable[[str], torch.Tensor],
        combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor: ...


def serial_cfg(
    branches: Sequence[str],
    run_branch: Callable[[str], torch.Tensor],
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run the branches one after the other on this process (the reference path)."""
    preds = [run_branch(b) for b in branches]
    return preds[0] if len(preds) == 1 else combine(preds[0], preds[1])


StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, num steps, latents)
ComponentLoader = Callable[[type, Path, torch.dtype], torch.nn.Module]  # (class, component folder, dtype)


class FamilyAdapter:
    """Base class of a family adapter. Subclasses set the class attributes and implement the
    family-specific calls (``encode_prompt``, ``prepare``, ``combine_cfg``, ``decode``).

    Attributes:
        family: registry family key.
        pipeline_class: the diffusers pipeline whose methods and helpers the adapter reuses, and
            the reference it is tested against.
        component_types: component name -> the class it must be (or subclass).
        stage_components: stage -> component names that stage loads.
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[type]
    component_types: ClassVar[dict[str, type]]
    stage_components: ClassVar[dict[Stage, tuple[str, ...]]]
    #: text kwargs without a batch dimension (shared by every sample, e.g. FLUX ``txt_ids``)
    unbatched_text_kwargs: ClassVar[tuple[str, ...]] = ()
    #: the pipeline's guidance_scale default for guidance-distilled transformers (None: required)
    default_guidance_scale: ClassVar[float | None] = None

    def __init__(
        self,
        components: dict[str, Any],
        info: CheckpointInfo,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype
        self.components = components
        self.cfg_strategy: CFGStrategy = serial_cfg
        full = {name: components.get(name) for name in self.component_types}
        self.pipe = self.pipeline_class(**full)
        # Without its VAE loaded, a diffusers pipeline falls back to a scale factor of 8; take the
        # real one from the VAE's config instead, so every stage agrees on the latent geometry.
        self.pipe.vae_scale_factor = self.vae_scale_factor
        self.pipe.image_processor = type(self.pipe.image_processor)(vae_scale_factor=self.vae_scale_factor * 2)
        self.pipe.set_progress_bar_config(disable=True)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        stages: Sequence[Stage] = STAGES,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        loaders: dict[str, ComponentLoader] | None = None,
    ) -> FamilyAdapter:
        """Load the components ``stages`` need from a diffusers-format folder.

        Args:
            path: the folder (model_index.json + subfolders, safetensors weights).
            stages: which of "encode", "denoise", "decode" this process serves.
            device: where the modules run.
            dtype: dtype of the modules' floating point weights.
            loaders: component name -> a loader used instead of the class's ``from_pretrained``
                (e.g. a tensor-parallel loader that reads only this rank's shards).
        """
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"stages={sorted(unknown)} unknown; choose from {list(STAGES)}")
        info = read_checkpoint(path)
        components = {}
        for stage in stages:
            for name in cls.stage_components[stage]:
                if name not in components:
                    module = load_component(info, name, cls.component_types[name], dtype=dtype, loader=(loaders or {}).get(name))
                    components[name] = module.to(device) if isinstance(module, torch.nn.Module) else module
        return cls(components, info, device=device, dtype=dtype)

    @classmethod
    def vae_scale_from_config(cls, info: CheckpointInfo) -> int:
        """Spatial down-sampling of the checkpoint's VAE, from its config (no weights needed)."""
        raise NotImplementedError

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_scale_from_config(self.info)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: VAE scale x the 2x2 latent packing that
        these pipelines apply before the transformer."""
        return self.vae_scale_factor * 2

    @property
    def transformer(self) -> torch.nn.Module:
        module = self.components.get("transformer")
        if module is None:
            raise RuntimeError("this adapter was loaded without the 'denoise' stage; it has no transformer")
        return module

    def _require(self, *names: str) -> None:
        missing = [n for n in names if self.components.get(n) is None]
        if missing:
            raise RuntimeError(f"{self.family} adapter was loaded without {missing}; load the stage that needs them")

    # ---- the steps ----------------------------------------------------------------------------

    def encode_prompt(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, num_images_per_prompt: int
    ) -> TextConditioning:
        """Encode prompts (and negative prompts when CFG is on) into transformer kwargs."""
        raise NotImplementedError

    def text_shape_key(self, text: str) -> Hashable:
        """Texts with equal keys encode to equal shapes and can share one encoder batch, with the
        same numbers as alone. Default: the family pads to a fixed length, so all texts batch."""
        return None

    def encode_texts(self, texts: Sequence[str]) -> list[dict[str, torch.Tensor | None]]:
        """Encode texts in one batch (their ``text_shape_key`` must be equal); kwargs per text."""
        cond = self.encode_prompt(texts, None, 1)
        return [self._take(cond.positive, i) for i in range(len(texts))]

    def _take(self, kwargs: dict[str, torch.Tensor | None], index: int) -> dict[str, torch.Tensor | None]:
        return {
            k: v if (v is None or k in self.unbatched_text_kwargs) else v[index : index + 1] for k, v in kwargs.items()
        }

    def repeat_text(self, kwargs: dict[str, torch.Tensor | None], n: int) -> dict[str, torch.Tensor | None]:
        """One text's kwargs repeated for ``n`` images, as ``num_images_per_prompt`` does."""
        return {
            k: v if (v is None or k in self.unbatched_text_kwargs) else v.repeat_interleave(n, dim=0)
            for k, v in kwargs.items()
        }

    def prepare(
        self, params: SamplingParams, cond: TextConditioning, generator: torch.Generator | None
    ) -> DenoiseState:
        """Initial latents (drawn by the pipeline's own ``prepare_latents``, exactly as diffusers
        draws them), this request's scheduler and timesteps, and the transformer kwargs."""
        self._require("transformer", "scheduler")
        batch = cond.batch_size * params.num_images_per_prompt
        prepared = self.pipe.prepare_latents(
            batch,
            self.transformer.config.in_channels // 4,
            params.height,
            params.width,
            cond.positive["encoder_hidden_states"].dtype,
            self.device,
            generator,
        )
        latents, kwargs = self._latents_and_kwargs(prepared, params, cond)
        scheduler = self._new_scheduler()
        timesteps = self._flow_match_timesteps(scheduler, params.num_inference_steps, latents.shape[1])
        return DenoiseState(
            latents=latents,
            timesteps=timesteps,
            scheduler=scheduler,
            branch_kwargs={**kwargs, "guidance": self._guidance(params, batch)},
            cfg_scale=params.true_cfg_scale if cond.negative is not None else None,
            params=params,
        )

    def _latents_and_kwargs(
        self, prepared: Any, params: SamplingParams, cond: TextConditioning
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Split what the pipeline's ``prepare_latents`` returned into the latents and the extra
        transformer kwargs of the family (positions, shapes, attention kwargs)."""
        raise NotImplementedError

    def _guidance(self, params: SamplingParams, batch: int) -> torch.Tensor | None:
        """The distilled-guidance embedding input, for transformers that have one."""
        if not self.transformer.config.guidance_embeds:
            return None
        scale = self.default_guidance_scale if params.guidance_scale is None else params.guidance_scale
        if scale is None:
            raise ValueError(f"guidance_scale is required for a guidance-distilled {self.family} transformer")
        return torch.full([batch], scale, device=self.device, dtype=torch.float32)

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The family's CFG combination of the two branch predictions."""
        return uncond + scale * (cond - uncond)

    def predict_noise(self, state: DenoiseState, cond: TextConditioning, index: int, t: torch.Tensor) -> torch.Tensor:
        """One denoiser evaluation (all CFG branches, combined) at step ``index``."""
        latents = state.latents
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000

        def run_branch(branch: str) -> torch.Tensor:
            text = cond.positive if branch == "cond" else cond.negative
            with step_context(index, float(t), branch), self.transformer.cache_context(branch):
                return self.transformer(
                    hidden_states=latents, timestep=timestep, **state.branch_kwargs, **text, return_dict=False
                )[0]

        return self.cfg_strategy(
            state.branches, run_branch, lambda c, u: self.combine_cfg(c, u, state.cfg_scale)
        )

    def scheduler_step(self, state: DenoiseState, noise_pred: torch.Tensor, t: torch.Tensor) -> None:
        state.latents = state.scheduler.step(noise_pred, t, state.latents, return_dict=False)[0]

    @torch.inference_mode()
    def denoise(
        self, state: DenoiseState, cond: TextConditioning, callback: StepCallback | None = None
    ) -> torch.Tensor:
        """The whole denoising loop; returns the final packed latents."""
        n = len(state.timesteps)
        for i, t in enumerate(state.timesteps):
            noise_pred = self.predict_noise(state, cond, i, t)
            self.scheduler_step(state, noise_pred, t)
            if callback is not None:
                callback(i, n, state.latents)
        return state.latents

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        """Images in [-1, 1] -> PIL images (``"pil"``), float arrays (``"np"``) or tensors (``"pt"``)."""
        return self.pipe.image_processor.postprocess(images, output_type=output_type)

    # ---- helpers for subclasses ---------------------------------------------------------------

    def _new_scheduler(self) -> Any:
        self._require("scheduler")
        return copy.deepcopy(self.components["scheduler"])

    def _flow_match_timesteps(self, scheduler: Any, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """Timesteps of a flow-matching pipeline with resolution-dependent shift (``mu``), computed
        with the pipeline module's own ``calculate_shift`` and ``retrieve_timesteps``."""
        import importlib

        import numpy as np

        module = importlib.import_module(self.pipeline_class.__module__)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = module.calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = module.retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps
