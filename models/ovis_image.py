"""Ovis-Image family adapter (OvisAI/Ovis-Image; the diffusers checkpoint AIDC-AI/Ovis-Image-7B).

Qwen3 text encoder over the pipeline's chat template with its fixed system prompt (last hidden
states, padded to ``max_sequence_length`` + the template's 28 leading tokens, which are dropped);
``OvisImageTransformer2DModel`` (a FLUX.1-shaped double-/single-stream MMDiT without pooled text
or a guidance embedding) on 2x2-packed latent tokens with 3-axis position ids; timestep shift from
the image token count (``calculate_shift``), ``timestep / 1000`` as input. Guidance as
``OvisImagePipeline``: classic CFG with a negative prompt (``""`` by default) when
``guidance_scale > 1``, the two branches as two serial calls, combined as
``uncond + scale * (cond - uncond)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
from diffusers.hooks.tensor_parallel import PackedColwiseParallel, PackedRowwiseParallel
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.transformers.transformer_ovis_image import OvisImageAttention
from transformers import Qwen2TokenizerFast, Qwen3Model

from .adapter import SamplingParams, count_local_heads
from .flow_match import FlowMatchImageAdapter
from .flux import FluxAdapter, flux_cache_blocks
from .loading import CheckpointInfo
from .registry import Feature, Guidance


class OvisImageAdapter(FlowMatchImageAdapter):
    family = "ovis-image"
    pipeline_class = OvisImagePipeline
    component_types = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "vae": AutoencoderKL,
        "text_encoder": Qwen3Model,
        "tokenizer": Qwen2TokenizerFast,
        "transformer": OvisImageTransformer2DModel,
    }
    stage_components = {
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("transformer", "scheduler"),
        "decode": ("vae",),
    }
    max_sequence_length = 256  # the pipeline's default
    unbatched_text_kwargs = ("txt_ids",)
    guidance = frozenset({Guidance.NONE, Guidance.CFG})
    # Verified in tests/test_family_ovis_image.py: caches (threshold 0 equals uncached, evaluations
    # drop), CFG-parallel, Ulysses, Ring and tensor parallel at degree 2 equal one rank, exact VAE
    # patch parallel decode (AutoencoderKL's plan) over 2 workers equals one, layerwise offload
    # equals resident, FP8 runs end to end close to the unquantized path. The rest is refused at start-up by
    # check_support; LoRA in particular: OvisImagePipeline has no LoRA loader to read adapters with.
    supported_features = frozenset({
        Feature.TEA_CACHE, Feature.CACHE_DIT, Feature.CFG_PARALLEL, Feature.SEQUENCE_PARALLEL,
        Feature.TENSOR_PARALLEL, Feature.VAE_PATCH_PARALLEL, Feature.LAYERWISE_OFFLOAD, Feature.FP8,
    })
    # FP8 keeps these in high precision (FamilyAdapter.quant_ignored_layers says why)
    quant_ignored_layers = ("timestep_embedder.*", "x_embedder", "context_embedder", "*.norm1.linear",
                            "*.norm1_context.linear", "*.norm.linear", "norm_out.*", "proj_out")
    # Sequence parallel (the class has no _cp_plan): the transformer's forward is FLUX.1's (image
    # and text tokens in, RoPE from the concatenated txt/img position ids), so its plan is the same:
    # split both streams and their position ids at the model's input (the text is always
    # ``max_sequence_length`` tokens), gather the output of ``proj_out``.
    cp_plan = {
        "": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "img_ids": ContextParallelInput(split_dim=0, expected_dims=2, split_output=False),
            "txt_ids": ContextParallelInput(split_dim=0, expected_dims=2, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    # Tensor parallel (the class has no _tp_plan): FLUX.1's plan, except that Ovis's MLPs are SwiGLU.
    # Q/K/V (image and text) and the MLPs' first linears column-sharded, whole heads per rank; the
    # SwiGLU projections (``ff.net.0.proj``, the single blocks' ``proj_mlp``) pack two halves, so each
    # rank keeps its slice of both; each block half ends row-sharded, the single blocks' ``proj_out``
    # over its packed input ``cat([attention (dim), MLP (4 dim)])``. Modulations and QK norms stay
    # replicated. Degrees must divide the head count (checked at start-up).
    tp_plan = {
        "transformer_blocks.*.attn.to_q": "colwise",
        "transformer_blocks.*.attn.to_k": "colwise",
        "transformer_blocks.*.attn.to_v": "colwise",
        "transformer_blocks.*.attn.to_out.0": "rowwise",
        "transformer_blocks.*.attn.add_q_proj": "colwise",
        "transformer_blocks.*.attn.add_k_proj": "colwise",
        "transformer_blocks.*.attn.add_v_proj": "colwise",
        "transformer_blocks.*.attn.to_add_out": "rowwise",
        "transformer_blocks.*.ff.net.0.proj": PackedColwiseParallel([1, 1]),
        "transformer_blocks.*.ff.net.2": "rowwise",
        "transformer_blocks.*.ff_context.net.0.proj": PackedColwiseParallel([1, 1]),
        "transformer_blocks.*.ff_context.net.2": "rowwise",
        "single_transformer_blocks.*.attn.to_q": "colwise",
        "single_transformer_blocks.*.attn.to_k": "colwise",
        "single_transformer_blocks.*.attn.to_v": "colwise",
        "single_transformer_blocks.*.proj_mlp": PackedColwiseParallel([1, 1]),
        "single_transformer_blocks.*.proj_out": PackedRowwiseParallel([1, 4]),  # mlp_ratio 4
    }
    # TeaCache polynomial: identity (no published fit for Ovis-Image is known to us; the rel-L1
    # distance of the modulated input is used as is; fit one with tools/fit_tea_cache.py). Blocks:
    # the double-stream list, then the single-stream list (which, like FLUX.1's, takes and returns
    # both streams).
    cache_blocks = flux_cache_blocks((1.0, 0.0))

    def __init__(self, components: dict[str, Any], info: CheckpointInfo, **kwargs: Any) -> None:
        super().__init__(components, info, **kwargs)
        transformer = components.get(self.denoisers[0])
        if transformer is not None:
            # The attention processor splits heads by ``attn.heads`` and the single blocks split
            # ``proj_mlp``'s output by ``mlp_hidden_dim``: a tensor-parallel rank's column-sharded
            # linears hold fewer heads of the same size and its slice of each MLP half.
            count_local_heads(transformer, OvisImageAttention, lambda m: m.head_dim)
            for block in getattr(transformer, "single_transformer_blocks", ()):
                block.mlp_hidden_dim = block.proj_mlp.out_features // 2

    def encode_text_kwargs(self, texts: Sequence[str], num_images_per_prompt: int) -> dict[str, torch.Tensor | None]:
        embeds, _, text_ids, _ = self.pipe.encode_prompt(
            prompt=list(texts),
            do_classifier_free_guidance=False,  # the negative branch is encoded as its own text
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    # FLUX.1's packed latents with image ids, and its VAE unpacking and scaling: the same code
    _latents_and_kwargs = FluxAdapter._latents_and_kwargs
    decode = FluxAdapter.decode

    def guidance_kwargs(self, params: SamplingParams, batch: int) -> dict[str, Any]:
        return {}  # no guidance embedding: guidance is classic CFG only
