"""Tiny Ovis-Image checkpoint: the real classes (``OvisImageTransformer2DModel``, ``Qwen3Model``,
``AutoencoderKL``) at toy sizes, a locally built Qwen2 tokenizer with a Qwen3-style chat template."""

from __future__ import annotations

# FLUX.1's flow-match scheduler config (resolution-dependent shift); the pipeline reads
# base/max image_seq_len and base/max shift from it exactly as FluxPipeline does.
_OVIS_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

# The Qwen3 chat template's layout for one user turn and a generation prompt; with
# ``enable_thinking=False`` (as the pipeline asks) Qwen3 adds an empty think block.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def ovis_image_pipeline(*, n_layers: int = 1, n_single_layers: int = 2, n_heads: int = 4):
    """A tiny ``OvisImagePipeline``.

    Args:
        n_layers, n_single_layers: double- and single-stream blocks.
        n_heads: attention heads (head dim 16; divisible by 2 for the parallel tests).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Model

    from .parts import tiny_kl_vae, tiny_qwen3_config
    from .tokenizer_builders import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
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
        scheduler=FlowMatchEulerDiscreteScheduler(**_OVIS_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
