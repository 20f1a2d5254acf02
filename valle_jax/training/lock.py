"""One training process per workdir: WORKDIR/lock names the process that holds it.

Two runs writing the same checkpoints, logs and exports would corrupt each other, so a second start
on a held workdir stops at once. The lock is a file created exclusively (so it also works where
`flock` does not, as on some network filesystems) holding the owner's PID, host and process start
time. A process killed outright (SIGKILL, a crash) leaves the file behind; the next start on the
same host sees that its process is gone and takes the lock over with a warning. On another host
it cannot check, so it refuses and says which file to remove.

An object store (gs://, s3://; valle_jax.atomic.object_store) has no hard links and no
create-if-absent that etils.epath exposes, so there the lock object is created by a check that it is
absent, a write of the owner (with a random token), a pause of SETTLE_S and a read back: of two
starts that both wrote, the one whose token is not read back stops. This is exclusive except when
one start's check and write both fall between the other's check and write (a window of one request,
tens of milliseconds): two starts of the same workdir within that window can both run. GCS reads
its own writes consistently, so the read back sees the last write.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from etils import epath

from valle_jax.atomic import as_path, object_store

log = logging.getLogger("valle_jax.train")

LOCK_FILE = "lock"
SETTLE_S = 0.5  # on an object store: how long a start waits before reading its lock back


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    started = _start_time(pid)
    return started is None or owner.get("started") in (None, started)


class WorkdirLock:
    def __init__(self, workdir: str | Path | epath.Path):
        self.path = as_path(workdir) / LOCK_FILE
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
        self.held = False
        self.remote = object_store(self.path)

    def _create(self) -> bool:
        return self._create_object() if self.remote else self._create_file()

    def _create_object(self) -> bool:
        """Check, write, settle, read back (see the module docstring for what this guarantees)."""
        if self.path.exists():
            return False
        mine = {**self.me, "token": secrets.token_hex(8), "time": time.time()}
        self.path.write_text(json.dumps(mine))
        time.sleep(SETTLE_S)
        if self._owner().get("token") != mine["token"]:
            return False
        self.me = mine
        return True

    def _create_file(self) -> bool:
        """Creates the lock with its content in one step (a hard link fails if the name exists), so
        no other start ever reads a half-written lock."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.me['pid']}.tmp")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable: not a lock anyone can still hold

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises WorkdirBusy naming the process and host that hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another start may take or drop the lock between our steps
            if self._create():
                self.held = True
                return self
            owner = self._owner()
            same_host = owner.get("host") == self.me["host"]
            if owner and (not same_host or _alive(owner)):
                where = "this host" if same_host else f"host {owner.get('host')}"
                raise WorkdirBusy(
                    f"{self.path.parent} is in use by PID {owner.get('pid')} on {where} "
                    f"(remove {self.path} if that process is gone)"
                )
            log.warning("taking over the lock of %s from PID %s, which is gone", self.path.parent, owner.get("pid"))
            self.path.unlink(missing_ok=True)
        raise WorkdirBusy(f"could not take the lock {self.path}: other processes keep taking it")

    def release(self) -> None:
        owner = self._owner() if self.held else {}
        if owner.get("pid") == self.me["pid"] and owner.get("token") == self.me.get("token"):
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:  # a workdir turned read-only: the next start takes the lock over
                log.warning("could not remove the lock %s: %s", self.path, e)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
