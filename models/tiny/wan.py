"""Tiny Wan2.2 checkpoints: the real classes (``WanTransformer3DModel``, ``UMT5EncoderModel``,
``AutoencoderKLWan``, ``UniPCMultistepScheduler`` with flow shift) at toy sizes, a locally built T5
tokenizer. Three layouts, as published: the A14B one (two experts switched at ``boundary_ratio``,
the Wan2.1 VAE: 8x spatial), its image-to-video twin I2V-A14B (a ``WanImageToVideoPipeline`` without
CLIP image encoder: the experts read the noise, a 4-channel first-frame mask and the input image's
VAE latents concatenated on channels) and the TI2V-5B one (one expert, ``expand_timesteps``, the
Wan2.2 VAE: 16x spatial with a 2x2 patchified input)."""

from __future__ import annotations

# Wan2.2's scheduler_config.json (T2V-A14B; TI2V-5B differs only in flow_shift 5.0)
WAN_SCHEDULER = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    solver_order=2,
    solver_type="bh2",
    lower_order_final=True,
    use_flow_sigmas=True,
    flow_shift=3.0,
    predict_x0=True,
    sample_max_value=1.0,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)


def _transformer(in_channels: int, n_layers: int, n_heads: int, text_dim: int, out_channels: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=n_heads, attention_head_dim=8, in_channels=in_channels,
        out_channels=out_channels or in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=n_layers,
        rope_max_seq_len=64,
    )


def wan_pipeline(*, ti2v: bool = False, i2v: bool = False, n_layers: int = 2, n_heads: int = 4):
    """A tiny ``WanPipeline``: two experts (``boundary_ratio`` 0.875, as T2V-A14B) or, with ``ti2v``,
    one expert with ``expand_timesteps`` and the Wan2.2 VAE (as TI2V-5B); with ``i2v`` a
    ``WanImageToVideoPipeline`` with two experts (``boundary_ratio`` 0.9, as I2V-A14B) whose input
    channels are noise + mask (the VAE's temporal factor, 4) + image latents, and no image encoder.

    Args:
        n_layers: blocks per expert.
        n_heads: attention heads (head dim 8; divisible by 2 for the parallel tests).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizer_builders import build_t5_tokenizer, t5_special_token_ids

    tokenizer = build_t5_tokenizer()
    text_dim = 32
    text_encoder = UMT5EncoderModel(UMT5Config(
        d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=len(tokenizer),
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        **t5_special_token_ids(tokenizer)))
    if ti2v:
        z_dim = 8
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
            latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
        )
    else:
        z_dim = 4
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[-0.2, 0.1, 0.3, -0.1], latents_std=[1.5, 2.0, 0.8, 1.2],
        )
    if i2v:  # noise, the first-frame mask (4 channels) and the image latents, concatenated
        experts = [_transformer(2 * z_dim + 4, n_layers, n_heads, text_dim, out_channels=z_dim) for _ in range(2)]
        scheduler = UniPCMultistepScheduler(**{**WAN_SCHEDULER, "flow_shift": 5.0})
        return WanImageToVideoPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, image_processor=None,
            image_encoder=None, transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.9,
        )
    transformer = _transformer(z_dim, n_layers, n_heads, text_dim)
    transformer_2 = None if ti2v else _transformer(z_dim, n_layers, n_heads, text_dim)
    scheduler = UniPCMultistepScheduler(**{**WAN_SCHEDULER, "flow_shift": 5.0 if ti2v else 3.0})
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        transformer_2=transformer_2, boundary_ratio=None if ti2v else 0.875, expand_timesteps=ti2v,
    )
