"""The family adapter contract: what a new model family implements.

A request runs through the adapter as separate calls (the stages may live in different processes):

    encode_prompt -> prepare -> [denoiser_for -> predict_noise -> scheduler_step -> callback]* -> decode
    -> postprocess

A family whose ``conditioning`` has ``PRIOR_TOKENS`` (GLM-Image) has one more stage before the
DiT, ``"prior"`` (``PRIOR_STAGE``): ``prior_tokens(prompt, height, width, seed)`` runs its
autoregressive model, and ``with_prior(cond, tokens)`` adds the tokens to the denoiser kwargs of
the conditioning before ``prepare``.

**Declared as class data** (read without loading weights; see ``contract.py``):

- ``component_types`` / ``stage_components``: the diffusers components and which stage loads them;
- ``denoisers``: the denoiser component name(s); ``denoiser_for(state, index, t)`` picks the one a
  step calls (default: the only one; Wan2.2 switches experts at ``boundary_ratio``).
  ``adapter.transformer`` is the first, the module features hook into;
- ``latent_layout`` (packed image tokens, 5-D video, 1-D audio), ``output`` (image, layered RGBA,
  video, audio) and ``conditioning`` (text, images, an AR prior's tokens);
- ``guidance``: the kinds implemented (none, distilled embedding, true CFG, classic CFG) and
  ``cfg_evaluation``: CFG branches run serially or batched into one call; a CFG-parallel
  ``cfg_strategy`` (``parallel/cfg.py``) splits them across ranks instead;
- ``supported_features`` (implemented *and* verified; the registry's feature flags derive from it)
  and ``cache_blocks`` (what the block caches need to know about the denoiser).

**Implemented per family** (the base class assumes no latent packing, no text-kwarg names, no
timestep scaling, no scheduler type): ``encode_prompt``, ``prepare_latents`` (latents + denoiser
kwargs shared by the branches), ``prepare_timesteps``, ``timestep_input``, ``decode``,
``postprocess``, ``size_multiple_from_config``; optionally ``combine_cfg``, ``guidance_kwargs``,
``call_denoiser``. ``flow_match.FlowMatchImageAdapter`` implements them for diffusers'
flow-matching text-to-image pipelines with packed 2x2 latents (Qwen-Image, FLUX.1).

An adapter is built on its diffusers pipeline: it holds a *helper pipeline* made of whichever
components this stage loaded (the others are ``None``) and calls its methods and the module's
helper functions, so no model math is written here. Only the denoising loop is ours, because it
carries the extension points: every denoiser call runs inside ``step_context`` and the module's
``cache_context(branch)``; ``DenoiseState`` carries all per-request state (its own scheduler copy);
``callback(StepOutput)`` sees each step's guided prediction and new latents.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from .context import step_context
from .contract import CacheBlocks, CFGEvaluation, Conditioning, LatentLayout, Output, StepCallback, StepOutput
from .loading import CheckpointInfo, load_component, read_checkpoint
from .registry import Feature, Guidance

logger = logging.getLogger(__name__)

Stage = str  # "prior" | "encode" | "denoise" | "decode"
STAGES: tuple[Stage, ...] = ("encode", "denoise", "decode")
#: the stage of an autoregressive prior (families whose ``conditioning`` has ``PRIOR_TOKENS``)
PRIOR_STAGE: Stage = "prior"
ALL_STAGES: tuple[Stage, ...] = (PRIOR_STAGE, *STAGES)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the denoiser (already validated and defaulted)."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    num_images_per_prompt: int = 1
    num_frames: int = 1  # video: frames per sample
    guidance_scale_2: float | None = None  # two-expert video models: the low-noise expert's CFG scale
    #: audio: where the clip ends and starts, in seconds (diffusers' ``audio_end_in_s`` /
    #: ``audio_start_in_s``); ``None`` for images and video
    seconds: float | None = None
    seconds_start: float | None = None
    layers: int | None = None  # layered output (``Output.LAYERED_IMAGE``): RGBA layers per image


@dataclasses.dataclass
class TextConditioning:
    """Encoder output, as keyword arguments of the family's denoiser.

    Attributes:
        positive: denoiser kwargs for the prompt branch (names are the family's).
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
class ImageConditioning:
    """VAE ``encode`` -> denoiser: the latents of a request's input images (editing).

    Attributes:
        latents: one tensor per input image, in the VAE's latent layout, already normalized as the
            pipeline normalizes them (before any packing).
        sizes: (height, width) in pixels each image was resized to before encoding.
    """

    latents: list[torch.Tensor]
    sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageConditioning:
        return ImageConditioning([t.to(device=device, dtype=dtype or t.dtype) for t in self.latents], list(self.sizes))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latents)


