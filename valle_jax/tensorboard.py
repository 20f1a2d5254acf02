"""TensorBoard event writers (tensorboardX) that never import torch, and that write to object stores.

tensorboardX's writer module tries `import torch` when it loads, only to recognise torch tensors,
which valle_jax never passes it. Where torch is installed (the codec extra) that import would cost
every training run seconds of start-up and hundreds of MB, and break the promise that training and
decoding to codes never load torch (docs/install.md). So tensorboardX is loaded once with torch
marked absent; it then treats numpy arrays (all we give it) exactly as before.

On an object store (valle_jax.atomic.object_store) event files are written through
valle_jax.appending: tensorboardX's own gs:// and s3:// writers need google-cloud-storage or boto3
(not etils.epath's credentials) and upload the whole event file, from its first event, at every
flush, so a long run with audio samples would re-upload ever more. Ours uploads the current part of
at most `appending.PART_BYTES`; TensorBoard reads every event file of a directory, in name order, so
the parts read back as one event stream. tensorboardX picks a record writer by the text before the
first ':' of the event file's path, so object-store paths are handed to it under PREFIX.
"""

from __future__ import annotations

import importlib
import os
import sys

from valle_jax.appending import AppendFile
from valle_jax.atomic import object_store

PREFIX = "valle-jax-object-store"  # tensorboardX's name for our record writer (it must not contain ':')


def _import_tensorboardx():
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        return importlib.import_module("tensorboardX")
    finally:
        del sys.modules["torch"]


class _PartsRecordFile:
    """What tensorboardX's RecordWriter writes an event file through (write, flush, close).
    tensorboardX's writer thread flushes every `flush_secs`, so each flush uploads."""

    def __init__(self, path: str):
        self.file = AppendFile(path.removeprefix(f"{PREFIX}:"), flush_secs=0.0)

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def flush(self) -> None:
        self.file.sync()

    def close(self) -> None:
        self.file.close()


class _PartsFactory:
    def open(self, path: str) -> _PartsRecordFile:
        return _PartsRecordFile(path)

    def directory_check(self, path: str) -> None:
        """Objects need no directory made first (AppendFile makes a local one's)."""


def summary_writer(logdir: str | os.PathLike, **kwargs):
    """A tensorboardX SummaryWriter writing into `logdir` (kwargs: SummaryWriter's, e.g. flush_secs)."""
    tbx = _import_tensorboardx()
    logdir = os.fspath(logdir)
    if object_store(logdir):
        importlib.import_module("tensorboardX.record_writer").register_writer_factory(PREFIX, _PartsFactory())
        logdir = f"{PREFIX}:{logdir}"
    return tbx.SummaryWriter(logdir, **kwargs)
