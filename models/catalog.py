"""The data of the model registry: one ``ModelSpec`` per model of the seed feature table
(``shared/reference/diffusion-features.md``, sections ImageGen, VideoGen and AudioGen), under the
table's "Model Identifier". Component class names, defaults and size rules come from the
diffusers 0.42.1 pipelines (``__init__`` type hints and ``__call__`` defaults) and, where a
checkpoint's ``model_index.json`` names a different class, from that file; distilled models take
their model card's recommended steps and guidance. ``seed_features`` copy the seed table row by
row, as a reference; what runs (``ModelSpec.features``) is declared by each family's adapter.
"""

from __future__ import annotations

from .registry import Components, Feature, Guidance, Modality, ModelSpec

# ---- feature rows, in the seed table's column order --------------------------------------------

_IMAGE_COLUMNS = (
    Feature.TEA_CACHE,
    Feature.CACHE_DIT,
    Feature.SEQUENCE_PARALLEL,
    Feature.CFG_PARALLEL,
    Feature.TENSOR_PARALLEL,
    Feature.LAYERWISE_OFFLOAD,
    Feature.LORA,
    Feature.VAE_PATCH_PARALLEL,
    Feature.FP8,
)
_VIDEO_COLUMNS = _IMAGE_COLUMNS[:-1]  # the VideoGen and AudioGen tables have no FP8 column


def _row(cells: str, columns: tuple[Feature, ...] = _IMAGE_COLUMNS) -> frozenset[Feature]:
    """The features of one table row, its cells written as in the table ("✅ ❌ ...")."""
    marks = cells.split()
    if len(marks) != len(columns) or set(marks) - {"✅", "❌"}:
        raise ValueError(f"feature row {cells!r} does not match the {len(columns)} table columns")
    return frozenset(feature for feature, mark in zip(columns, marks) if mark == "✅")


# ---- sizes ---------------------------------------------------------------------------------------


def _image_sizes(multiple: int = 16, width: int = 1024, height: int = 1024) -> dict:
    return dict(
        default_width=width, default_height=height, size_multiple=multiple, min_size=multiple, max_size=2048
    )


def _video_sizes(multiple: int, width: int = 832, height: int = 480) -> dict:
    return dict(
        default_width=width, default_height=height, size_multiple=multiple, min_size=multiple, max_size=1280
    )


# ---- components ----------------------------------------------------------------------------------

_FLOW_EULER = "FlowMatchEulerDiscreteScheduler"

_QWEN_IMAGE = Components(
    pipeline="QwenImagePipeline",
    transformer="QwenImageTransformer2DModel",
    vae="AutoencoderKLQwenImage",
    scheduler=_FLOW_EULER,
    text_encoders=("Qwen2_5_VLForConditionalGeneration",),
    tokenizers=("Qwen2Tokenizer",),
)
_LONGCAT_IMAGE = Components(
    pipeline="LongCatImagePipeline",
    transformer="LongCatImageTransformer2DModel",
    vae="AutoencoderKL",
    scheduler=_FLOW_EULER,
    text_encoders=("Qwen2_5_VLForConditionalGeneration",),
    tokenizers=("Qwen2Tokenizer",),
)
_WAN = Components(
    pipeline="WanPipeline",
    transformer="WanTransformer3DModel",
    vae="AutoencoderKLWan",
    scheduler="UniPCMultistepScheduler",  # model_index.json; the pipeline's type hint says FlowMatchEuler
    text_encoders=("UMT5EncoderModel",),
    tokenizers=("T5TokenizerFast",),
)


def _with_pipeline(components: Components, pipeline: str) -> Components:
    return components.model_copy(update={"pipeline": pipeline})


# Qwen-Image family: true CFG (negative prompt + true_cfg_scale); the transformer has no guidance
# embedding, so guidance_scale stays unset.
_QWEN_DEFAULTS = dict(guidance=Guidance.TRUE_CFG, num_inference_steps=50, true_cfg_scale=4.0, guidance_scale=None)
_WAN_A14B_NOTE = (
    "Two 14B experts: transformer (high noise) and transformer_2 (low noise), switched at "
    "boundary_ratio {ratio}; guidance_scale_2 (low-noise expert) defaults to guidance_scale. Defaults "
    "as diffusers' Wan2.2 A14B example (40 steps, 1280x720, 81 frames at 16 fps)."
)

