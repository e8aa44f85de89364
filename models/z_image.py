"""Z-Image family adapter (Tongyi-MAI/Z-Image-Turbo).

Qwen3 text encoder over the pipeline's chat template (the second-to-last hidden states of the
prompt's real tokens, one variable-length sequence per text); a single-stream transformer that
takes lists (one (C, 1, H, W) latent and one caption sequence per sample), patchifies inside and
predicts the negated flow (``-model(x)`` is what the scheduler consumes); timestep input
``(1000 - t) / 1000``. Guidance as ``ZImagePipeline``: none by default (Turbo is step-distilled,
``guidance_scale`` 0); classic CFG with a negative prompt (empty by default) when
``guidance_scale > 0``, combined as ``cond + scale * (cond - uncond)``, both branches in one call.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
from transformers import Qwen2Tokenizer, Qwen3Model

from .adapter import DenoiseState, FamilyAdapter, SamplingParams, TextConditioning, count_local_heads, serial_cfg
from .contract import CacheBlocks, CFGEvaluation, LatentLayout
from .loading import CheckpointInfo
from .registry import Feature, Guidance


def _modulated_input(block: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """TeaCache's probe: the first main block's timestep-modulated input (image and caption
    tokens: the blocks are single-stream), as the block computes it before attention."""
    scale_msa = block.adaLN_modulation(kwargs["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(kwargs["x"]) * (1.0 + scale_msa)


class ZImageAdapter(FamilyAdapter):
    family = "z-image"
    pipeline_class = ZImagePipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKL,
        "text_encoder": Qwen3Model,
        "tokenizer": Qwen2Tokenizer,
        "transformer": ZImageTransformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    latent_layout = LatentLayout.SPATIAL
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    # The pipeline evaluates both branches in one call (their captions padded inside the model).
    cfg_evaluation = CFGEvaluation.BATCHED
    # Verified in tests/test_family_z_image.py: caches (threshold 0 equals uncached, evaluations
    # drop); CFG-parallel, sequence parallel (Ulysses, Ring) and tensor parallel at degree 2 equal
    # one rank; exact VAE patch parallel decode (AutoencoderKL's plan) over 2 workers equals one.
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL, Feature.SEQUENCE_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.LORA, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("t_embedder.*", "cap_embedder.*", "all_x_embedder.*", "all_final_layer.*",
                            "*.adaLN_modulation.*")
    # Sequence parallel (the class has no _cp_plan): the model joins image and caption tokens into
    # one sequence inside its forward, so the split is at the first main block's input (each rank
    # a contiguous shard of the joined sequence), the RoPE table is split where each main block's
    # attention takes it (the forward passes every block the whole table), and the final layer's
    # output is gathered. The refiners attend over their own unsplit sequences, so only the main
    # blocks' attention runs sequence-parallel. Needs no attention mask: every sample of a call
    # has the same joined length (see ``predict_noise``).
    cp_plan = {
        "layers.0": {"x": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "layers.*.attention": {"freqs_cis": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "all_final_layer.?-?": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    cp_attention = "layers.*.attention"
    # Tensor parallel (the class has no _tp_plan): every block's Q/K/V and SwiGLU up-projections
    # column-sharded (whole heads per rank: the q/k RMSNorms are per head), its attention output and
    # down-projection row-sharded. Z-Image-Turbo has 30 heads and an FFN of 10240, so of the degrees
    # a node has (2, 4, 8) only 2 divides both; the start-up check refuses the others, naming why.
    tp_plan = {
        "*.attention.to_q": "colwise",
        "*.attention.to_k": "colwise",
        "*.attention.to_v": "colwise",
        "*.attention.to_out.0": "rowwise",
        "*.feed_forward.w1": "colwise",
        "*.feed_forward.w3": "colwise",
        "*.feed_forward.w2": "rowwise",
    }
    # The cacheable blocks are the main single-stream ``layers`` (the refiners run before the
    # image and caption streams are joined). The transformer calls them positionally and each
    # returns its one stream. TeaCache polynomial: no published fit for Z-Image is known to us, so
    # the identity (the accumulated quantity is the raw relative L1 change of the probe, and
    # rel_l1_thresh reads in those units); fit one per checkpoint with tools/fit_tea_cache.py.
    cache_blocks = CacheBlocks(
        ("layers",), _modulated_input, (0.0, 0.0, 0.0, 1.0, 0.0), layer_config_keys=("n_layers",),
        positional_args=("x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask", "adaln_noisy", "adaln_clean"),
        hidden_arg="x", encoder_arg=None,
    )
    max_sequence_length = 512  # the pipeline's default
    latent_patch = 2  # the transformer's spatial patch (all_patch_size)

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        super().__init__(components, info, **kwargs)
        transformer = components.get(self.denoisers[0])
        if transformer is not None:
            # The attention processor splits heads by the module's head count: a tensor-parallel
            # rank's column-sharded Q/K/V hold fewer heads of the same size.
            head_dim = transformer.config.dim // transformer.config.n_heads
            count_local_heads(transformer, Attention, lambda m: head_dim)

    def _helper_pipeline(self) -> Any:
        pipe = super()._helper_pipeline()
        # Without its VAE loaded the pipeline falls back to a scale factor of 8; take the real one
        # from the VAE's config, so every stage agrees on the latent geometry.
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.image_processor = type(pipe.image_processor)(vae_scale_factor=self.vae_scale_factor * self.latent_patch)
        return pipe

    @classmethod
    def size_multiple_from_config(cls, info: CheckpointInfo) -> int:
        return cls.vae_scale_from_config(info) * cls.latent_patch

    # ---- encode -------------------------------------------------------------------------------

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        """Each text's caption sequence, zero-padded to the batch's longest as ``cap_feats``
        (B, L, D), with its true length in ``cap_lens`` (B,): the transformer gets each sequence
        unpadded, as from the pipeline."""
        embeds = self.pipe._encode_prompt(list(texts), device=self.device, max_sequence_length=self.max_sequence_length)
        embeds = [e for e in embeds for _ in range(num_images_per_prompt)]
        return self._padded(embeds)

    @staticmethod
    def _padded(embeds: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        length = max(e.shape[0] for e in embeds)
        caps = torch.stack([F.pad(e, (0, 0, 0, length - e.shape[0])) for e in embeds])
        lens = torch.tensor([e.shape[0] for e in embeds], dtype=torch.long, device=caps.device)
        return {"cap_feats": caps, "cap_lens": lens}

    def _cat_texts(self, texts: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
        # branches batched into one call may differ in caption length: pad them alike
        embeds = [cap[:n] for t in texts for cap, n in zip(t["cap_feats"], t["cap_lens"].tolist())]
        return self._padded(embeds)

    # ---- prepare ------------------------------------------------------------------------------

    def prepare_latents(
        self, params: SamplingParams, cond: TextConditioning, batch: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        # (B, C, H, W) float32, drawn by the pipeline's own prepare_latents as diffusers draws them
        latents = self.pipe.prepare_latents(
            batch, self.transformer.in_channels, params.height, params.width, torch.float32, self.device, generator
        )
        return latents, {}

    def prepare_timesteps(self, scheduler: Any, params: SamplingParams, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's sigmas (linear 1 -> 1/N) with its resolution-dependent ``mu`` (used only
        by schedulers with dynamic shifting; Turbo's shifts statically)."""
        module = importlib.import_module(self.pipeline_class.__module__)
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        mu = module.calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        sigmas = module.get_default_z_image_sigmas(params.num_inference_steps)
        timesteps, _ = module.retrieve_timesteps(scheduler, params.num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def cfg_scale(self, params: SamplingParams, cond: TextConditioning) -> float | None:
        """``guidance_scale`` when a negative branch was encoded and the scale is above 0 (the
        pipeline's rule, unlike the usual > 1)."""
        if cond.negative is None or params.guidance_scale is None:
            return None
        return params.guidance_scale if params.guidance_scale > 0 else None

    # ---- denoise ------------------------------------------------------------------------------

    def predict_noise(self, state: DenoiseState, cond: TextConditioning, index: int, t: torch.Tensor) -> torch.Tensor:
        """As the base class, but branches whose captions pad (to the model's multiple of 32) to
        different lengths run one call each: batched, they would need an attention mask, which
        sequence parallel attention does not take (the pipeline batches them with a mask; the
        results agree to float rounding)."""
        if len(state.branches) > 1 and self.cfg_strategy is serial_cfg:
            lengths = {-(-int(n) // SEQ_MULTI_OF) for b in state.branches for n in self.branch_text(cond, b)["cap_lens"]}
            if len(lengths) > 1:
                preds = [self.run_branches(state, cond, (b,), index, t) for b in state.branches]
                return self.combine_cfg(preds[0], preds[1], state.cfg_scale)
        return super().predict_noise(state, cond, index, t)


    def timestep_input(self, t: torch.Tensor, state: Any, batch: int) -> torch.Tensor:
        return (1000 - t.expand(batch)) / 1000

    def call_denoiser(
        self, module: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on per-sample lists; returns the negated prediction (B, C, H, W) in float32."""
        x = list(latents.to(module.dtype).unsqueeze(2).unbind(0))
        caps = [cap[:n] for cap, n in zip(kwargs["cap_feats"], kwargs["cap_lens"].tolist())]
        out = module(x=x, t=timestep, cap_feats=caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        # ZImagePipeline: pos + scale * (pos - neg) (the scale counts from 0, not 1)
        return cond + scale * (cond - uncond)

    # ---- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        self._require("vae")
        vae = self.components["vae"]
        latents = latents.to(vae.dtype)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0]

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> Any:
        """Images in [-1, 1] -> PIL images (``"pil"``), float arrays (``"np"``) or tensors (``"pt"``)."""
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
