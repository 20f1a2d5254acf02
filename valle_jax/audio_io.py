"""Writing synthesised audio: the file format from the output's suffix, WAV to stdout, pauses.

soundfile (libsndfile) does the encoding; this module only decides the container and sample
format per suffix, so that `--out x.flac` really is FLAC and an unknown suffix is refused before
anything is synthesised rather than silently written as WAV.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from valle_jax.atomic import atomic_path
from valle_jax.audio import SAMPLE_RATE, AudioError

STDOUT = "-"  # `--out -`: WAV bytes on standard output
DEFAULT_PAUSE = 0.3  # seconds of silence between the sentences of a split text


@dataclass(frozen=True)
class OutputFormat:
    """How soundfile writes one suffix."""

    format: str  # libsndfile container
    subtype: str  # sample encoding


# 16-bit PCM for the lossless ones (what the codec's audio holds); Vorbis/Opus/MP3 are lossy
OUTPUT_FORMATS = {
    ".wav": OutputFormat("WAV", "PCM_16"),
    ".flac": OutputFormat("FLAC", "PCM_16"),
    ".ogg": OutputFormat("OGG", "VORBIS"),
    ".opus": OutputFormat("OGG", "OPUS"),
    ".mp3": OutputFormat("MP3", "MPEG_LAYER_III"),
}


def output_format(path: str | os.PathLike) -> OutputFormat:
    """The format `path` is written in; `-` is WAV (stdout). AudioError for a suffix we do not write."""
    if str(path) == STDOUT:
        return OUTPUT_FORMATS[".wav"]
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise AudioError(
            f"{path}: cannot tell the audio format from the suffix {suffix or '(none)'!r}; "
            f"use one of {', '.join(OUTPUT_FORMATS)} (or - for WAV on stdout)"
        )
    fmt = OUTPUT_FORMATS[suffix]
    if fmt.format not in sf.available_formats():  # an old libsndfile (MP3 arrived in 1.1)
        raise AudioError(f"{path}: this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt.format}")
    return fmt


def encode(wav: np.ndarray, fmt: OutputFormat, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The file's bytes: float samples clipped to [-1, 1] and encoded."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wav, np.float32), -1.0, 1.0), sample_rate, format=fmt.format, subtype=fmt.subtype)
    return buf.getvalue()


def write_audio(
    path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE, stdout: BinaryIO | None = None
) -> None:
    """Writes `wav` (float32 mono) to `path` in the format its suffix names, atomically (temp file,
    then rename); `-` writes WAV to `stdout` (default: sys.stdout's binary buffer)."""
    fmt = output_format(path)
    data = encode(wav, fmt, sample_rate)
    if str(path) == STDOUT:
        out = stdout if stdout is not None else sys.stdout.buffer
        out.write(data)
        out.flush()
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def join(wavs: list[np.ndarray], pause: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The pieces in order with `pause` seconds of silence between two non-empty ones (an empty
    piece, whose AR produced no frames, adds neither audio nor a pause)."""
    if pause < 0 or not np.isfinite(pause):
        raise AudioError(f"pause must be a finite number of seconds >= 0, got {pause}")
    kept = [np.asarray(w, np.float32) for w in wavs if len(w)]
    if not kept:
        return np.zeros((0,), np.float32)
    gap = np.zeros((int(round(pause * sample_rate)),), np.float32)
    parts = [kept[0]]
    for w in kept[1:]:
        parts += [gap, w]
    return np.concatenate(parts)