@dataclasses.dataclass
class DenoiseState:
    """Everything one request's denoising loop needs; built by ``prepare``.

    Attributes:
        latents: the latents in the adapter's ``latent_layout``.
        timesteps: scheduler timesteps, (num_steps,).
        scheduler: this request's own scheduler copy (schedulers are stateful).
        branch_kwargs: denoiser kwargs shared by all branches (e.g. ``img_shapes``, ``guidance``).
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


def _same(a: Any, b: Any) -> bool:
    """Whether two denoiser kwargs are equal (tensors by value; containers of tensors, unknown: no)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.equal(a, b)
    if a is b:
        return True
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. a dict holding tensors
        return False


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
    """Run the branches one after the other on this process (the reference path). An adapter
    that declares ``CFGEvaluation.BATCHED`` runs them in one call instead while this (the
    local strategy) is in place."""
    preds = [run_branch(b) for b in branches]
    return preds[0] if len(preds) == 1 else combine(preds[0], preds[1])


def count_local_heads(transformer: torch.nn.Module | None, attention_types: type | tuple[type, ...],
                      head_dim: Callable[[torch.nn.Module], int]) -> None:
    """Set ``heads`` of each attention module of ``transformer`` to the heads its Q projection holds.

    Attention processors split Q/K/V into heads by ``attn.heads``; a tensor-parallel rank's
    column-sharded Q/K/V hold fewer heads of the same size (``head_dim(module)``, read from the
    unsharded module), so after a sharded load the count must be the local one.
    """
    if transformer is None:
        return
    for module in transformer.modules():
        if isinstance(module, attention_types):
            dim = head_dim(module)
            if module.to_q.out_features != module.heads * dim:
                module.heads = module.to_q.out_features // dim


ComponentLoader = Callable[[type, Path, torch.dtype], torch.nn.Module]  # (class, component folder, dtype)


