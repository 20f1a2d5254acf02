"""Phonemises transcripts with espeak-ng (phonemizer) into reference-format `.phn.txt` files.

    python -m tools.phonemize TEXT_DIR [--language en] [--group-language GROUP=LANG] [--out DIR] [--overwrite]
                              [--shard I/N]
    python -m tools.phonemize --list-languages

For every `<id>.txt` under TEXT_DIR writes `<id>.phn.txt`: IPA tokens as the reference's g2p makes
them (stress and punctuation kept, ˈ ˌ ː glued to the previous character), in its file layout
(tokens joined by spaces, a word boundary written as two empty tokens). Readers keep one boundary
token per word gap (docs/data.md). Existing outputs are skipped; empty transcripts are reported.
The language is any espeak-ng code (`--list-languages`), for all groups or per speaker group
(`<group>/<speaker>/<id>.txt`); tools.pack takes the same --language and --group-language.
`--shard I/N` takes every N-th transcript of the sorted listing, from the I-th: N copies (one per
machine) together do exactly what one run does (docs/data.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from tools.common import (
    Report,
    Shard,
    add_language_flags,
    find_files,
    group_of,
    remove_stale_temps_of,
    setup_logging,
    shard_arg,
    with_suffix,
)
from valle_jax.atomic import write_text
from valle_jax.data import languages
from valle_jax.data import text as T

PHN_SUFFIX = ".phn.txt"
CHUNK = 256  # transcripts per espeak call: one call per chunk keeps the progress bar moving


def phonemize_dir(
    text_dir: Path,
    out_dir: Path,
    language: str = "en",
    overwrite: bool = False,
    progress: bool = True,
    group_language: dict[str, str] | None = None,
    shard: Shard = Shard(),
) -> Report:
    report = Report("phonemize")
    group_language = group_language or {}
    phonemizers = {lang: T.Phonemizer(lang) for lang in {language, *group_language.values()}}  # checks each code
    sources = shard.take(find_files(text_dir, (".txt",), exclude=(PHN_SUFFIX,)))
    targets = [with_suffix(out_dir / src.relative_to(text_dir), PHN_SUFFIX) for src in sources]
    remove_stale_temps_of(out_dir, targets, shard)
    todo = []
    for src, dst in zip(sources, targets):
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
        todo.append((src, dst, content, group_language.get(group_of(src.relative_to(text_dir)), language)))
    todo.sort(key=lambda item: item[3])  # one language per espeak call (stable: files stay in order)
    known = T.reference_symmap()
    unseen: set[str] = set()
    with tqdm(total=len(todo), unit="utt", desc="phonemizing", disable=not progress) as bar:
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i : i + CHUNK]
            tokens_of = {}
            for lang in dict.fromkeys(item[3] for item in chunk):
                mine = [item for item in chunk if item[3] == lang]
                tokens_of.update(zip((item[0] for item in mine), phonemizers[lang].tokens([c for *_, c, _ in mine])))
            for src, dst, *_ in chunk:
                tokens = tokens_of[src]
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
    p.add_argument("text_dir", type=Path, nargs="?", help="folder searched recursively for <id>.txt transcripts")
    add_language_flags(p, "an espeak-ng language code (default en = espeak en-us)")
    p.add_argument("--list-languages", action="store_true", help="print the language codes espeak-ng supports")
    p.add_argument("--shard", type=shard_arg, default=Shard(), help="I/N: do only shard I (0..N-1) of N")
    p.add_argument("--out", type=Path, default=None, help="output root (default: beside the transcripts)")
    p.add_argument("--overwrite", action="store_true", help="redo files that already have a .phn.txt")
    args = p.parse_args(argv)
    setup_logging()
    if args.list_languages:
        try:
            for code, name in languages.supported().items():
                print(f"{code}\t{name}")
        except T.TextError as e:
            print(f"phonemize: {e}", file=sys.stderr)
            return 2
        return 0
    if args.text_dir is None or not args.text_dir.is_dir():
        p.error(f"{args.text_dir} is not a directory")
    try:
        report = phonemize_dir(
            args.text_dir,
            args.out or args.text_dir,
            args.language,
            args.overwrite,
            group_language=dict(args.group_language),
            shard=args.shard,
        )
    except T.TextError as e:
        print(f"phonemize: {e}", file=sys.stderr)
        return 2
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
