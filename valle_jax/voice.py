"""Saved voices and prompt hygiene.

    python -m valle_jax.voice make REF.wav [REF2.wav ...] --out voice.npz [--codec-dir DIR] [--no-trim]

A voice file stores a reference's codec codes (int16 [frames, levels]) and where they came from, so
synthesis skips reading and encoding audio: `voice.npz` is accepted wherever a reference wav is
(`python -m valle_jax.synthesize TEXT voice.npz ...`, `TTS.prompt("voice.npz")`).

Before encoding, each reference is cleaned (on by default; --no-trim keeps it raw):
* leading and trailing silence is cut: frames (20 ms) whose RMS lies more than TOP_DB below the
  loudest frame's are silence; PAD seconds are kept on each side so onsets are not clipped. Silence
  at the start would otherwise take part of the `input_prompt_length` seconds that synthesis keeps.
* the loudness is normalised to TARGET_DBFS RMS (peaks limited to PEAK), so quiet and loud
  recordings give the codec, and so the model, prompts at the level it was trained on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from valle_jax.atomic import atomic_path
from valle_jax.audio import FRAME_RATE, SAMPLE_RATE, AudioError, is_silent, load_audio

FORMAT, VERSION = "valle_jax.voice", 1
CODEBOOK_SIZE = 1024  # codes per EnCodec level
ZIP_MAGIC = b"PK\x03\x04"  # np.savez writes a zip archive
TOP_DB = 40.0  # frames this far below the loudest are silence
FRAME_SECONDS = 0.02
PAD = 0.05  # seconds of the silence kept before the first and after the last sounding frame
TARGET_DBFS = -20.0  # RMS level after normalisation
PEAK = 0.99  # the normalisation never lifts a peak above this


def is_voice_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).endswith(".npz") and ";" not in str(path)


def trim(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`wav` without its leading and trailing silence (see the module docstring)."""
    n = max(1, int(FRAME_SECONDS * sample_rate))
    frames = len(wav) // n
    if frames == 0:
        return wav
    rms = np.sqrt(np.mean(wav[: frames * n].reshape(frames, n).astype(np.float64) ** 2, axis=1))
    loud = rms > rms.max() * 10 ** (-TOP_DB / 20) if rms.max() > 0 else np.zeros(frames, bool)
    if not loud.any():
        return wav
    first, last = int(np.argmax(loud)), frames - 1 - int(np.argmax(loud[::-1]))
    pad = int(PAD * sample_rate)
    return wav[max(0, first * n - pad) : min(len(wav), (last + 1) * n + pad)]


def normalise(wav: np.ndarray) -> np.ndarray:
    """`wav` at TARGET_DBFS RMS, its peak at most PEAK."""
    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) if wav.size else 0.0
    if rms == 0:
        return wav
    gain = 10 ** (TARGET_DBFS / 20) / rms
    peak = float(np.max(np.abs(wav))) * gain
    if peak > PEAK:
        gain *= PEAK / peak
    return (wav * gain).astype(np.float32)


def clean(wav: np.ndarray) -> np.ndarray:
    """What synthesis encodes of a reference by default: trimmed, then loudness-normalised."""
    return normalise(trim(wav))


def save(path: str | os.PathLike, codes: np.ndarray, sources: Sequence[str], trimmed: bool) -> Path:
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0:
        raise AudioError(f"voice codes must be [frames, levels] with frames > 0, got {codes.shape}")
    meta = {"format": FORMAT, "version": VERSION, "sources": list(sources), "trimmed": trimmed}
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.astype(np.int16), meta=np.asarray(json.dumps(meta)))
    return Path(path)


def load(path: str | os.PathLike) -> tuple[np.ndarray, tuple[str, ...]]:
    """(codes int16 [frames, levels], the audio files they came from) of a voice file."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: voice file not found")
    return _read(path, str(path))


def loads(data: bytes, name: str = "the voice file") -> tuple[np.ndarray, tuple[str, ...]]:
    """`load` of a voice file's bytes (an upload); `name` is what errors call it."""
    return _read(io.BytesIO(data), name)


def is_voice_data(data: bytes) -> bool:
    """Whether `data` may be a voice file (a zip archive, as numpy's savez writes) rather than audio."""
    return data.startswith(ZIP_MAGIC)


def _read(source, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        with np.load(source, allow_pickle=False) as z:
            codes, meta = z["codes"], json.loads(str(z["meta"]))
    except Exception as e:  # BadZipFile, KeyError, ValueError: not one of ours
        raise AudioError(f"{name}: not a voice file of python -m valle_jax.voice ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise AudioError(f"{name}: format {got[0]} v{got[1]}, expected {FORMAT} v{VERSION}")
    if not np.issubdtype(codes.dtype, np.integer) or codes.ndim != 2 or len(codes) == 0:
        raise AudioError(f"{name}: a voice file holds int codes [frames, levels], got {codes.dtype} {codes.shape}")
    if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
        raise AudioError(f"{name}: a voice file's codes must lie in [0, {CODEBOOK_SIZE})")
    return codes, tuple(meta.get("sources", ()))


def read_audio(sources: Sequence[str]) -> list[np.ndarray]:
    """The waveforms of reference audio files, as they are: at least one file, each existing and not
    silent (the checks both a voice file and synthesis make of their references)."""
    if not sources:
        raise AudioError("no reference audio given")
    wavs = []
    for src in sources:
        if not Path(src).is_file():
            raise AudioError(f"{src}: reference audio not found")
        wav = load_audio(src)
        if is_silent(wav):
            raise AudioError(f"{src}: reference audio is silent")
        wavs.append(wav)
    return wavs


def encode(codec, wavs: Sequence[np.ndarray], trim_audio: bool = True) -> np.ndarray:
    """The codes of references joined in time, each cleaned first unless `trim_audio` is False."""
    wavs = [clean(w) for w in wavs] if trim_audio else list(wavs)
    return np.concatenate(codec.encode_batch(wavs), axis=0)


def make(
    references: Sequence[str | os.PathLike], out: str | os.PathLike, codec, trim_audio: bool = True
) -> tuple[Path, np.ndarray]:
    """Writes the voice file `out` of `references` (their codes joined in time)."""
    sources = [str(r) for r in references]
    codes = encode(codec, read_audio(sources), trim_audio)
    return save(out, codes, sources, trim_audio), codes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m valle_jax.voice", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="encode reference audio into a voice file")
    m.add_argument("references", nargs="+", help="audio files of one speaker, joined in order")
    m.add_argument("--out", required=True, type=Path, help="the voice file (.npz)")
    m.add_argument("--codec-dir", type=Path, default=None, help="EnCodec weights folder (default: pretrained)")
    m.add_argument("--no-trim", action="store_true", help="encode the audio as it is (no trimming, no normalisation)")
    args = p.parse_args(argv)
    if args.out.suffix != ".npz":
        print(f"error: --out {args.out}: a voice file ends in .npz", file=sys.stderr)
        return 2
    from valle_jax.codec import Codec, CodecUnavailable  # noqa: PLC0415 - optional heavy dependency: torch

    try:
        out, codes = make(args.references, args.out, Codec.load(args.codec_dir), trim_audio=not args.no_trim)
    except (AudioError, CodecUnavailable, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(codes)} frames ({len(codes) / FRAME_RATE:.2f} s) x {codes.shape[1]} levels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
