"""Builds an evaluation test list (JSONL) from a folder of transcribed speech.

    python -m tools.make_test_list ROOT OUT.jsonl [--min-seconds 4 --max-seconds 10] [--per-speaker N]

Two layouts are read (`--layout auto` tells them apart by the transcript files):
- LibriSpeech: ROOT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac with SPEAKER-CHAPTER.trans.txt
  ("UTT-ID TRANSCRIPT" per line) beside them; the speaker is SPEAKER. VALL-E's test set is
  LibriSpeech test-clean utterances of 4 to 10 s: `--min-seconds 4 --max-seconds 10`.
- the demo corpus (python -m tools.make_demo_corpus): ROOT/ACCENT/SPEAKER/ID.wav with ID.txt
  beside it; the speaker is ACCENT/SPEAKER.

Each line of OUT is {"id", "audio", "text", "speaker", "duration"}, `audio` relative to OUT's
folder (docs/evaluation.md). Utterances come in sorted order, so the same folder gives the same list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import soundfile as sf

from tools.common import find_files, utterance_id, with_suffix
from valle_jax.atomic import write_text
from valle_jax.audio import AUDIO_SUFFIXES


class ListError(ValueError):
    """Nothing to list: a missing folder, or no utterance passes the filters."""


def librispeech_entries(root: Path) -> list[dict]:
    out = []
    for trans in find_files(root, (".trans.txt",)):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = next(
                (trans.parent / f"{uid}{s}" for s in (".flac", ".wav") if (trans.parent / f"{uid}{s}").exists()), None
            )
            if audio is not None and text.strip():
                out.append({"id": uid, "audio": audio, "text": text.strip(), "speaker": uid.split("-")[0]})
    return out


def demo_entries(root: Path) -> list[dict]:
    out = []
    for audio in find_files(root, AUDIO_SUFFIXES):
        txt = with_suffix(audio, ".txt")
        if not txt.is_file():
            continue
        text = " ".join(txt.read_text(encoding="utf-8").split())
        if text:
            speaker = audio.parent.relative_to(root).as_posix()
            out.append({"id": utterance_id(audio), "audio": audio, "text": text, "speaker": speaker})
    return out


def build(
    root: Path,
    out: Path,
    layout: str = "auto",
    min_seconds: float = 0.0,
    max_seconds: float = 0.0,
    per_speaker: int = 0,
    limit: int = 0,
) -> list[dict]:
    """Writes the list to `out` and returns its entries."""
    if not root.is_dir():
        raise ListError(f"{root} is not a folder")
    if layout == "auto":
        layout = "librispeech" if find_files(root, (".trans.txt",)) else "demo"
    entries = librispeech_entries(root) if layout == "librispeech" else demo_entries(root)
    kept, per = [], {}
    for e in entries:
        seconds = sf.info(str(e["audio"])).duration
        if seconds < min_seconds or (max_seconds > 0 and seconds > max_seconds):
            continue
        if per_speaker and per.get(e["speaker"], 0) >= per_speaker:
            continue
        per[e["speaker"]] = per.get(e["speaker"], 0) + 1
        e["duration"] = round(seconds, 3)
        e["audio"] = Path(os.path.relpath(e["audio"].resolve(), out.resolve().parent)).as_posix()
        kept.append(e)
        if limit and len(kept) >= limit:
            break
    if not kept:
        raise ListError(f"no {layout} utterances under {root} pass the filters")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_test_list", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="LibriSpeech-style or demo-corpus folder")
    p.add_argument("out", type=Path, help="the JSONL test list to write")
    p.add_argument("--layout", choices=("auto", "librispeech", "demo"), default="auto")
    p.add_argument("--min-seconds", type=float, default=0.0, help="leave out shorter utterances")
    p.add_argument("--max-seconds", type=float, default=0.0, help="leave out longer utterances (0: no limit)")
    p.add_argument("--per-speaker", type=int, default=0, help="at most N utterances per speaker (0: all)")
    p.add_argument("--limit", type=int, default=0, help="at most N utterances in all (0: all)")
    a = p.parse_args(argv)
    try:
        kept = build(a.root, a.out, a.layout, a.min_seconds, a.max_seconds, a.per_speaker, a.limit)
    except ListError as e:
        print(f"make_test_list: error: {e}", file=sys.stderr)
        return 2
    speakers = len({e["speaker"] for e in kept})
    hours = sum(e["duration"] for e in kept) / 3600
    print(f"make_test_list: {len(kept)} utterances of {speakers} speakers ({hours:.2f} h) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
