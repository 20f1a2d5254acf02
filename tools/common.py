"""Shared pieces of the data tools: file discovery, failure reports, summaries."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from valle_jax.atomic import TMP_SUFFIX, remove_stale_temps

T = TypeVar("T")


def utterance_id(path: Path) -> str:
    """The reference's id: the file name up to its first '.' (`a.qnt.pt` -> `a`)."""
    return path.name.split(".")[0]


def with_suffix(path: Path, suffix: str) -> Path:
    """`dir/a.wav` -> `dir/a{suffix}` (every suffix after the first '.' replaced)."""
    return path.parent / (utterance_id(path) + suffix)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (`--shard I/N`, I in 0..N-1): every N-th item of a list that every
    shard builds the same way (sorted paths, or planned batches), starting at the I-th. So the N
    shards are disjoint, together complete, and need no coordination: a SLURM array
    (`--shard $SLURM_ARRAY_TASK_ID/N`), a TPU pod's workers or any scheduler can run them."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        i, sep, n = str(text).partition("/")
        try:
            shard = cls(int(i), int(n)) if sep else None
        except ValueError:
            shard = None
        if shard is None or not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard takes I/N with 0 <= I < N (such as 0/4), got {text!r}")
        return shard

    def take(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_arg(text: str) -> Shard:
    """argparse type of --shard: the parse error's own words, not argparse's generic one."""
    try:
        return Shard.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def remove_stale_temps_of(out_dir: Path, targets: Iterable[Path], shard: Shard) -> None:
    """Deletes temp files a killed run left under `out_dir`. One shard of several removes only
    those of its own `targets`: the other shards may be writing theirs into the same folder now."""
    if not out_dir.exists():
        return
    if shard.count == 1:
        remove_stale_temps(out_dir)
        return
    mine = {(t.parent, t.name) for t in targets}
    for tmp in out_dir.rglob(f".*{TMP_SUFFIX}*"):
        core = tmp.name[1 : tmp.name.index(TMP_SUFFIX)]  # "<target name>.<random>"
        if tmp.is_file() and (tmp.parent, core.rsplit(".", 1)[0]) in mine:
            tmp.unlink(missing_ok=True)


def group_of(rel: Path) -> str:
    """The speaker group of a file at `rel` = `<group>/<speaker>/<file>` (the reference's getter)."""
    return rel.parts[-3] if len(rel.parts) >= 3 else "group"


def add_language_flags(p: argparse.ArgumentParser, language_help: str) -> None:
    """--language (every group's, unless named) and the repeatable --group-language GROUP=LANG."""
    p.add_argument("--language", default="en", help=language_help)
    p.add_argument(
        "--group-language",
        action="append",
        default=[],
        type=group_language_item,
        metavar="GROUP=LANG",
        help="language of one speaker group (repeatable)",
    )


def group_language_item(item: str) -> tuple[str, str]:
    """One --group-language GROUP=LANG as (group, language): argparse's `type`, so a malformed one is a
    usage error of every command with the flag; `dict(args.group_language)` is then {group: language}."""
    group, sep, lang = item.partition("=")
    if not sep or not group or not lang:
        raise argparse.ArgumentTypeError(f"takes GROUP=LANG, got {item!r}")
    return group, lang


def find_files(root: Path, suffixes: Iterable[str], exclude: Iterable[str] = ()) -> list[Path]:
    """Files under `root` ending in one of `suffixes` (not in `exclude`), sorted, hidden files skipped."""
    suffixes, exclude = tuple(suffixes), tuple(exclude)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and p.name.lower().endswith(suffixes)
        and not p.name.lower().endswith(exclude)
    )


@dataclass
class Report:
    """Counts what a tool did and which inputs failed, and prints the closing summary."""

    tool: str
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # processed, but worth a look
    extra: list[str] = field(default_factory=list)

    def fail(self, path, reason: str) -> None:
        self.failed.append((str(path), reason))
        logging.getLogger(self.tool).warning("skipped %s: %s", path, reason)

    def warn(self, path, reason: str) -> None:
        """An input that was processed but looks wrong; does not change the exit code."""
        self.warnings.append((str(path), reason))
        logging.getLogger(self.tool).warning("%s: %s", path, reason)

    def summary(self) -> str:
        head = f"{self.tool}: {self.done} done, {self.skipped} already done (skipped), {len(self.failed)} failed"
        lines = [head + (f", {len(self.warnings)} warnings" if self.warnings else "")]
        lines += [f"  {x}" for x in self.extra]
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  {p}: {r}" for p, r in self.warnings]
        if self.failed:
            lines.append("failed inputs:")
            lines += [f"  {p}: {r}" for p, r in self.failed]
        return "\n".join(lines)

    def finish(self) -> int:
        """Prints the summary; the exit code is 1 when any input failed."""
        print(self.summary(), file=sys.stderr if self.failed else sys.stdout, flush=True)
        return 1 if self.failed else 0


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
