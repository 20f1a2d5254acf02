"""Atomic file output: write to a temp file beside the target, then rename over it; and the one
place that decides how a path is written: as a local file or as an object-store object.

A killed process therefore leaves either the old file or the complete new one, never a
partial file under the final name. Temp files are named `.<name>.<random>.tmp[<suffix>]`.

Object stores (gs://, s3://, ... through etils.epath; docs/cloud.md) have no rename that is atomic
(GCS renames by copy and delete), no hard links and no appends, but an uploaded object appears
whole or not at all. So on an object store a file is written under its final name directly, a
library that writes only to local files writes into a local temp file that is then uploaded, and
a directory (a model, an adapter) is staged locally and uploaded with its marker file last: the
directory is complete once its marker exists. `object_store` decides; besides URI paths it takes the
local directories listed in VALLE_JAX_OBJECT_STORE_ROOTS (os.pathsep-separated), so that the
object-store code path can run on a local disk (the tests) or on a bucket mount without hard links.

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

from etils import epath

TMP_SUFFIX = ".tmp"
OBJECT_STORE_ROOTS = "VALLE_JAX_OBJECT_STORE_ROOTS"  # local directories written as object stores are


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote object (gs://bucket/..., s3://..., az://...)."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an etils.epath.Path (local ones made absolute; `absolute()` would mangle a URI)."""
    return epath.Path(path) if is_uri(path) else epath.Path(path).absolute()


def object_store(path: str | os.PathLike) -> bool:
    """Whether `path` is written as an object store is: no appends, no renames, no hard links."""
    if is_uri(path):
        return True
    roots = [r for r in os.environ.get(OBJECT_STORE_ROOTS, "").split(os.pathsep) if r]
    here = os.path.abspath(os.fspath(path))
    return any(here == r or here.startswith(r.rstrip(os.sep) + os.sep) for r in map(os.path.abspath, roots))


def upload(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copies the local file `local` to `path` (an object appears once its upload is complete)."""
    dst = as_path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src, dst.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temp path to write; renames it to `path` if the block succeeds. On an object store
    the temp file is a local one, uploaded under `path` instead (the object appears once complete).

    `suffix` ends the temp name, for libraries that infer the format from it (np.save appends
    '.npy' to a name without it; soundfile reads the extension).
    """
    remote = object_store(path)
    path = Path(path) if not remote else as_path(path)
    if not remote:
        path.parent.mkdir(parents=True, exist_ok=True)
    # on an object store the temp file is local (the library writes local files) and then uploaded
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX + suffix, dir=None if remote else path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if remote:
            upload(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yields a local temp directory to fill; if the block succeeds it replaces the directory `path`.
    Locally by renames (`publish_dir`); on an object store by an upload in which the file `marker`
    (what readers check, e.g. config.json) is removed first and written last, so a reader never
    takes a half-replaced directory for a complete one."""
    remote = object_store(path)
    tmp = Path(tempfile.mkdtemp(prefix=".staged.", suffix=TMP_SUFFIX)) if remote else temp_dir_beside(path)
    try:
        yield tmp
        if remote:
            _upload_dir(tmp, as_path(path), marker)
        else:
            publish_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _upload_dir(tmp: Path, dst: epath.Path, marker: str) -> None:
    if dst.exists():
        if (dst / marker).exists():
            (dst / marker).unlink()
        dst.rmtree()
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.relative_to(tmp) == Path(marker)):  # the marker last
        upload(p, dst / p.relative_to(tmp).as_posix())


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
    if object_store(path):  # the object appears whole once uploaded: no temp object, no rename
        dst = as_path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        return
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
