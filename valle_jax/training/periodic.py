"""Periodic actions as data: `[Every(n, action), ...]` run through one test, `itstime`, so that the
training loop reads top to bottom instead of interleaving hand-written `step % n == 0` checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple


def itstime(step: int, every: int, total: int) -> bool:
    """True every `every` steps and at the last one (`total`); never when `every` is 0 (off)."""
    return bool(every) and (step % every == 0 or step == total)


class Every(NamedTuple):
    every: int  # steps between two calls (0: never)
    action: Callable[[Any], None]  # called with the loop's progress


def run_due(actions: Iterable[Every], progress: Any, step: int, total: int) -> None:
    """Calls, in order, each action whose time has come at `step`."""
    for every, action in actions:
        if itstime(step, every, total):
            action(progress)
