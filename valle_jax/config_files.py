"""Finds the config file a `--config` flag names, in the working directory or among the installed presets.

ml_collections loads `--config` as a file path. The presets (configs/*.py) install as the top-level
`configs` package beside valle_jax, so the README's `--config configs/preset.py:llama-half` also
works outside a checkout: a path that does not exist is looked up, by its file name, in the
installed package. A file that exists always wins, so a user's own configs/ is never overridden.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def installed_configs() -> Path | None:
    """The folder of the importable `configs` package (None when there is none)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(value: str) -> str:
    """A --config value (PATH or PATH:ARG) with PATH replaced by the installed preset of that name,
    when PATH is not a file and such a preset exists; otherwise unchanged."""
    path, sep, arg = value.partition(":")
    if not path or Path(path).is_file():
        return value
    folder = installed_configs()
    candidate = folder / Path(path).name if folder is not None else None
    if candidate is None or not candidate.is_file():
        return value
    return f"{candidate}{sep}{arg}"


def resolve_argv(argv: list[str], flag: str = "--config") -> list[str]:
    """argv with the value of `flag` (`--config X` or `--config=X`) resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == flag and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith(flag + "="):
            out[i] = f"{flag}={resolve(arg[len(flag) + 1 :])}"
    return out
