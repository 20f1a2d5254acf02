"""Files a run grows by appending (metrics.jsonl, log.txt, TensorBoard event files), on a local disk
or on an object store.

Locally an `AppendFile` is a file opened for appending, flushed as the writer asks: what training
always did. An object store (gs://, s3://, ...: `valle_jax.atomic.object_store`) cannot append to an
object, so there the file is a series of part objects `NAME.part-00000`, `NAME.part-00001`, ...:
the current part is held in memory and uploaded whole (replacing the last upload of that part) at
most every `flush_secs` and at `sync()` / `close()`; once it holds `part_bytes` it is left as it is
and the next part begins. Each process that opens the file starts a new part after the last one
present, so a resumed run never rewrites what an earlier one wrote. Uploads therefore cost at most
one part per flush, however long the run, and what a killed process loses is at most its last
`flush_secs` of lines. `read_bytes` reads either layout back as one file (the parts in order).
"""

from __future__ import annotations

import os
import re
import time

from etils import epath

from valle_jax.atomic import as_path, object_store

PART = ".part-"
PART_BYTES = 4 << 20  # 4 MiB: a flush uploads at most this much
_PART_RE = re.compile(r"\.part-(\d{5,})$")


def part_name(name: str, index: int) -> str:
    return f"{name}{PART}{index:05d}"


def parts(path: str | os.PathLike) -> list[epath.Path]:
    """The part objects of `path` on an object store, in order (empty when there are none)."""
    path = as_path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for child in path.parent.iterdir():
        m = _PART_RE.search(child.name)
        if m and child.name[: m.start()] == path.name:
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole content of an appended file: the local file, or its parts joined in order."""
    path = as_path(path)
    chunks = [path.read_bytes()] if path.is_file() else []
    chunks += [p.read_bytes() for p in parts(path)]
    if not chunks:
        raise FileNotFoundError(f"{path} not found")
    return b"".join(chunks)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).is_file() or bool(parts(path))


class AppendFile:
    """A file that only grows (see the module docstring); `write` takes str (UTF-8) or bytes."""

    def __init__(self, path: str | os.PathLike, flush_secs: float = 10.0, part_bytes: int = PART_BYTES):
        self.path = as_path(path)
        self.name = str(self.path)  # as a file object names itself (error messages use it)
        self.remote = object_store(path)
        self.flush_secs, self.part_bytes = flush_secs, part_bytes
        self.closed = False
        if not self.remote:
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the run, closed by close()
            return
        existing = parts(self.path)
        self._index = int(_PART_RE.search(existing[-1].name).group(1)) + 1 if existing else 0
        self._buffer = bytearray()
        self._dirty = False
        self._uploaded = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, data: str | bytes) -> None:
        data = data.encode("utf-8") if isinstance(data, str) else data
        if not self.remote:
            self._file.write(data)
            return
        self._buffer += data
        self._dirty = True

    def flush(self) -> None:
        """Locally: to the file now. On an object store: uploads the current part if `flush_secs` have
        passed since the last upload (or the part is full), else leaves it for a later flush."""
        if not self.remote:
            self._file.flush()
        elif self._dirty and (
            time.monotonic() - self._uploaded >= self.flush_secs or len(self._buffer) >= self.part_bytes
        ):
            self.sync()

    def sync(self) -> None:
        """Everything written so far reaches the file or the store now."""
        if not self.remote:
            self._file.flush()
            return
        if self._dirty:
            (self.path.parent / part_name(self.path.name, self._index)).write_bytes(bytes(self._buffer))
            self._dirty = False
            self._uploaded = time.monotonic()
        if len(self._buffer) >= self.part_bytes:  # this part is final: the next writes start another
            self._index, self._buffer = self._index + 1, bytearray()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.remote:
            self.sync()
        else:
            self._file.close()
