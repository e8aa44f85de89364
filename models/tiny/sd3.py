"""Tiny Stable Diffusion 3.5 checkpoint: ``StableDiffusion3Pipeline`` with its real classes
(``SD3Transformer2DModel``, CLIP-L and CLIP-G ``CLIPTextModelWithProjection``, T5
``T5EncoderModel``, ``AutoencoderKL``) at toy sizes, tokenizers built locally.

The transformer has SD3.5's RMS q/k norm and one SD3.5-Medium dual-attention block (layer 0), so
both variants' code paths run; the last block is ``context_pre_only`` as in every SD3 model.
"""

from __future__ import annotations

# Scheduler config of stabilityai/stable-diffusion-3.5-large (and -medium): a static shift of 3,
# no resolution-dependent shift.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def sd3_pipeline(num_layers: int = 2, num_attention_heads: int = 4):
    """The tiny pipeline (random weights drawn from the global torch generator)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .tokenizer_builders import build_clip_tokenizer, build_t5_tokenizer, clip_special_token_ids
    from .parts import tiny_kl_vae, tiny_t5

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()

    def clip(hidden: int, projection: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=hidden,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=projection,
                vocab_size=len(clip_tok),
                max_position_embeddings=77,
                **clip_special_token_ids(clip_tok),
            )
        )

    clip_l, clip_g = clip(32, 32), clip(32, 32)  # the pipeline pads CLIP-L+G (64 wide) to T5's width
    t5_width = 64
    t5 = tiny_t5(len(t5_tok), t5_width, 16)
    latent_channels = 4
    vae = tiny_kl_vae(AutoencoderKL, latent_channels, scaling_factor=1.5305, shift_factor=0.0609,  # SD3.5's
                      use_quant_conv=False, use_post_quant_conv=False)
    head_dim = 16
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=head_dim * num_attention_heads,
        pooled_projection_dim=32 + 32,
        pos_embed_max_size=64,  # up to 1024 px
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
        transformer=transformer,
    )
