"""Tiny components that several families' tiny checkpoints share (a four-level KL VAE, a T5
encoder, a Qwen3 text model), so each family's builder states only what is its own."""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL
from transformers import Qwen3Config, T5Config, T5EncoderModel

from .tokenizer_builders import qwen2_special_token_ids

# FLUX.1's flow-match scheduler config (resolution-dependent shift), which FLUX.2-klein and
# Ovis-Image ship too; their pipelines read base/max image_seq_len and base/max shift from it.
FLUX_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

# The Qwen3 chat template's layout for one user turn and a generation prompt; with
# ``enable_thinking=False`` Qwen3 adds an empty think block (FLUX.2-klein and Ovis-Image ask for
# that; Z-Image asks for thinking, so its prompt ends at the assistant header).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def tiny_kl_vae(cls: type = AutoencoderKL, latent_channels: int = 4, **config: Any) -> Any:
    """A KL VAE with four levels (scale 8, as the real ones), 16 channels per level."""
    return cls(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        **config,
    )


def tiny_t5(vocab_size: int, d_model: int, d_kv: int) -> T5EncoderModel:
    """A two-layer gated-GELU T5 encoder (FLUX.1's and SD3's third text encoder)."""
    return T5EncoderModel(T5Config(d_model=d_model, d_kv=d_kv, d_ff=64, num_layers=2, num_heads=4,
                                   vocab_size=vocab_size, relative_attention_num_buckets=8,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def tiny_qwen3_config(tokenizer: Any, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                      head_dim: int) -> Qwen3Config:
    """A two-head Qwen3 config over ``tokenizer`` (Z-Image's and FLUX.2's text encoders)."""
    return Qwen3Config(hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=head_dim, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       **{k: v for k, v in qwen2_special_token_ids(tokenizer).items()
                          if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
