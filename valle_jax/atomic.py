"""Atomic file output: write to a temp file beside the target, then rename over it.

A killed process therefore leaves either the old file or the complete new one, never a
partial file under the final name. Temp files are named `.<name>.<random>.tmp[<suffix>]`.

`io_error` turns a failed write (a Python OSError, or the error text tensorstore gives orbax) into
the file and the errno's meaning, for one-line messages about full disks and read-only workdirs.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temp path to write; renames it to `path` if the block succeeds.

    `suffix` ends the temp name, for libraries that infer the format from it (np.save appends
    '.npy' to a name without it; soundfile reads the extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new temp directory next to `path` (same filesystem, so `publish_dir` can rename it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))


def publish_dir(tmp: Path, path: str | os.PathLike) -> Path:
    """Renames the finished temp directory `tmp` to `path`, replacing an existing one: the old one
    is moved aside first, so `path` is always either the old or the new complete directory."""
    path = Path(path)
    os.chmod(tmp, 0o755)  # mkdtemp made it private; these are ordinary shared outputs
    if path.exists():
        old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(root: str | os.PathLike) -> int:
    """Deletes temp files a killed run left under `root`; returns how many."""
    n = 0
    for p in list(Path(root).rglob(f".*{TMP_SUFFIX}*")):
        if p.is_dir():  # a half-written store or model directory
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


# tensorstore (under orbax) reports a failed write as text: `Failed writing: "PATH": ... [os_error_code='28']`
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TS_PATHS = [re.compile(rf'{what}[^"]*"([^"]+)"') for what in ("Failed writing", "Failed to open", "local file")]


def io_error(e: BaseException) -> tuple[int | None, str | None]:
    """(errno, file) of an I/O failure: `e` itself or an exception it was raised from, an OSError or
    an error whose text carries tensorstore's `os_error_code`. (None, None) for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno, e.filename if isinstance(e.filename, str) else None
        code = _TS_ERRNO.search(str(e))
        if code:
            paths = [m.group(1) for m in (r.search(str(e)) for r in _TS_PATHS) if m]
            return int(code.group(1)), paths[0] if paths else None
        e = e.__cause__ or e.__context__
    return None, None


def errno_meaning(code: int) -> str:
    """ "No space left on device (ENOSPC)"."""
    return f"{os.strerror(code)} ({errnos.errorcode.get(code, f'errno {code}')})"


def io_error_line(e: BaseException) -> str | None:
    """'FILE: meaning (ENAME)' for an I/O failure (see `io_error`), None for anything else."""
    code, path = io_error(e)
    if code is None:
        return None
    return f"{path}: {errno_meaning(code)}" if path else errno_meaning(code)
