"""Encodes audio files into EnCodec 24 kHz codes: int16[T, 8] per utterance at 75 frames/s.

    python -m tools.quantize AUDIO_DIR [--out DIR] [--codec-dir DIR] [--bandwidth 6.0]
                             [--device cpu|cuda] [--batch-seconds S]

Writes `<out>/<relative dir>/<id>.codes.npy` for every audio file under AUDIO_DIR (any sample rate
and channel count: mixed to mono, resampled to 24 kHz). Files already encoded are skipped, so a
killed run resumes; each output is written to a temp file and renamed, so none is ever partial.
A corrupt, empty or unreadable file is reported and skipped; the exit code is 1 if any failed.
Audio shorter than 0.1 s, or silent (peak below about -80 dBFS), is encoded but reported as a
warning: its codes are valid, and the training filters (data.duration_range) decide what to use.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from tools.common import Report, find_files, setup_logging, with_suffix
from valle_jax.atomic import atomic_path, remove_stale_temps
from valle_jax.audio import AUDIO_SUFFIXES, SAMPLE_RATE, AudioError, is_silent, load_audio
from valle_jax.codec import Codec, CodecUnavailable  # torch itself loads only when a codec does

CODES_SUFFIX = ".codes.npy"
# 7.5 codec frames: too short to hold a phoneme, let alone serve as a prompt or a target
MIN_SECONDS = 0.1


def plan_batches(items: list[tuple[Path, Path, float]], batch_seconds: float) -> list[list[tuple[Path, Path, float]]]:
    """Groups files of similar length so each batch pads to at most `batch_seconds` in total."""
    items = sorted(items, key=lambda x: x[2])
    batches, cur = [], []
    for it in items:
        if cur and (len(cur) + 1) * it[2] > batch_seconds:
            batches.append(cur)
            cur = []
        cur.append(it)
    if cur:
        batches.append(cur)
    return batches


def load_batch(batch):
    """(loaded [(src, dst, wav)], failures [(src, reason)])."""
    loaded, failed = [], []
    for src, dst, _ in batch:
        try:
            loaded.append((src, dst, load_audio(src)))
        except AudioError as e:
            failed.append((src, str(e)))
    return loaded, failed


def audio_warnings(wav: np.ndarray) -> list[str]:
    """What looks wrong with decoded audio that can still be encoded.

    Warned, not skipped: the codes are valid, skipping would turn the transcript into a pack
    failure on every run, and whether to train on short clips is the pipeline filters' call.
    """
    problems = []
    seconds = len(wav) / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        problems.append(f"only {seconds * 1000:.0f} ms of audio, under the {MIN_SECONDS} s minimum (encoded anyway)")
    if is_silent(wav):
        problems.append("silent (peak below -80 dBFS): encoded anyway, but check the file and its transcript")
    return problems


def save_codes(path: Path, codes: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, codes)


def quantize_dir(audio_dir: Path, out_dir: Path, codec, batch_seconds: float = 60.0, progress: bool = True) -> Report:
    report = Report("quantize")
    if out_dir.exists():
        remove_stale_temps(out_dir)
    items = []
    for src in find_files(audio_dir, AUDIO_SUFFIXES):
        dst = with_suffix(out_dir / src.relative_to(audio_dir), CODES_SUFFIX)
        if dst.exists():
            report.skipped += 1
            continue
        try:
            info = sf.info(str(src))
            items.append((src, dst, info.frames / info.samplerate))
        except Exception as e:
            report.fail(src, f"cannot read audio ({e})")
    batches = plan_batches(items, batch_seconds)
    total = sum(it[2] for it in items)
    start, audio_seconds = time.perf_counter(), 0.0
    bar = tqdm(total=round(total, 1), unit="s audio", desc="quantizing", disable=not progress)
    # load the next batch (file I/O, resampling) on a thread while torch encodes this one
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load_batch, batches[0]) if batches else None
        for i in range(len(batches)):
            loaded, failed = pending.result()
            pending = pool.submit(load_batch, batches[i + 1]) if i + 1 < len(batches) else None
            for src, reason in failed:
                report.fail(src, reason)
            if loaded:
                codes = codec.encode_batch([w for _, _, w in loaded])
                for (src, dst, wav), c in zip(loaded, codes):
                    for problem in audio_warnings(wav):
                        report.warn(src, problem)
                    save_codes(dst, c)
                    report.done += 1
                    audio_seconds += len(wav) / SAMPLE_RATE
            bar.update(round(sum(it[2] for it in batches[i]), 1))
    bar.close()
    elapsed = time.perf_counter() - start
    if audio_seconds:
        report.extra.append(
            f"{audio_seconds:.1f} s of audio in {elapsed:.1f} s: {audio_seconds / max(elapsed, 1e-9):.1f}x real time"
        )
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("audio_dir", type=Path, help="folder searched recursively for audio files")
    p.add_argument("--out", type=Path, default=None, help="output root (default: beside the audio)")
    p.add_argument(
        "--codec-dir",
        type=Path,
        default=None,
        help="folder holding encodec_24khz-d7cc33bc.th (default: the encodec package's pretrained loader)",
    )
    p.add_argument("--bandwidth", type=float, default=6.0, help="kbps: 1.5, 3, 6 (8 levels, default), 12, 24")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument(
        "--batch-seconds", type=float, default=60.0, help="padded seconds of audio per forward pass (default 60)"
    )
    args = p.parse_args(argv)
    setup_logging()
    if not args.audio_dir.is_dir():
        p.error(f"{args.audio_dir} is not a directory")

    try:
        codec = Codec.load(args.codec_dir, args.bandwidth, args.device)
    except (CodecUnavailable, ValueError) as e:
        print(f"quantize: {e}", file=sys.stderr)
        return 2
    if codec.is_random:
        print("quantize: using a RANDOM codec: codes are valid but its audio is not speech", file=sys.stderr)
    return quantize_dir(args.audio_dir, args.out or args.audio_dir, codec, args.batch_seconds).finish()


if __name__ == "__main__":
    sys.exit(main())
