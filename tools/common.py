"""Shared pieces of the data tools: file discovery, failure reports, summaries."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def utterance_id(path: Path) -> str:
    """The reference's id: the file name up to its first '.' (`a.qnt.pt` -> `a`)."""
    return path.name.split(".")[0]


def with_suffix(path: Path, suffix: str) -> Path:
    """`dir/a.wav` -> `dir/a{suffix}` (every suffix after the first '.' replaced)."""
    return path.parent / (utterance_id(path) + suffix)


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
