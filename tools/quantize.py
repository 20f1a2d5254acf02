"""Encodes audio files into EnCodec 24 kHz codes: int16[T, 8] per utterance at 75 frames/s.

    python -m tools.quantize AUDIO_DIR [--out DIR] [--codec-dir DIR] [--bandwidth 6.0]
                             [--devices cpu|cuda|cuda:0,cuda:1,...] [--batch-seconds S] [--shard I/N]

Writes `<out>/<relative dir>/<id>.codes.npy` for every audio file under AUDIO_DIR (any sample rate
and channel count: mixed to mono, resampled to 24 kHz). Files already encoded are skipped, so a
killed run resumes; each output is written to a temp file and renamed, so none is ever partial.
A corrupt, empty or unreadable file is reported and skipped; the exit code is 1 if any failed.
Audio shorter than 0.1 s, or silent (peak below about -80 dBFS), is encoded but reported as a
warning: its codes are valid, and the training filters (data.duration_range) decide what to use.
`--shard I/N` encodes every N-th batch of the plan, from the I-th (docs/data.md: N copies equal one
run byte for byte); `--devices cuda:0,cuda:1` runs one codec per device from this one process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from tools.common import Report, Shard, find_files, remove_stale_temps_of, setup_logging, shard_arg, with_suffix
from valle_jax.atomic import atomic_path
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


@dataclass
class Progress:
    """What the device workers share: the next batch to take, the report, the bar (under `lock`)."""

    batches: list
    report: Report
    bar: tqdm
    lock: threading.Lock = field(default_factory=threading.Lock)
    next: int = 0
    audio_seconds: float = 0.0

    def take(self) -> list | None:
        with self.lock:
            if self.next >= len(self.batches):
                return None
            self.next += 1
            return self.batches[self.next - 1]


def encode_on(codec, work: Progress) -> None:
    """One device's loop: takes batches until none is left, loading the next one (file I/O,
    resampling) on a thread while this one encodes."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batch = work.take()
        pending = pool.submit(load_batch, batch) if batch else None
        while pending is not None:
            loaded, failed = pending.result()
            done = batch
            batch = work.take()
            pending = pool.submit(load_batch, batch) if batch else None
            codes = codec.encode_batch([w for _, _, w in loaded]) if loaded else []
            for (src, dst, wav), c in zip(loaded, codes):
                save_codes(dst, c)
            with work.lock:
                for src, reason in failed:
                    work.report.fail(src, reason)
                for src, _, wav in loaded:
                    for problem in audio_warnings(wav):
                        work.report.warn(src, problem)
                    work.report.done += 1
                    work.audio_seconds += len(wav) / SAMPLE_RATE
                work.bar.update(round(sum(it[2] for it in done), 1))


def quantize_dir(
    audio_dir: Path,
    out_dir: Path,
    codec,
    batch_seconds: float = 60.0,
    progress: bool = True,
    shard: Shard = Shard(),
    codecs: list | None = None,
) -> Report:
    """Encodes the audio under `audio_dir`. Batches are planned over every file of the listing
    (done or not) and then shared out (`shard`), so each file is encoded in the same batch as in
    one unsharded run, and the N shards' codes equal that run's byte for byte. `codecs`: one codec
    per device, each taking the next batch as it finishes one (default: `[codec]`)."""
    report = Report("quantize" if shard.count == 1 else f"quantize shard {shard}")
    items, unreadable = [], []
    for src in find_files(audio_dir, AUDIO_SUFFIXES):
        dst = with_suffix(out_dir / src.relative_to(audio_dir), CODES_SUFFIX)
        try:
            info = sf.info(str(src))
            items.append((src, dst, info.frames / info.samplerate))
        except Exception as e:
            unreadable.append((src, f"cannot read audio ({e})"))
    for src, reason in shard.take(unreadable):
        report.fail(src, reason)
    mine = shard.take(plan_batches(items, batch_seconds))
    remove_stale_temps_of(out_dir, [dst for batch in mine for _, dst, _ in batch], shard)
    batches = []
    for batch in mine:
        todo = [it for it in batch if not it[1].exists()]
        report.skipped += len(batch) - len(todo)
        if todo:
            batches.append(todo)
    total = sum(it[2] for batch in batches for it in batch)
    start = time.perf_counter()
    codecs = codecs or [codec]
    with tqdm(total=round(total, 1), unit="s audio", desc="quantizing", disable=not progress) as bar:
        work = Progress(batches, report, bar)
        if len(codecs) == 1:
            encode_on(codecs[0], work)
        else:  # torch releases the GIL while it computes: one thread per device keeps each busy
            with concurrent.futures.ThreadPoolExecutor(len(codecs)) as pool:
                for f in [pool.submit(encode_on, c, work) for c in codecs]:
                    f.result()
    elapsed = time.perf_counter() - start
    if work.audio_seconds:
        report.extra.append(
            f"{work.audio_seconds:.1f} s of audio in {elapsed:.1f} s: "
            f"{work.audio_seconds / max(elapsed, 1e-9):.1f}x real time on {len(codecs)} device(s)"
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
    p.add_argument(
        "--device",
        "--devices",
        dest="devices",
        default="cpu",
        help="torch device(s), comma-separated: cpu, cuda, or cuda:0,cuda:1,... (one codec per device, all kept busy)",
    )
    p.add_argument("--shard", type=shard_arg, default=Shard(), help="I/N: do only shard I (0..N-1) of N")
    p.add_argument(
        "--batch-seconds", type=float, default=60.0, help="padded seconds of audio per forward pass (default 60)"
    )
    args = p.parse_args(argv)
    setup_logging()
    if not args.audio_dir.is_dir():
        p.error(f"{args.audio_dir} is not a directory")

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not devices:
        p.error("--devices needs at least one device")
    try:
        codecs = [Codec.load(args.codec_dir, args.bandwidth, d) for d in devices]
    except (CodecUnavailable, ValueError, RuntimeError) as e:  # RuntimeError: torch's, for a device it lacks
        print(f"quantize: {e}", file=sys.stderr)
        return 2
    if codecs[0].is_random:
        print("quantize: using a RANDOM codec: codes are valid but its audio is not speech", file=sys.stderr)
    out = args.out or args.audio_dir
    return quantize_dir(args.audio_dir, out, codecs[0], args.batch_seconds, shard=args.shard, codecs=codecs).finish()


if __name__ == "__main__":
    sys.exit(main())
