"""Phonemises transcripts with espeak-ng (phonemizer) into reference-format `.phn.txt` files.

    python -m tools.phonemize TEXT_DIR [--language en] [--out DIR] [--overwrite]

For every `<id>.txt` under TEXT_DIR writes `<id>.phn.txt`: IPA tokens as the reference's g2p makes
them (stress and punctuation kept, ˈ ˌ ː glued to the previous character), in its file layout
(tokens joined by spaces, a word boundary written as two empty tokens). Readers keep one boundary
token per word gap (docs/data.md). Existing outputs are skipped; empty transcripts are reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from tools.common import Report, find_files, setup_logging, with_suffix
from valle_jax.atomic import remove_stale_temps, write_text
from valle_jax.data import text as T

PHN_SUFFIX = ".phn.txt"
CHUNK = 256  # transcripts per espeak call: one call per chunk keeps the progress bar moving


def phonemize_dir(
    text_dir: Path, out_dir: Path, language: str = "en", overwrite: bool = False, progress: bool = True
) -> Report:
    report = Report("phonemize")
    phonemizer = T.Phonemizer(language)
    if out_dir.exists():
        remove_stale_temps(out_dir)
    todo = []
    for src in find_files(text_dir, (".txt",), exclude=(PHN_SUFFIX,)):
        dst = with_suffix(out_dir / src.relative_to(text_dir), PHN_SUFFIX)
        if dst.exists() and not overwrite:
            report.skipped += 1
            continue
        try:
            content = src.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            report.fail(src, f"cannot read text ({e})")
            continue
        if not content:
            report.fail(src, "empty transcript")
            continue
        todo.append((src, dst, content))
    known = T.reference_symmap()
    unseen: set[str] = set()
    with tqdm(total=len(todo), unit="utt", desc="phonemizing", disable=not progress) as bar:
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i : i + CHUNK]
            for (src, dst, _), tokens in zip(chunk, phonemizer.tokens([c for _, _, c in chunk])):
                if not tokens:
                    report.fail(src, "espeak produced no phonemes")
                    continue
                unseen.update(t for t in tokens if t not in known)
                write_text(dst, T.format_phn_txt(tokens) + "\n")
                report.done += 1
            bar.update(len(chunk))
    if unseen:
        report.extra.append(f"symbols outside the reference map (pack gives them new ids): {sorted(unseen)}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.phonemize", description=__doc__.split("\n\n")[0])
    p.add_argument("text_dir", type=Path, help="folder searched recursively for <id>.txt transcripts")
    p.add_argument("--language", default="en", help=f"one of {sorted(T.ESPEAK_LANGUAGE)} (default en = espeak en-us)")
    p.add_argument("--out", type=Path, default=None, help="output root (default: beside the transcripts)")
    p.add_argument("--overwrite", action="store_true", help="redo files that already have a .phn.txt")
    args = p.parse_args(argv)
    setup_logging()
    if not args.text_dir.is_dir():
        p.error(f"{args.text_dir} is not a directory")
    try:
        report = phonemize_dir(args.text_dir, args.out or args.text_dir, args.language, args.overwrite)
    except T.TextError as e:
        print(f"phonemize: {e}", file=sys.stderr)
        return 2
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
