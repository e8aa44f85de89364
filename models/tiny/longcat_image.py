"""Tiny LongCat-Image checkpoint: the real classes (``LongCatImageTransformer2DModel``,
``Qwen2_5_VLForConditionalGeneration``, ``AutoencoderKL``) at toy sizes, a locally built Qwen2
tokenizer. The pipeline hard-codes 16 latent channels, so the VAE has 16 (64 packed per token).

No ``text_processor`` is saved: the pipeline uses it only to rewrite prompts with the text
encoder's ``generate``, which ditserve does not serve (the runner equals the pipeline with
``enable_prompt_rewrite=False``); ``models/tiny/parts.py`` ``qwen2_vl_processor`` builds one where a
family needs it.
"""

from __future__ import annotations


def longcat_image_pipeline(*, n_layers: int = 1, n_single_layers: int = 2, n_heads: int = 4):
    """A tiny ``LongCatImagePipeline``.

    Args:
        n_layers, n_single_layers: double- and single-stream blocks.
        n_heads: attention heads (head dim 16; divisible by 2 for the parallel tests).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    from .parts import FLUX_SCHEDULER, tiny_kl_vae, tiny_qwen2_5_vl

    text_hidden = 32
    text_encoder, tokenizer = tiny_qwen2_5_vl(text_hidden)
    latent_channels = 16  # LongCatImagePipeline's num_channels_latents
    vae = tiny_kl_vae(AutoencoderKL, latent_channels, scaling_factor=0.3611, shift_factor=0.1159,  # FLUX's
                      use_quant_conv=False, use_post_quant_conv=False)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        num_layers=n_layers,
        num_single_layers=n_single_layers,
        attention_head_dim=16,
        num_attention_heads=n_heads,
        joint_attention_dim=text_hidden,
        pooled_projection_dim=text_hidden,
        axes_dims_rope=(4, 6, 6),
    )
    return LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_processor=None,
        transformer=transformer,
    )