# Stable Diffusion 3.5: classic CFG with guidance_scale; like StableDiffusion3Pipeline, the negative
# prompt is "" when a request gives none and CFG is on (guidance_scale > 1).
_SD3 = Components(
    pipeline="StableDiffusion3Pipeline",
    transformer="SD3Transformer2DModel",
    vae="AutoencoderKL",
    scheduler=_FLOW_EULER,
    text_encoders=("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
    tokenizers=("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast"),
)
_SD35_LARGE_DEFAULTS = dict(guidance=Guidance.CFG, num_inference_steps=28, guidance_scale=3.5)
_SD35_SEED_ROW = _row("❌ ✅ ❌ ✅ ❌ ❌ ✅ ❌ ❌")
_SD3_NOTE = (
    "CLIP-L + CLIP-G + T5 text encoders; classic CFG (guidance_scale, negative_prompt; off at "
    "guidance_scale <= 1), both branches in one transformer call per step."
)

MODELS: list[ModelSpec] = [
    # ---- ImageGen -------------------------------------------------------------------------------
    ModelSpec(
        id="ByteDance-Seed/BAGEL-7B-MoT",
        name="Bagel",
        family="bagel",
        modality=Modality.IMAGE,
        components=Components(),
        guidance=Guidance.CFG,
        num_inference_steps=50,
        guidance_scale=4.0,
        **_image_sizes(16),
        seed_features=_row("✅ ✅ ❌ ❌ ❌ ❌ ✅ ❌ ❌"),
        notes=(
            "Not in diffusers 0.42: no pipeline or component classes. Unified understanding/generation "
            "MoT model; defaults follow its reference inference (50 steps, text CFG 4.0, FLUX VAE 8x "
            "with 2x2 patches)."
        ),
    ),
    ModelSpec(
        id="black-forest-labs/FLUX.1-dev",
        name="FLUX.1-dev",
        family="flux",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="FluxPipeline",
            transformer="FluxTransformer2DModel",
            vae="AutoencoderKL",
            scheduler=_FLOW_EULER,
            text_encoders=("CLIPTextModel", "T5EncoderModel"),
            tokenizers=("CLIPTokenizer", "T5TokenizerFast"),
        ),
        guidance=Guidance.DISTILLED,
        num_inference_steps=28,
        guidance_scale=3.5,
        **_image_sizes(16),
        seed_features=_row("❌ ✅ ❌ ❌ ✅ ❌ ✅ ❌ ❌"),
        notes="Guidance-distilled: guidance_scale enters the transformer as an embedding (one call per step).",
    ),
    ModelSpec(
        id="black-forest-labs/FLUX.2-klein-4B",
        name="FLUX.2-klein",
        family="flux2-klein",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="Flux2KleinPipeline",
            transformer="Flux2Transformer2DModel",
            vae="AutoencoderKLFlux2",
            scheduler=_FLOW_EULER,
            text_encoders=("Qwen3ForCausalLM",),
            tokenizers=("Qwen2TokenizerFast",),
        ),
        guidance=Guidance.NONE,
        num_inference_steps=4,
        guidance_scale=1.0,
        **_image_sizes(16),
        seed_features=_row("❌ ❌ ❌ ✅ ✅ ❌ ✅ ❌ ❌"),
        notes=(
            "Step-distilled (4 steps, guidance 1.0): with is_distilled=True the pipeline runs no CFG and "
            "ignores guidance_scale, and the transformer gets no guidance embedding. CFG (and so CFG-Parallel) "
            "applies to the undistilled klein-base checkpoints (pipeline default 50 steps, guidance 4.0)."
        ),
    ),
    ModelSpec(
        id="THUDM/glm-4-vision",
        name="GLM-Image",
        family="glm-image",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="GlmImagePipeline",
            transformer="GlmImageTransformer2DModel",
            vae="AutoencoderKL",
            scheduler=_FLOW_EULER,
            text_encoders=("T5EncoderModel", "GlmImageForConditionalGeneration"),
            tokenizers=("ByT5Tokenizer", "GlmImageProcessor"),
        ),
        guidance=Guidance.CFG,
        num_inference_steps=50,
        guidance_scale=1.5,
        **_image_sizes(32),
        seed_features=_row("❌ ❌ ❌ ❌ ❌ ❌ ✅ ❌ ❌"),
        notes=(
            "Identifier as in the seed table; the diffusers checkpoint is zai-org/GLM-Image. Two stages: the "
            "autoregressive GlmImageForConditionalGeneration (vision_language_encoder, with GlmImageProcessor) "
            "writes prior tokens, then the DiT decodes; T5EncoderModel + ByT5Tokenizer encode glyph text. "
            "Sizes must be multiples of 32; text-to-image needs explicit height/width (1024 chosen here)."
        ),
    ),
    ModelSpec(
        id="meituan-longcat/LongCat-Image",
        name="LongCat-Image",
        family="longcat-image",
        modality=Modality.IMAGE,
        components=_LONGCAT_IMAGE,
        guidance=Guidance.CFG,
        num_inference_steps=50,
        guidance_scale=4.5,
        **_image_sizes(16),
        seed_features=_row("❌ ✅ ✅ ✅ ✅ ❌ ✅ ❌ ❌"),
        notes=(
            "Defaults are LongCatImagePipeline's (50 steps, guidance 4.5, 1024x1024); classic CFG with the negative "
            "prompt (\"\" by default) and the pipeline's cfg renorm. The pipeline's prompt rewriting (its "
            "Qwen2VLProcessor text_processor and the text encoder's generate) is not served."
        ),
    ),
    ModelSpec(
        id="meituan-longcat/LongCat-Image-Edit",
        name="LongCat-Image-Edit",
        family="longcat-image-edit",
        modality=Modality.IMAGE,
        task="image-edit",
        components=_with_pipeline(_LONGCAT_IMAGE, "LongCatImageEditPipeline"),
        guidance=Guidance.CFG,
        num_inference_steps=50,
        guidance_scale=4.5,
        max_input_images=1,
        condition_pixels=1024 * 1024,
        size_follows_input=True,
        **_image_sizes(16),
        seed_features=_row("❌ ✅ ✅ ✅ ✅ ❌ ✅ ❌ ❌"),
        notes=(
            "Defaults are LongCatImageEditPipeline's (50 steps, guidance 4.5, classic CFG with the negative prompt "
            "\"\" by default, no cfg renorm). One input image; the output is its size resized to about 1024x1024 "
            "(the pipeline takes no width/height: size is refused). The text encoder reads the image at half that "
            "size through the text_processor (Qwen2VLProcessor)."
        ),
    ),
    ModelSpec(
        id="OvisAI/Ovis-Image",
        name="Ovis-Image",
        family="ovis-image",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="OvisImagePipeline",
            transformer="OvisImageTransformer2DModel",
            vae="AutoencoderKL",
            scheduler=_FLOW_EULER,
            text_encoders=("Qwen3Model",),
            tokenizers=("Qwen2TokenizerFast",),
        ),
        guidance=Guidance.CFG,
        num_inference_steps=50,
        guidance_scale=5.0,
        **_image_sizes(16),
        seed_features=_row("❌ ✅ ❌ ✅ ❌ ❌ ✅ ❌ ❌"),
        notes=(
            "Identifier as in the seed table; the diffusers checkpoint is AIDC-AI/Ovis-Image-7B. Defaults are "
            "OvisImagePipeline's (50 steps, guidance 5.0, 1024x1024); classic CFG with the negative prompt "
            "(\"\" by default) runs when guidance_scale > 1, as two serial transformer calls per step."
        ),
    ),
    ModelSpec(
        id="Qwen/Qwen-Image",
        name="Qwen-Image",
        family="qwen-image",
        modality=Modality.IMAGE,
        components=_QWEN_IMAGE,
        **_QWEN_DEFAULTS,
        **_image_sizes(16),
        seed_features=_row("✅ ✅ ✅ ✅ ✅ ✅ ✅ ❌ ✅"),
    ),
    ModelSpec(
        id="Qwen/Qwen-Image-2512",
        name="Qwen-Image-2512",
        family="qwen-image",
        modality=Modality.IMAGE,
        components=_QWEN_IMAGE,
        **_QWEN_DEFAULTS,
        **_image_sizes(16),
        seed_features=_row("✅ ✅ ✅ ✅ ✅ ✅ ✅ ❌ ✅"),
    ),
    ModelSpec(
        id="Qwen/Qwen-Image-Edit",
        name="Qwen-Image-Edit",
        family="qwen-image-edit",
        modality=Modality.IMAGE,
        task="image-edit",
        components=_with_pipeline(_QWEN_IMAGE, "QwenImageEditPipeline"),
        **_QWEN_DEFAULTS,
        max_input_images=1,
        condition_pixels=1024 * 1024,
        **_image_sizes(16),
        seed_features=_row("✅ ✅ ✅ ✅ ✅ ✅ ✅ ❌ ❌"),
        notes=(
            "One input image; output size follows it (about 1024x1024 area). The pipeline also loads a "
            "Qwen2VLProcessor (processor) to feed the image to the text encoder."
        ),
    ),
    ModelSpec(
        id="Qwen/Qwen-Image-Edit-2509",
        name="Qwen-Image-Edit-2509",
        family="qwen-image-edit-plus",
        modality=Modality.IMAGE,
        task="image-edit",
        components=_with_pipeline(_QWEN_IMAGE, "QwenImageEditPlusPipeline"),
        **_QWEN_DEFAULTS,
        max_input_images=3,
        condition_pixels=1024 * 1024,
        **_image_sizes(16),
        seed_features=_row("✅ ✅ ✅ ✅ ✅ ✅ ✅ ❌ ❌"),
        notes=(
            "Multi-image editing (1-3 input images); output size follows the last input image (about "
            "1024x1024 area). The pipeline also loads a Qwen2VLProcessor (processor)."
        ),
    ),
    ModelSpec(
        id="Qwen/Qwen-Image-Layered",
        name="Qwen-Image-Layered",
        family="qwen-image-layered",
        modality=Modality.IMAGE,
        task="image-layered",
        components=_with_pipeline(_QWEN_IMAGE, "QwenImageLayeredPipeline"),
        **_QWEN_DEFAULTS,
        max_input_images=1,
        condition_pixels=640 * 640,
        size_follows_input=True,
        **_image_sizes(16, width=640, height=640),
        seed_features=_row("❌ ✅ ✅ ✅ ✅ ✅ ✅ ❌ ❌"),
        notes=(
            "Decomposes an input image into RGBA layers (layers=4 by default). Output size follows the input "
            "image at resolution bucket 640 (default) or 1024, not width/height. Also loads a Qwen2VLProcessor."
        ),
    ),
    ModelSpec(
        id="stabilityai/stable-diffusion-3.5",
        name="Stable-Diffusion3.5",
        family="sd3",
        modality=Modality.IMAGE,
        components=_SD3,
        **_SD35_LARGE_DEFAULTS,
        **_image_sizes(16),
        seed_features=_SD35_SEED_ROW,
        notes=(
            "Identifier as in the seed table; the Hub checkpoints are stabilityai/stable-diffusion-3.5-large, "
            "-large-turbo and -medium (registered below with their model cards' defaults); this one takes "
            "SD3.5 Large's (28 steps, guidance 3.5). " + _SD3_NOTE
        ),
    ),
    ModelSpec(
        id="stabilityai/stable-diffusion-3.5-large",
        name="Stable Diffusion 3.5 Large",
        family="sd3",
        modality=Modality.IMAGE,
        components=_SD3,
        **_SD35_LARGE_DEFAULTS,
        **_image_sizes(16),
        seed_features=_SD35_SEED_ROW,
        notes="Model card: 28 steps, guidance 3.5. " + _SD3_NOTE,
    ),
    ModelSpec(
        id="stabilityai/stable-diffusion-3.5-large-turbo",
        name="Stable Diffusion 3.5 Large Turbo",
        family="sd3",
        modality=Modality.IMAGE,
        components=_SD3,
        guidance=Guidance.CFG,
        num_inference_steps=4,
        guidance_scale=0.0,
        **_image_sizes(16),
        seed_features=_SD35_SEED_ROW,
        notes=(
            "Adversarially distilled: the model card runs 4 steps at guidance 0 (CFG off, one transformer "
            "call per step); a request may still turn CFG on with guidance_scale > 1. " + _SD3_NOTE
        ),
    ),
    ModelSpec(
        id="stabilityai/stable-diffusion-3.5-medium",
        name="Stable Diffusion 3.5 Medium",
        family="sd3",
        modality=Modality.IMAGE,
        components=_SD3,
        guidance=Guidance.CFG,
        num_inference_steps=40,
        guidance_scale=4.5,
        **_image_sizes(16),
        seed_features=_SD35_SEED_ROW,
        notes="Model card: 40 steps, guidance 4.5; MMDiT-X (dual attention in the first blocks). " + _SD3_NOTE,
    ),
    ModelSpec(
        id="Tongyi-MAI/Z-Image-Turbo",
        name="Z-Image",
        family="z-image",
        modality=Modality.IMAGE,
        components=Components(
            pipeline="ZImagePipeline",
            transformer="ZImageTransformer2DModel",
            vae="AutoencoderKL",
            scheduler=_FLOW_EULER,
            text_encoders=("Qwen3Model",),
            tokenizers=("Qwen2Tokenizer",),
        ),
        guidance=Guidance.CFG,
        num_inference_steps=9,
        guidance_scale=0.0,
        cfg_threshold=0.0,
        **_image_sizes(16),
        seed_features=_row("✅ ✅ ✅ ❌ ✅ ❌ ✅ ✅ ✅"),
        notes=(
            "Step-distilled Turbo: 9 steps, guidance 0.0 (model card). The pipeline applies CFG only when "
            "guidance_scale > 0, so none runs by default. Tensor parallel: TP=2 only."
        ),
    ),
    # ---- VideoGen -------------------------------------------------------------------------------
    ModelSpec(
        id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        name="Wan2.2-T2V",
        family="wan2.2",
        modality=Modality.VIDEO,
        task="text-to-video",
        components=_WAN,
        guidance=Guidance.CFG,
        num_inference_steps=40,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        boundary_ratio=0.875,
        **_video_sizes(16, 1280, 720),
        num_frames=81,
        fps=16,
        seed_features=_row("❌ ✅ ✅ ✅ ✅ ✅ ✅ ❌", _VIDEO_COLUMNS),
        notes=_WAN_A14B_NOTE.format(ratio=0.875),
    ),
    ModelSpec(
        id="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        name="Wan2.2-I2V",
        family="wan2.2-i2v",  # WanImageToVideoPipeline: its own adapter (an input image, required)
        modality=Modality.VIDEO,
        task="image-to-video",
        components=_with_pipeline(_WAN, "WanImageToVideoPipeline"),
        guidance=Guidance.CFG,
        num_inference_steps=40,
        guidance_scale=3.5,
        guidance_scale_2=3.5,
        boundary_ratio=0.9,
        max_input_images=1,
        **_video_sizes(16, 1280, 720),
        num_frames=81,
        fps=16,
        seed_features=_row("❌ ✅ ✅ ✅ ✅ ✅ ✅ ❌", _VIDEO_COLUMNS),
        notes=_WAN_A14B_NOTE.format(ratio=0.9) + " No CLIP image encoder (Wan2.2 conditions on VAE latents): "
        "the input image (input_reference; required) is resized to the output size and VAE-encoded as the first "
        "frame of a video of zeros; a first-frame mask and those latents are concatenated to the noise on channels.",
    ),
    ModelSpec(
        id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        name="Wan2.2-TI2V",
        family="wan2.2",
        modality=Modality.VIDEO,
        task="text-image-to-video",
        components=_WAN,
        guidance=Guidance.CFG,
        num_inference_steps=50,
        guidance_scale=5.0,
        **_video_sizes(32, 1280, 704),
        num_frames=121,
        fps=24,
        max_input_images=1,
        min_input_images=0,  # text-to-video, or text+image (the image becomes the first latent frame)
        seed_features=_row("❌ ✅ ✅ ✅ ✅ ✅ ✅ ❌", _VIDEO_COLUMNS),
        notes=(
            "One 5B transformer; its VAE compresses 16x spatially, so sizes are multiples of 32. The checkpoint "
            "is a WanPipeline (expand_timesteps=True); image conditioning loads it into "
            "WanImageToVideoPipeline. The model card uses 1280x704, 121 frames at 24 fps."
        ),
    ),
    # ---- AudioGen -------------------------------------------------------------------------------
    ModelSpec(
        id="stabilityai/stable-audio-open-1.0",
        name="Stable-Audio-Open",
        family="stable-audio",
        modality=Modality.AUDIO,
        task="text-to-audio",
        components=Components(
            pipeline="StableAudioPipeline",
            transformer="StableAudioDiTModel",
            vae="AutoencoderOobleck",
            scheduler="CosineDPMSolverMultistepScheduler",  # model_index.json; type hint: EDMDPMSolver...
            text_encoders=("T5EncoderModel",),
            tokenizers=("T5TokenizerFast",),
        ),
        guidance=Guidance.CFG,
        num_inference_steps=100,
        guidance_scale=7.0,
        # width/height do not apply to audio: every size field is 1.
        default_width=1,
        default_height=1,
        size_multiple=1,
        min_size=1,
        max_size=1,
        # pipeline default = the longest clip: transformer sample_size x VAE hop_length / sampling rate
        audio_seconds=1024 * 2048 / 44100,
        max_audio_seconds=1024 * 2048 / 44100,
        audio_sample_rate=44100,
        audio_channels=2,
        cfg_null_uncond=True,  # the pipeline's unconditional branch without a negative prompt: zeros
        seed_features=_row("❌ ❌ ❌ ❌ ❌ ❌ ✅ ❌", _VIDEO_COLUMNS),
        notes=(
            "Width/height do not apply (all size fields are 1); length is audio_seconds, at most about "
            "47.55 s of 44.1 kHz stereo, in steps of the VAE hop length (2048 samples). Also loads a "
            "StableAudioProjectionModel (projection_model) for the text and timing conditioning. Defaults are "
            "StableAudioPipeline's (100 steps, guidance 7.0, the longest clip); without a negative prompt CFG's "
            "unconditional branch is zero conditioning, as in the pipeline. Its CosineDPMSolverMultistepScheduler "
            "needs the torchsde package at run time."
        ),
    ),
]
