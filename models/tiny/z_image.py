"""Tiny Z-Image checkpoint: the real classes (``ZImageTransformer2DModel``, Qwen3 text encoder,
``AutoencoderKL``) at toy sizes, a locally built Qwen2 tokenizer with a Qwen3-style chat template."""

from __future__ import annotations

# Scheduler config of Tongyi-MAI/Z-Image-Turbo (static shift 3, no resolution-dependent shift).
_Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def z_image_pipeline(*, n_layers: int = 2, n_heads: int = 4):
    """A tiny ``ZImagePipeline``. ``n_layers`` / ``n_heads``: main blocks and attention heads
    (head dim 16; heads divisible by 2 for the parallel tests)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .tokenizer_builders import build_qwen2_tokenizer, qwen2_special_token_ids
    from .parts import QWEN3_CHAT_TEMPLATE, tiny_kl_vae, tiny_qwen3_config

    tokenizer = build_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    special = qwen2_special_token_ids(tokenizer)
    text_hidden = 32
    text_encoder = Qwen3Model(
        tiny_qwen3_config(tokenizer, text_hidden, 64, 2, 16)
    )
    latent_channels = 4
    vae = tiny_kl_vae(AutoencoderKL, latent_channels, scaling_factor=0.3611, shift_factor=0.1159,  # FLUX's
                      use_quant_conv=False, use_post_quant_conv=False)
    head_dim = 16
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=latent_channels,
        dim=head_dim * n_heads,
        n_layers=n_layers,
        n_refiner_layers=1,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        cap_feat_dim=text_hidden,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 128, 128],
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_Z_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
