"""Input images (editing): the one place uploaded image data is checked and decoded.

Everything a client sends as an image passes ``read_images`` at the edge (the Router; the
reference runner too), before any model sees it. What it guarantees, each violation a
``RequestError`` (4xx) naming the field (``image[1]: 40000x40000 exceeds the 16 megapixel limit``):

- formats PNG, JPEG and WebP only, recognized by their magic bytes (not by a name or a content
  type the client chose), and parsed by that format's Pillow plugin alone;
- the pixel count checked from the header before any pixel is decoded (decompression bombs): the
  plugin class is constructed directly, which reads the header only; ``Image.open``'s own bomb
  check would refuse with a message that names no size, and only above twice its global limit;
- a byte cap per file and per request, an image-count cap per model (``ModelSpec.max_input_images``,
  lowered by ``max_images``), a smallest side and a largest aspect ratio;
- truncated or corrupt data found while decoding, EXIF orientation applied (``ImageOps.exif_transpose``);
- alpha kept as RGBA (an image with transparency) or dropped to RGB; the family adapter converts to
  what its pipeline reads (the edit pipelines: RGB, as their processors convert).

Each image also gets a content key (SHA-256 of its decoded pixels and shape): the conditioning
cache of the TextEncoder and VAE replicas is keyed by it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile
from PIL.PngImagePlugin import PngImageFile
from pydantic import BaseModel, ConfigDict, Field

from ditserve.models import ModelSpec

from .schema import RequestError

_MB = 1024 * 1024


class ImageInputConfig(BaseModel):
    """Limits on input images (editing models) and the conditioning cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_pixels: int = Field(16_000_000, ge=1, description="Largest input image, in pixels (width x height), "
                                  "checked from the file header before anything is decoded.")
    min_image_side: int = Field(16, ge=1, description="Smallest width and height of an input image, in pixels.")
    max_aspect_ratio: float = Field(8.0, ge=1, description="Largest long side / short side of an input image.")
    max_image_bytes: int = Field(20 * _MB, ge=1, description="Largest encoded input image, in bytes (per file).")
    max_images_bytes: int = Field(40 * _MB, ge=1, description="Largest total of a request's encoded input images, "
                                  "in bytes.")
    max_images: int | None = Field(None, ge=1, description="Input images per request, at most; lowers the model's "
                                   "own limit (Qwen-Image-Edit 1, Qwen-Image-Edit-2509 3); default: the model's.")
    conditioning_cache_mb: float = Field(
        256.0, ge=0, description="Per TextEncoder and VAE replica: MiB of input images' vision-language "
        "conditioning and VAE latents kept by content hash (LRU), so a repeated image skips both encodes; "
        "0 turns the cache off.",
    )


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


def sniff(data: bytes) -> str | None:
    """The format of encoded image ``data`` by its magic bytes: PNG, JPEG, WEBP, or GIF/None (refused)."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _plugin(fmt: str) -> type:
    if fmt == "PNG":
        return PngImageFile
    if fmt == "JPEG":
        return JpegImageFile
    from PIL.WebPImagePlugin import WebPImageFile

    return WebPImageFile


def _check_size(field: str, width: int, height: int, config: ImageInputConfig) -> None:
    if width * height > config.max_image_pixels:
        raise RequestError(field, f"{width}x{height} exceeds the {config.max_image_pixels / 1e6:g} megapixel limit",
                           status=413)
    if min(width, height) < config.min_image_side:
        raise RequestError(field, f"{width}x{height} is smaller than {config.min_image_side} pixels on a side")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise RequestError(field, f"{width}x{height} has an aspect ratio above {config.max_aspect_ratio:g}")


def _normalized(image: Image.Image) -> np.ndarray:
    """EXIF orientation applied; RGBA when the image has transparency, else RGB; uint8 (H, W, C)."""
    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8)


def _decode(field: str, data: bytes, config: ImageInputConfig) -> np.ndarray:
    if len(data) > config.max_image_bytes:
        raise RequestError(field, f"{len(data)} bytes exceed the per-image limit of {config.max_image_bytes}",
                           status=413)
    fmt = sniff(data)
    if fmt is None:
        raise RequestError(field, "is not a PNG, JPEG or WebP image", status=415)
    if fmt == "GIF":
        raise RequestError(field, "GIF is not accepted; send PNG, JPEG or WebP", status=415)
    try:
        image = _plugin(fmt)(io.BytesIO(data))  # the header only: no pixel decoded yet
    except Exception as exc:  # noqa: BLE001 - any parse failure of client data is the client's
        raise RequestError(field, f"unreadable {fmt} header: {exc}") from None
    _check_size(field, *image.size, config)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise RequestError(field, f"truncated or corrupt {fmt} data: {exc}") from None
    return _normalized(image)


def _from_array(field: str, value: np.ndarray, config: ImageInputConfig) -> np.ndarray:
    if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (1, 3, 4)):
        raise RequestError(field, f"an array image must be uint8 (H, W), (H, W, 3) or (H, W, 4); got "
                           f"{value.dtype} {tuple(value.shape)}")
    _check_size(field, value.shape[1], value.shape[0], config)
    if value.ndim == 2 or value.shape[2] == 1:
        value = np.repeat(value.reshape(value.shape[0], value.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(value)


def image_key(array: np.ndarray) -> str:
    """Content key of a decoded image (the conditioning cache's key)."""
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def read_images(values: Sequence[Any] | None, spec: ModelSpec, config: ImageInputConfig | None = None,
                field: str = "image", indexed: bool = True) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """Check and decode a request's input images for model ``spec``.

    Args:
        values: PIL images, uint8 numpy arrays (H, W[, C]) or encoded bytes (PNG, JPEG, WebP).
        field: how the errors name the images (``image[0]``, ``image[1]``, ...).
        indexed: ``False``: one image at most, named ``field`` itself (``input_reference`` of a video job).

    Returns:
        the images as uint8 (H, W, 3|4) arrays, and their content keys.
    """
    config = config or ImageInputConfig()
    values = list(values or ())
    limit = spec.max_input_images if config.max_images is None else min(spec.max_input_images, config.max_images)
    if not spec.max_input_images:
        if values:
            raise RequestError(field, f"model {spec.id} takes no input images")
        return (), ()
    if not values:
        if spec.min_input_images == 0:  # optional (Wan2.2 TI2V-5B: text, or text and an image)
            return (), ()
        raise RequestError(field, f"model {spec.id} ({spec.task}) needs an input image: send 1 to {limit}")
    if len(values) > limit:
        raise RequestError(field, f"{len(values)} images exceed the limit of {limit} for model {spec.id}")
    total = sum(len(v) for v in values if isinstance(v, bytes | bytearray | memoryview))
    if total > config.max_images_bytes:
        raise RequestError(field, f"{total} bytes of images exceed the per-request limit of {config.max_images_bytes}",
                           status=413)
    arrays = []
    for i, value in enumerate(values):
        name = f"{field}[{i}]" if indexed else field
        if isinstance(value, bytes | bytearray | memoryview):
            arrays.append(_decode(name, bytes(value), config))
        elif isinstance(value, Image.Image):
            _check_size(name, *value.size, config)
            arrays.append(_normalized(value))
        elif isinstance(value, np.ndarray):
            arrays.append(_from_array(name, value, config))
        else:
            raise RequestError(name, f"must be image bytes, a PIL image or a uint8 array, not {type(value).__name__}")
    return tuple(arrays), tuple(image_key(a) for a in arrays)
