"""Tiny FLUX.2-klein checkpoint: the real classes (``Flux2Transformer2DModel``, ``Qwen3ForCausalLM``,
``AutoencoderKLFlux2``) at toy sizes, a locally built Qwen2 tokenizer with a Qwen3-style chat
template. The text encoder has 27 (tiny) layers because the pipeline stacks hidden states 9, 18
and 27."""

from __future__ import annotations


def flux2_klein_pipeline(*, distilled: bool = True, n_layers: int = 1, n_single_layers: int = 2, n_heads: int = 4):
    """A tiny ``Flux2KleinPipeline``.

    Args:
        distilled: ``is_distilled`` of the pipeline (klein-4B: True, no CFG; klein-base: False).
        n_layers, n_single_layers: double- and single-stream blocks.
        n_heads: attention heads (head dim 16; divisible by 2 for the parallel tests).
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .tokenizer_builders import build_qwen2_tokenizer, qwen2_special_token_ids
    from .parts import FLUX_SCHEDULER, QWEN3_CHAT_TEMPLATE, tiny_kl_vae, tiny_qwen3_config

    tokenizer = build_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    special = qwen2_special_token_ids(tokenizer)
    text_hidden = 16
    text_encoder = Qwen3ForCausalLM(
        tiny_qwen3_config(tokenizer, text_hidden, 32, 27, 8)  # the pipeline reads hidden states 9, 18 and 27
    )
    latent_channels = 4
    vae = tiny_kl_vae(AutoencoderKLFlux2, latent_channels)
    # non-trivial batch-norm statistics, so the decode's de-normalisation is exercised
    g = torch.Generator().manual_seed(0)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        num_layers=n_layers,
        num_single_layers=n_single_layers,
        attention_head_dim=16,
        num_attention_heads=n_heads,
        joint_attention_dim=3 * text_hidden,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
