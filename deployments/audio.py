"""Encoding of audio answers: one float clip as 16-bit PCM WAV or FLAC bytes (the HTTP route's
``wav``/``flac``/``b64_json`` answers and ``ditserve generate``'s files).

Why ``soundfile``: one well-kept library (libsndfile, shipped in its wheels) writes both WAV and
FLAC; the stdlib ``wave`` module writes WAV only. The float-to-16-bit rounding is done here, not by
the library, so it is ours and documented. Ray-free (the CLI imports it in process).
"""

from __future__ import annotations

import io

import numpy as np

AUDIO_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}


def encode_audio(waveform: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """One float clip as 16-bit PCM bytes.

    Args:
        waveform: float samples, (channels, samples); clipped to [-1, 1], scaled by 32767, rounded.
        sample_rate: samples per second.
        fmt: ``"wav"`` or ``"flac"``.
    """
    import soundfile

    if fmt not in AUDIO_MEDIA_TYPES:
        raise ValueError(f"audio format {fmt!r}: choose from {', '.join(AUDIO_MEDIA_TYPES)}")
    pcm = np.round(np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)
    buf = io.BytesIO()
    soundfile.write(buf, pcm.T, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()
