"""Video outputs: uint8 frames -> MP4 (H.264, yuv420p), a PNG thumbnail, or the frames as .npy.

MP4 goes through PyAV (FFmpeg's libraries with libx264, in-process, from wheels): imageio-ffmpeg
would pipe raw frames to an ffmpeg subprocess, one process per video and no control of the
stream's options beyond a command line. yuv420p halves the chroma in both directions, so H.264
needs even dimensions: an odd width or height is padded by one pixel, repeating the last column or
row (the MP4 is then that one pixel larger; ``frames`` is always the exact size). Wan2.2's sizes are
multiples of 16, so its videos are never padded.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
from PIL import Image

#: ``GET /v1/videos/{id}/content?variant=``: OpenAI's video and thumbnail, and our exact frames
VARIANTS = {"video": "video/mp4", "thumbnail": "image/png", "frames": "application/x-npy"}


def even_frames(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 padded (edge-repeated) to even H and W, as yuv420p needs."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """(F, H, W, 3) uint8 frames -> an H.264/yuv420p MP4 at ``fps`` frames per second."""
    import av  # imported here: only the video paths need FFmpeg's libraries loaded

    frames = even_frames(np.ascontiguousarray(frames))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return buf.getvalue()


def encode_png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def frames_per_seconds(seconds: float, fps: int, multiple: int) -> int:
    """The frame count of ``seconds`` at ``fps``, rounded to the nearest k x ``multiple`` + 1 (at least 1)."""
    k = max(0, round((seconds * fps - 1) / multiple))
    return k * multiple + 1
