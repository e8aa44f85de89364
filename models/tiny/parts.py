"""Tiny components that several families' tiny checkpoints share (a four-level KL VAE, a T5
encoder, a Qwen3 text model, a Qwen2.5-VL text encoder and its processor), so each family's
builder states only what is its own."""

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


def tiny_qwen2_5_vl(hidden_size: int = 32, *, processor: bool = False) -> tuple[Any, ...]:
    """A two-layer ``Qwen2_5_VLForConditionalGeneration`` (with a one-block vision tower) over a
    locally built Qwen2 tokenizer (Qwen-Image's and LongCat-Image's text encoder).

    Args:
        hidden_size: the language model's width (the DiT's ``joint_attention_dim``).
        processor: also build a ``Qwen2VLProcessor`` for image inputs (``qwen2_vl_processor``).

    Returns:
        ``(text_encoder, tokenizer)``, or ``(text_encoder, tokenizer, processor)``.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .tokenizer_builders import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    special = qwen2_special_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "rope_parameters": {"mrope_section": [2, 3, 3], "rope_type": "default", "rope_theta": 1000000.0},
            "max_position_embeddings": 2048,
            "bos_token_id": special["bos_token_id"],
            "eos_token_id": special["eos_token_id"],
            "pad_token_id": special["pad_token_id"],
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden_size},
        vocab_size=len(tokenizer),
        image_token_id=special["image_token_id"],
        video_token_id=special["video_token_id"],
        vision_start_token_id=special["vision_start_token_id"],
        vision_end_token_id=special["vision_end_token_id"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    if processor:
        return text_encoder, tokenizer, qwen2_vl_processor(tokenizer)
    return text_encoder, tokenizer


def qwen2_vl_processor(tokenizer: Any) -> Any:
    """A ``Qwen2VLProcessor`` over ``tokenizer`` with transformers' PIL image processor (no
    torchvision needed; its defaults match ``tiny_qwen2_5_vl``'s vision tower: patch 14, merge 2).

    With torchvision installed the processor has its usual video processor and saves and reloads
    as usual. Without it, transformers can build no video processor, and ``ProcessorMixin``
    refuses a processor without one (its class check looks the video base class up among
    transformers' exports, which then lack it): this processor is built with that check skipped
    for this one instance; it tokenizes text and processes images, but cannot be saved.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessorPil()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
        proc.check_argument_for_proper_class = lambda name, arg: None  # instance only, removed below
        Qwen2VLProcessor.__init__(proc, image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
        del proc.check_argument_for_proper_class
        return proc
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())
