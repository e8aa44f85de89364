"""Tiny Ovis-Image checkpoint: the real classes (``OvisImageTransformer2DModel``, ``Qwen3Model``,
``AutoencoderKL``) at toy sizes, a locally built Qwen2 tokenizer with a Qwen3-style chat template."""

from __future__ import annotations


def ovis_image_pipeline(*, n_layers: int = 1, n_single_layers: int = 2, n_heads: int = 4):
    """A tiny ``OvisImagePipeline``.

    Args:
        n_layers, n_single_layers: double- and single-stream blocks.
        n_heads: attention heads (head dim 16; divisible by 2 for the parallel tests).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Model

    from .parts import FLUX_SCHEDULER, QWEN3_CHAT_TEMPLATE, tiny_kl_vae, tiny_qwen3_config
    from .tokenizer_builders import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_hidden = 32
    text_encoder = Qwen3Model(tiny_qwen3_config(tokenizer, text_hidden, 64, 2, 16))
    latent_channels = 4
    vae = tiny_kl_vae(AutoencoderKL, latent_channels, scaling_factor=0.3611, shift_factor=0.1159,  # FLUX's
                      use_quant_conv=False, use_post_quant_conv=False)
    transformer = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        out_channels=latent_channels * 4,
        num_layers=n_layers,
        num_single_layers=n_single_layers,
        attention_head_dim=16,
        num_attention_heads=n_heads,
        joint_attention_dim=text_hidden,
        axes_dims_rope=(4, 6, 6),
    )
    return OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