class FamilyAdapter:
    """Base class of a family adapter (the contract: see the module docstring).

    Attributes:
        family: registry family key.
        pipeline_class: the diffusers pipeline whose methods and helpers the adapter reuses, and
            the reference it is tested against (``None``: no helper pipeline).
        component_types: component name -> the class it must be (or subclass).
        stage_components: stage -> component names that stage loads.
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[type | None] = None
    component_types: ClassVar[dict[str, type]]
    stage_components: ClassVar[dict[Stage, tuple[str, ...]]]
    #: denoiser component names; the first is ``adapter.transformer``
    denoisers: ClassVar[tuple[str, ...]] = ("transformer",)
    #: components a checkpoint may leave out (``null`` in model_index.json; e.g. Wan2.2 TI2V-5B has
    #: no ``transformer_2``): not loaded, ``None`` in ``components``
    optional_components: ClassVar[frozenset[str]] = frozenset()
    latent_layout: ClassVar[LatentLayout]
    output: ClassVar[Output] = Output.IMAGE
    conditioning: ClassVar[frozenset[Conditioning]] = frozenset({Conditioning.TEXT})
    guidance: ClassVar[frozenset[Guidance]] = frozenset({Guidance.NONE})
    cfg_evaluation: ClassVar[CFGEvaluation] = CFGEvaluation.SERIAL
    #: features implemented and verified for this family (sequence / tensor parallel also need the
    #: denoiser class's diffusers ``_cp_plan`` / ``_tp_plan``: see ``verified_features``)
    supported_features: ClassVar[frozenset[Feature]] = frozenset()
    #: why a feature is not in ``supported_features`` (said in its start-up refusal), where a reason
    #: is known (e.g. a norm over all heads that tensor parallel would have to all-reduce)
    unsupported: ClassVar[dict[Feature, str]] = {}
    #: what the block caches need to know about the denoiser (``None``: no cache support)
    cache_blocks: ClassVar[CacheBlocks | None] = None
    #: sequence-parallel split/gather plan (diffusers' ``_cp_plan`` format) for a denoiser class that
    #: has none of its own; ``None``: the class's (``sequence_plan``)
    cp_plan: ClassVar[dict[str, Any] | None] = None
    #: which attention modules run sequence-parallel (an fnmatch pattern of module names, for
    #: denoisers that also attend over unsplit sequences); ``None``: every attention module
    cp_attention: ClassVar[str | None] = None
    #: tensor-parallel plan (diffusers' ``_tp_plan`` format) where the class has none (``tensor_plan``)
    tp_plan: ClassVar[dict[str, Any] | None] = None
    #: DiT linears FP8 leaves in high precision by default (fnmatch patterns of module names;
    #: ``features/quantization.py``): the layers whose error reaches every token or the output
    #: directly and whose FLOPs are negligible — timestep/guidance/text embedders (one vector per
    #: sample), modulation (adaLN: the scale/shift of every token of a block), the patch embedder
    #: and the final norm/projection (few channels, written straight into the prediction)
    quant_ignored_layers: ClassVar[tuple[str, ...]] = ()
    #: text kwargs without a batch dimension (shared by every sample, e.g. FLUX ``txt_ids``)
    unbatched_text_kwargs: ClassVar[tuple[str, ...]] = ()
    #: the pipeline's guidance_scale default for guidance-distilled denoisers (None: required)
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
        # the DiT's LoRA adapters (features.lora.LoraStore), set by the feature table when the
        # deployment serves a lora_dir; the adapter itself never reads it
        self.lora_store: Any = None
        self.pipe = self._helper_pipeline()

    def _helper_pipeline(self) -> Any:
        """The family's diffusers pipeline built from the loaded components (others ``None``)."""
        if self.pipeline_class is None:
            return None
        pipe = self.pipeline_class(**{name: self.components.get(name) for name in self.component_types})
        pipe.set_progress_bar_config(disable=True)
        return pipe

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
        host_components: Sequence[str] = (),
    ) -> FamilyAdapter:
        """Load the components ``stages`` need from a diffusers-format folder.

        Args:
            path: the folder (model_index.json + subfolders, safetensors weights).
            stages: which of "encode", "denoise", "decode" this process serves.
            device: where the modules run.
            dtype: dtype of the modules' floating point weights.
            loaders: component name -> a loader used instead of the class's ``from_pretrained``
                (e.g. a tensor-parallel loader that reads only this rank's shards).
            host_components: components left on the CPU after loading: an offload feature places
                their weights itself (a model larger than the device never has to fit on it).
        """
        unknown = set(stages) - set(ALL_STAGES)
        if unknown:
            raise ValueError(f"stages={sorted(unknown)} unknown; choose from {list(ALL_STAGES)}")
        info = read_checkpoint(path)
        components = {}
        for stage in stages:
            for name in cls.stage_components.get(stage, ()):
                if name in cls.optional_components and name not in info.components:
                    components[name] = None
                elif name not in components:
                    module = load_component(info, name, cls.component_types[name], dtype=dtype, loader=(loaders or {}).get(name))
                    on_device = isinstance(module, torch.nn.Module) and name not in host_components
                    components[name] = module.to(device) if on_device else module
        return cls(components, info, device=device, dtype=dtype)

    # ---- declarations read without weights ----------------------------------------------------

    @classmethod
    def has_prior(cls) -> bool:
        """Whether the family conditions on an autoregressive prior's tokens (its own stage,
        ``PRIOR_STAGE``: ``prior_tokens`` then ``with_prior``)."""
        return Conditioning.PRIOR_TOKENS in cls.conditioning

    @classmethod
    def stages_with_prior(cls, stages: Sequence[Stage]) -> tuple[Stage, ...]:
        """``stages``, with the prior's in front where the family has one and ``stages`` encode
        (the process that encodes the prompt also runs its prior)."""
        stages = tuple(stages)
        if cls.has_prior() and "encode" in stages and PRIOR_STAGE not in stages:
            return (PRIOR_STAGE, *stages)
        return stages

    @classmethod
    def denoiser_class(cls) -> type:
        """The class of the first denoiser (the one features and plans are checked against)."""
        return cls.component_types[cls.denoisers[0]]

    @classmethod
    def sequence_plan(cls) -> dict[str, Any] | None:
        """Where sequence parallel splits and gathers: the adapter's ``cp_plan``, else the denoiser
        class's diffusers ``_cp_plan`` (``None``: no plan, no sequence parallel)."""
        return cls.cp_plan or getattr(cls.denoiser_class(), "_cp_plan", None) or None

    @classmethod
    def tensor_plan(cls) -> dict[str, Any] | None:
        """Which linears tensor parallel shards: the adapter's ``tp_plan``, else the class's ``_tp_plan``."""
        return cls.tp_plan or getattr(cls.denoiser_class(), "_tp_plan", None) or None

    @classmethod
    def verified_features(cls) -> frozenset[Feature]:
        """``supported_features``, less sequence / tensor parallel where no plan (the adapter's or
        the denoiser class's diffusers one) says how to run them."""
        out = set(cls.supported_features)
        if not cls.sequence_plan():
            out.discard(Feature.SEQUENCE_PARALLEL)
        if not cls.tensor_plan():
            out.discard(Feature.TENSOR_PARALLEL)
        if cls.cache_blocks is None:
            out -= {Feature.TEA_CACHE, Feature.CACHE_DIT}
        return frozenset(out)

    @classmethod
    def vae_scale_from_config(cls, info: CheckpointInfo) -> int:
        """Spatial down-sampling of the checkpoint's VAE, from its config (no weights needed); the
        default is the ``AutoencoderKL`` family's (one halving per level after the first)."""
        return 2 ** (len(info.config("vae")["block_out_channels"]) - 1)

    @classmethod
    def checkpoint_spec_fields(cls, info: CheckpointInfo) -> dict[str, Any]:
        """Registry fields that are facts of the checkpoint (read from its JSON files, no weights):
        they override the family's flagship entry for a folder unless its ``ditserve.json`` sets
        them (default: ``size_multiple``; e.g. an audio model's sample rate, Wan2.2's expert boundary)."""
        return {"size_multiple": cls.size_multiple_from_config(info)}

    @classmethod
    def decoded_extent_from_config(cls, info: CheckpointInfo) -> tuple[int, int] | None:
        """(width, height) the VAE decodes for a default request, where it is not the model's default
        image size (``None``): an audio decoder decodes every latent frame, (samples, 1)."""
        return None

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        """Width and height must be multiples of this (VAE scale x any latent packing)."""
        return cls.vae_scale_from_config(info)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_scale_from_config(self.info)

    @property
    def size_multiple(self) -> int:
        return self.size_multiple_from_config(self.info)

    def denoiser(self, name: str) -> torch.nn.Module:
        module = self.components.get(name)
        if module is None:
            raise RuntimeError(f"this adapter was loaded without the 'denoise' stage; it has no {name}")
        return module

    def denoiser_modules(self) -> list[torch.nn.Module]:
        """Every loaded denoiser (features that hook the denoiser hook each: Wan2.2's two experts)."""
        return [m for name in self.denoisers if (m := self.components.get(name)) is not None]

    @property
    def transformer(self) -> torch.nn.Module:
        """The first denoiser (the module features hook into)."""
        return self.denoiser(self.denoisers[0])

    def _require(self, *names: str) -> None:
        missing = [n for n in names if self.components.get(n) is None]
        if missing:
            raise RuntimeError(f"{self.family} adapter was loaded without {missing}; load the stage that needs them")

    # ---- prior (families with Conditioning.PRIOR_TOKENS) ----------------------------------------

    def prior_tokens(self, prompt: str, height: int, width: int, seed: int) -> torch.Tensor:
        """The autoregressive prior's tokens for one prompt, sampled with the request's ``seed``
        (a CPU tensor, what travels to the DiT)."""
        raise NotImplementedError(f"{self.family} has no prior")

    def with_prior(self, cond: TextConditioning, tokens: torch.Tensor) -> TextConditioning:
        """``cond`` with the prior's ``tokens`` added to the denoiser kwargs of its branches."""
        raise NotImplementedError(f"{self.family} has no prior")

    # ---- encode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, num_images_per_prompt: int
    ) -> TextConditioning:
        """Encode prompts (and negative prompts when CFG is on) into denoiser kwargs."""
        self._require(*self.stage_components["encode"])
        negative = self.encode_text_kwargs(negative_prompts, num_images_per_prompt) if negative_prompts is not None else None
        return TextConditioning(self.encode_text_kwargs(prompts, num_images_per_prompt), negative,
                                batch_size=len(prompts))

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        """One batch of texts -> the denoiser's text kwargs (the family's pipeline helpers)."""
        raise NotImplementedError

    def request_conditioning(self, cond: TextConditioning, params: SamplingParams) -> TextConditioning:
        """One request's conditioning from its encoded texts and its parameters (the encode stage
        calls it once per request). Default: the texts alone. Stable Audio adds the
        ``seconds_start``/``seconds`` embeddings, and its unconditional branch when CFG runs
        without a negative prompt."""
        return cond
    def encode_image_prompt(
        self, texts: Sequence[str], images: Sequence[Any], num_images_per_prompt: int,
        vision_features: Any = None,
    ) -> tuple[dict[str, torch.Tensor | None], Any]:
        """Image-conditioned families: ``texts`` read together with the input ``images`` (uint8
        (H, W, C) arrays) by a vision-language encoder.

        Args:
            vision_features: what an earlier call returned for the same images (the vision tower's
                output, which does not depend on the text): used instead of running the tower.

        Returns:
            the denoiser's text kwargs, and the vision features (CPU tensors; to reuse).
        """
        raise NotImplementedError(f"{self.family} takes no input images")

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> ImageConditioning:
        """Image-conditioned families: the input images (uint8 (H, W, C) arrays) -> their VAE latents."""
        raise NotImplementedError(f"{self.family} takes no input images")

    def encode_request_images(self, images: Sequence[Any], params: SamplingParams) -> ImageConditioning:
        """The VAE stage's call: a request's input images -> their latents, for families whose image
        latents depend on the request (Wan2.2 encodes at the output size and frame count); default:
        ``encode_images``, which does not."""
        return self.encode_images(images)

    def image_encode_key(self, params: SamplingParams) -> str:
        """What besides an image's pixels its latents depend on (part of the conditioning cache's
        key); default: nothing."""
        return ""

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

    # ---- prepare ------------------------------------------------------------------------------

    def prepare(
        self, params: SamplingParams, cond: TextConditioning, generator: torch.Generator | None,
        images: ImageConditioning | None = None,
    ) -> DenoiseState:
        """Initial latents, this request's scheduler and timesteps, and the shared denoiser kwargs;
        ``images``: the input images' latents of an image-conditioned family (``Conditioning.IMAGE``)."""
        self._require(self.denoisers[0], "scheduler")
        batch = cond.batch_size * params.num_images_per_prompt
        if images is not None:
            latents, kwargs = self.prepare_latents(params, cond, batch, generator, images=images)
        else:
            latents, kwargs = self.prepare_latents(params, cond, batch, generator)
        scheduler = self._new_scheduler()
        timesteps = self.prepare_timesteps(scheduler, params, latents)
        return DenoiseState(
            latents=latents,
            timesteps=timesteps,
            scheduler=scheduler,
            branch_kwargs={**kwargs, **self.guidance_kwargs(params, batch)},
            cfg_scale=self.cfg_scale(params, cond),
            params=params,
        )

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Initial latents (``batch`` samples, in ``latent_layout``) and the denoiser kwargs shared
        by every branch and step (positions, shapes, attention kwargs)."""
        raise NotImplementedError

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        """Set ``scheduler`` up for the request and return its timesteps."""
        raise NotImplementedError

    def guidance_kwargs(self, params: SamplingParams, batch: int) -> dict[str, Any]:
        """Denoiser kwargs of guidance that enters the model (a distilled guidance embedding)."""
        return {}

    def cfg_scale(self, params: SamplingParams, cond: TextConditioning) -> float | None:
        """The scale combining the CFG branches (``None``: one branch): ``true_cfg_scale`` for true
        CFG, ``guidance_scale`` for classic CFG, when a negative branch was encoded and the scale is
        above 1 (as diffusers' pipelines decide)."""
        if cond.negative is None:
            return None
        if Guidance.TRUE_CFG in self.guidance and params.true_cfg_scale is not None:
            return params.true_cfg_scale if params.true_cfg_scale > 1 else None
        if Guidance.CFG in self.guidance and params.guidance_scale is not None:
            return params.guidance_scale if params.guidance_scale > 1 else None
        return None

    # ---- denoise ------------------------------------------------------------------------------

    def denoiser_for(self, state: DenoiseState, index: int, t: torch.Tensor) -> str:
        """The denoiser component step ``index`` calls (default: the only one)."""
        return self.denoisers[0]

    def step_cfg_scale(self, state: DenoiseState, index: int, t: torch.Tensor) -> float | None:
        """The scale combining the CFG branches at step ``index`` (default: the request's, every
        step; Wan2.2's low-noise expert has its own)."""
        return state.cfg_scale

    def timestep_input(self, t: torch.Tensor, state: DenoiseState, batch: int) -> torch.Tensor:
        """The denoiser's ``timestep`` argument for scheduler timestep ``t`` (default: as is, per sample)."""
        return t.expand(batch)

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The family's CFG combination of the two branch predictions (classic and true CFG)."""
        return uncond + scale * (cond - uncond)

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """One call of a denoiser module (diffusers' convention by default)."""
        return module(hidden_states=latents, timestep=timestep, **kwargs, return_dict=False)[0]

    def branch_text(self, cond: TextConditioning, branch: str) -> dict[str, torch.Tensor | None]:
        if branch == "cond":
            return cond.positive
        if cond.negative is None:
            raise ValueError(f"branch {branch!r} needs a negative conditioning")
        return cond.negative

    def run_branches(
        self, state: DenoiseState, cond: TextConditioning, branches: Sequence[str], index: int, t: torch.Tensor
    ) -> torch.Tensor:
        """One denoiser call for ``branches`` (several: concatenated along the batch, in order)."""
        latents = state.latents
        name = self.denoiser_for(state, index, t)
        module = self.denoiser(name)
        # a second denoiser's calls are their own branches (per-branch state such as a cache's
        # residuals never crosses from one expert to the other)
        label = "+".join(branches) + ("" if name == self.denoisers[0] else f"@{name}")
        n = len(branches)
        texts = [self.branch_text(cond, b) for b in branches]
        if n == 1:
            kwargs = {**state.branch_kwargs, **texts[0]}
        else:
            batch = latents.shape[0]
            latents = torch.cat([latents] * n)
            kwargs = {**self._repeat_batch(state.branch_kwargs, batch, n), **self._cat_texts(texts)}
        timestep = self.timestep_input(t, state, latents.shape[0])
        cache_context = getattr(module, "cache_context", None)
        with step_context(index, float(t), label), (cache_context(label) if cache_context else contextlib.nullcontext()):
            return self.call_denoiser(module, latents, timestep, kwargs)

    def _repeat_batch(self, kwargs: dict[str, Any], batch: int, n: int) -> dict[str, Any]:
        """Shared kwargs for ``n`` branches batched together: per-sample tensors repeated."""
        return {
            k: torch.cat([v] * n) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
            for k, v in kwargs.items()
        }

    def _cat_texts(self, texts: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
        out = {}
        for k in texts[0]:
            values = [t[k] for t in texts]
            if values[0] is None or k in self.unbatched_text_kwargs:
                out[k] = values[0]
            else:
                try:
                    out[k] = torch.cat(values)
                except RuntimeError as exc:
                    raise ValueError(
                        f"batched CFG: text kwarg {k!r} differs in shape between branches "
                        f"({[tuple(v.shape) for v in values]}); pad them alike or evaluate serially"
                    ) from exc
        return out

    def predict_noise(self, state: DenoiseState, cond: TextConditioning, index: int, t: torch.Tensor) -> torch.Tensor:
        """The guided prediction of step ``index`` (all CFG branches, combined)."""
        scale = self.step_cfg_scale(state, index, t)

        def combine(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return self.combine_cfg(c, u, scale)

        return self._guided(state, cond, index, t, combine)

    def _guided(self, state: DenoiseState, cond: TextConditioning, index: int, t: torch.Tensor,
                combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The branches of step ``index`` evaluated as the CFG strategy says, joined by ``combine``."""
        branches = state.branches
        if len(branches) > 1 and self.cfg_evaluation is CFGEvaluation.BATCHED and self.cfg_strategy is serial_cfg:
            return combine(*self.run_branches(state, cond, branches, index, t).chunk(len(branches)))
        return self.cfg_strategy(branches, lambda b: self.run_branches(state, cond, (b,), index, t), combine)

    def scheduler_step(self, state: DenoiseState, noise_pred: torch.Tensor, t: torch.Tensor) -> None:
        state.latents = state.scheduler.step(noise_pred, t, state.latents, return_dict=False)[0]

    @torch.inference_mode()
    def denoise(
        self, state: DenoiseState, cond: TextConditioning, callback: StepCallback | None = None
    ) -> torch.Tensor:
        """The whole denoising loop; returns the final latents. ``callback`` gets a ``StepOutput``
        after every step."""
        n = len(state.timesteps)
        for i, t in enumerate(state.timesteps):
            noise_pred = self.predict_noise(state, cond, i, t)
            self.scheduler_step(state, noise_pred, t)
            if callback is not None:
                callback(StepOutput(index=i, num_steps=n, timestep=float(t), latents=state.latents, noise_pred=noise_pred))
        return state.latents

    # ---- request batching ---------------------------------------------------------------------

    def batch_refusal(self) -> str | None:
        """Why this family cannot denoise several requests as one batch (``None``: it can). A family
        that overrides the step's guided prediction (``predict_noise``) has math the batched loop
        does not know; it denoises one request at a time."""
        if type(self).predict_noise is not FamilyAdapter.predict_noise:
            return f"{self.family} computes its own guided prediction (predict_noise); requests run one at a time"
        return None

    def merge_states(
        self, states: Sequence[DenoiseState], conds: Sequence[TextConditioning]
    ) -> tuple[DenoiseState, TextConditioning]:
        """Several requests' prepared states as one batch, as ``num_images_per_prompt`` > 1 already
        is one: latents, per-sample denoiser kwargs and texts concatenated along the batch, in order.

        Raises:
            ValueError: the requests cannot share a forward (different timesteps, branches, latent
                or text shapes, or a shared kwarg that differs); the message says which.
        """
        first = states[0]
        for s in states[1:]:
            if not torch.equal(s.timesteps, first.timesteps):
                raise ValueError("timesteps differ (steps, size or scheduler)")
            if s.branches != first.branches:
                raise ValueError(f"CFG branches differ ({s.branches} vs {first.branches})")
            if s.latents.shape[1:] != first.latents.shape[1:]:
                raise ValueError(f"latent shapes differ ({tuple(s.latents.shape)} vs {tuple(first.latents.shape)})")
        if any(s.branch_kwargs.keys() != first.branch_kwargs.keys() for s in states):
            raise ValueError("denoiser kwargs differ")
        sizes = [s.latents.shape[0] for s in states]
        kwargs = {k: self._merge_value(k, [s.branch_kwargs[k] for s in states], sizes) for k in first.branch_kwargs}

        def texts(side: str) -> dict[str, torch.Tensor | None] | None:
            values = [getattr(c, side) for c in conds]
            if values[0] is None:
                if any(v is not None for v in values):
                    raise ValueError(f"{side} conditioning present for some requests only")
                return None
            return {k: self._merge_value(k, [v[k] for v in values], sizes, text=True) for k in values[0]}

        merged = DenoiseState(torch.cat([s.latents for s in states]), first.timesteps, first.scheduler, kwargs,
                              first.cfg_scale, first.params)
        return merged, TextConditioning(texts("positive"), texts("negative"), sum(c.batch_size for c in conds))

    def _merge_value(self, key: str, values: list[Any], sizes: list[int], text: bool = False) -> Any:
        """One kwarg of several requests: per-sample tensors (batch-first, one row per sample)
        concatenated; anything else must be equal in all and is taken once."""
        first = values[0]
        unbatched = text and key in self.unbatched_text_kwargs
        if isinstance(first, torch.Tensor) and not unbatched and first.dim() > 0 and all(
                isinstance(v, torch.Tensor) and v.shape[0] == n and v.shape[1:] == first.shape[1:]
                for v, n in zip(values, sizes)):
            return torch.cat(values)
        if not all(_same(v, first) for v in values[1:]):
            raise ValueError(f"denoiser kwarg {key!r} differs between the requests and is not per sample")
        return first

    @torch.inference_mode()
    def denoise_batch(
        self, states: Sequence[DenoiseState], conds: Sequence[TextConditioning], callback: StepCallback | None = None
    ) -> list[torch.Tensor]:
        """Several requests' loops as one: one denoiser call per step (and per CFG branch, or one
        for both when batched) over all their samples; each request keeps its own initial noise,
        scheduler, CFG scale and negative prompt (the guided prediction is combined per request).

        Returns:
            each request's final latents, in order. ``callback`` sees the whole batch.
        """
        if len(states) == 1:
            return [self.denoise(states[0], conds[0], callback)]
        merged, cond = self.merge_states(states, conds)
        sizes = [s.latents.shape[0] for s in states]
        n = len(merged.timesteps)
        for i, t in enumerate(merged.timesteps):
            scales = [self.step_cfg_scale(s, i, t) for s in states]

            def combine(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
                return torch.cat([self.combine_cfg(ci, ui, scale)
                                  for ci, ui, scale in zip(c.split(sizes), u.split(sizes), scales)])

            noise_pred = self._guided(merged, cond, i, t, combine)
            for s, pred in zip(states, noise_pred.split(sizes)):
                self.scheduler_step(s, pred, t)
            merged.latents = torch.cat([s.latents for s in states])
            if callback is not None:
                callback(StepOutput(index=i, num_steps=n, timestep=float(t), latents=merged.latents,
                                    noise_pred=noise_pred))
        return [s.latents for s in states]

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final latents -> decoded output (images: (B, 3, H, W) in [-1, 1])."""
        raise NotImplementedError

    def decode_output(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Final latents -> decoded output for a request (default: ``decode`` at its height and
        width; audio crops the waveform to the requested seconds)."""
        return self.decode(latents, params.height, params.width)

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        """Decoded output -> what the user gets (``"pil"``, ``"np"`` or ``"pt"`` for images)."""
        raise NotImplementedError

    def deliverable(self, decoded: torch.Tensor) -> Any:
        """Decoded output -> what the decode stage hands on, per ``output``: images as uint8 arrays
        (n, H, W, 3), rounded as diffusers' ``numpy_to_pil``; an audio adapter returns a
        ``contract.Audio`` (float waveforms and the sample rate)."""
        return (self.postprocess(decoded, output_type="np") * 255).round().astype("uint8")

    # ---- helpers for subclasses ---------------------------------------------------------------

    def _new_scheduler(self) -> Any:
        self._require("scheduler")
        return copy.deepcopy(self.components["scheduler"])
