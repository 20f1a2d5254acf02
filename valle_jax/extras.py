"""The optional dependencies that the core install leaves out, and the one error that names their extra.

The core install (training, decoding to codes, data preparation without audio) never loads torch;
audio in and out (EnCodec), reading and writing the reference's PyTorch files need the `codec`
extra. Asking for torch here, rather than importing it, turns a bare ModuleNotFoundError into the
command that fixes it.
"""

from __future__ import annotations

import importlib

CODEC_HINT = "pip install 'valle-jax[codec]'"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_codec_package(name: str, purpose: str):
    """Imports `name` (torch or encodec), or raises MissingExtra saying what needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name and not (e.name or "").startswith(name + "."):
            raise  # the package is there but one of its own dependencies is broken: say that, not this
        raise MissingExtra(f"{purpose} needs {name}, which the core install leaves out: {CODEC_HINT}") from e


def require_torch(purpose: str):
    return require_codec_package("torch", purpose)
