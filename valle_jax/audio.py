"""Audio file I/O without torch: read any format soundfile knows, mix to mono, resample.

Kept apart from codec.py so that data tools and synthesis can read and write audio without
importing torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from valle_jax.atomic import atomic_path

SAMPLE_RATE = 24_000  # Hz: EnCodec 24 kHz
FRAME_RATE = 75  # codec frames per second (SAMPLE_RATE / hop of 320 samples)
HOP_LENGTH = SAMPLE_RATE // FRAME_RATE  # samples per codec frame

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class AudioError(ValueError):
    """An audio file that cannot be used: unreadable, corrupt, empty or silent."""


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling along the last axis (exact rational ratio, no torchaudio)."""
    if sr_in == sr_out:
        return wav
    g = math.gcd(int(sr_in), int(sr_out))
    return resample_poly(wav, sr_out // g, sr_in // g, axis=-1).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads `path` as float32 mono at `sample_rate`. Channels are averaged (mix-down).

    Raises AudioError naming the file and the reason when it cannot be used.
    """
    path = Path(path)
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"{path}: cannot read audio ({e})") from e
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    mono = wav.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: audio holds NaN or infinite samples")
    return resample(mono, sr, sample_rate)


def is_silent(wav: np.ndarray, threshold: float = 1e-4) -> bool:
    """True when the peak amplitude is below `threshold` (about -80 dBFS)."""
    return wav.size == 0 or float(np.max(np.abs(wav))) < threshold


def write_wav(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes 16-bit PCM atomically: a temp file in the same folder, then a rename."""
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def num_frames(num_samples: int) -> int:
    """Codec frames EnCodec produces for `num_samples` at 24 kHz: ceil(samples / 320)."""
    return -(-num_samples // HOP_LENGTH)
