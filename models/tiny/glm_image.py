"""Tiny GLM-Image checkpoint: the real classes (``GlmImageForConditionalGeneration`` as the
autoregressive prior with its ``GlmImageProcessor``, ``T5EncoderModel`` + ``ByT5Tokenizer`` as the
glyph encoder, ``GlmImageTransformer2DModel``, ``AutoencoderKL``) at toy sizes.

The processor is built with the PIL image processor (``GlmImageImageProcessorPil``: no torchvision)
and a locally built BPE tokenizer carrying GLM-Image's special tokens; ByT5 needs no vocabulary file.
The prior's vision vocabulary (what its ``lm_head`` samples) is the DiT's prior codebook; its eos
(``image_end_token_id``) lies outside it, so generation always runs the pipeline's
``max_new_tokens`` (at 64x64: a 16x16 preview grid, then the 2x2 target grid, then one more token).
"""

from __future__ import annotations

# the prior's vision vocabulary = the DiT's prior-token codebook
PRIOR_CODEBOOK = 64
# a special token that ``fault_token=True`` checkpoints leave outside the prior's embedding table
FAULT_TOKEN = "<|fault|>"

# GLM-Image's scheduler: flow-match Euler with the CogView4 shift (``calculate_shift`` of the
# pipeline: mu = sqrt(seq / 256) * 0.75 + 0.25, a linear time shift), as zai-org/GLM-Image ships it
GLM_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.25,
    max_shift=0.75,
    num_train_timesteps=1000,
    shift=1.0,
    time_shift_type="linear",
    use_dynamic_shifting=True,
)


def glm_image_pipeline(*, n_layers: int = 2, n_heads: int = 4, prior_layers: int = 1, fault_token: bool = False):
    """A tiny ``GlmImagePipeline``.

    Args:
        n_layers, n_heads: the DiT's blocks and attention heads (head dim 16; even for the parallel tests).
        prior_layers: decoder layers of the prior's language model.
        fault_token: add ``FAULT_TOKEN`` to the processor's tokenizer but not to the prior's embedding
            table (a test-only checkpoint: a prompt containing it makes the prior's ``generate`` fail
            while every other stage serves it).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import (
        ByT5Tokenizer,
        GlmImageConfig,
        GlmImageForConditionalGeneration,
        GlmImageImageProcessorPil,
        GlmImageProcessor,
    )

    from .parts import tiny_kl_vae, tiny_t5
    from .tokenizer_builders import GLM_IMAGE_CHAT_TEMPLATE, build_glm_image_tokenizer

    tokenizer = build_glm_image_tokenizer((FAULT_TOKEN,) if fault_token else ())
    processor = GlmImageProcessor(image_processor=GlmImageImageProcessorPil(), tokenizer=tokenizer,
                                  chat_template=GLM_IMAGE_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    prior = GlmImageForConditionalGeneration(GlmImageConfig(
        text_config=dict(
            vocab_size=len(tokenizer) - (1 if fault_token else 0),
            hidden_size=32, intermediate_size=64, num_hidden_layers=prior_layers, num_attention_heads=2,
            num_key_value_heads=1, vision_vocab_size=PRIOR_CODEBOOK, max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=ids("<|dit_token_16385|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, patch_size=16, image_size=256),
        vq_config=dict(embed_dim=16, num_embeddings=PRIOR_CODEBOOK, latent_channels=32),
        image_token_id=ids("<|image|>"),
        image_start_token_id=ids("<|dit_token_16384|>"),
        image_end_token_id=ids("<|dit_token_16385|>"),
    ))
    glyph_tokenizer = ByT5Tokenizer()
    text_hidden = 32
    glyph_encoder = tiny_t5(len(glyph_tokenizer), text_hidden, 8)
    latent_channels = 4
    vae = tiny_kl_vae(AutoencoderKL, latent_channels, latents_mean=[0.1, -0.2, 0.05, 0.0],
                      latents_std=[1.5, 0.8, 1.2, 1.0])
    transformer = GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=n_layers,
        attention_head_dim=16,
        num_attention_heads=n_heads,
        text_embed_dim=text_hidden,
        time_embed_dim=32,
        condition_dim=16,
        prior_vq_quantizer_codebook_size=PRIOR_CODEBOOK,
    )
    return GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=processor,
        text_encoder=glyph_encoder,
        vision_language_encoder=prior,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**GLM_IMAGE_SCHEDULER),
    )
