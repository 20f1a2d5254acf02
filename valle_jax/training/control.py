"""Stopping and steering a run: SIGTERM/SIGINT requests, and console commands (reference.md §7.4).

Commands, one per line on stdin: save | quit | export | eval | lr VALUE | help. stdin is read by a
daemon thread only when it is a terminal (or when asked), so a closed, redirected or non-terminal
stdin never blocks or breaks training. With several processes, process 0's commands and everyone's
stop requests are shared at each sync point (multihost_utils), so all hosts act together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

COMMANDS = ("save", "quit", "export", "eval", "lr", "help")
HELP = "commands: save | quit | export | eval | lr VALUE (set the learning rate from now on) | help"


@dataclass(frozen=True)
class Command:
    name: str
    value: float = 0.0


def parse(line: str) -> Command | None:
    """A Command, or None after logging why the line is not one."""
    words = line.strip().split()
    if not words:
        return None
    name = words[0].lower()
    if name not in COMMANDS:
        log.warning("unknown command %r; %s", line.strip(), HELP)
        return None
    if name == "lr":
        try:
            value = float(words[1])
            if not value > 0:
                raise ValueError
        except (IndexError, ValueError):
            log.warning("`lr` needs a positive number, e.g. `lr 1e-4`; got %r", line.strip())
            return None
        return Command("lr", value)
    return Command(name)


class CommandReader:
    def __init__(self, stream=None, enabled: bool | None = None):
        stream = sys.stdin if stream is None else stream
        if enabled is None:
            try:
                enabled = stream is not None and stream.isatty()
            except (ValueError, OSError):  # closed stream
                enabled = False
        self.queue: queue.Queue[Command] = queue.Queue()
        self.enabled = bool(enabled)
        if self.enabled:
            threading.Thread(target=self._read, args=(stream,), daemon=True, name="stdin-commands").start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                cmd = parse(line)
                if cmd is not None and cmd.name == "help":
                    log.info(HELP)
                elif cmd is not None:
                    self.queue.put(cmd)
        except (ValueError, OSError):  # stdin closed under us: just stop reading
            pass

    def poll(self) -> list[Command]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


class StopRequest:
    """Set by SIGTERM or SIGINT; the loop finishes its step, saves and exits.

    What a later signal does depends on how far the stop has got, and it always says so in one line:
    - while the step finishes (`running`): a second Ctrl-C aborts at once without saving
      (KeyboardInterrupt; the command exits with status 130), keeping the checkpoints already complete;
    - while a checkpoint is written (`writing`): the write is never interrupted (orbax renames a step
      into place only once it is complete); the run exits as soon as it is done. One more Ctrl-C after
      that message abandons the write (the process ends at once, status 130): the half-written step is
      a temporary directory that no restore reads and the next start removes;
    - once the checkpoint is complete (`saved`): it says so and the run goes on exiting;
    - after the run has closed everything (`exiting`, set by the command): the process ends at once with
      the run's exit status.
    SIGTERM never aborts: a repeated one only says what the run is doing.
    """

    def __init__(self):
        self.signal: int | None = None
        self.phase = "running"
        self.step: int | None = None  # the checkpoint being written or just written
        self.exit_code = 0
        self._presses = 0  # Ctrl-C presses while the current checkpoint is written
        self._previous = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def writing(self, step: int):
        """Marks a checkpoint write (queueing it, or waiting for it) that a Ctrl-C must not break."""
        if step != self.step:  # queueing and then waiting for the same checkpoint count as one write
            self._presses = 0
        before, self.phase, self.step = self.phase, "writing", step
        try:
            yield
        finally:
            self.phase = before if before != "writing" else "running"

    def saved(self, step: int) -> None:
        """The stop's checkpoint `step` is complete; the run is only closing its files now."""
        self.phase, self.step = "saved", step

    def exiting(self, exit_code: int) -> None:
        """Everything is written and closed: a signal now ends the process at once with `exit_code`."""
        self.phase, self.exit_code = "exiting", exit_code
        self.install()

    def _handle(self, signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        first, self.signal = self.signal is None, self.signal or signum
        if self.phase == "exiting":
            print(f"{name}: the run is over and its files are closed; exiting now", file=sys.stderr, flush=True)
            os._exit(self.exit_code)
            return  # (only reached where os._exit is replaced, as in tests)
        if self.phase == "saved":
            log.warning("%s: checkpoint %d is complete; the run is exiting", name, self.step)
        elif self.phase == "writing":
            if signum == signal.SIGINT and self._presses:
                log.warning(
                    "%s again: abandoning checkpoint %d half-written; the next start removes it and resumes "
                    "from the newest complete checkpoint",
                    name,
                    self.step,
                )
                _flush_logs()
                os._exit(EXIT_ABORTED)
                return  # (only reached where os._exit is replaced, as in tests)
            self._presses += signum == signal.SIGINT
            log.warning(
                "%s: checkpoint %d is being written; exiting as soon as it is complete (Ctrl-C again abandons it)",
                name,
                self.step,
            )
        elif first:
            log.warning(
                "received %s: finishing this step, saving, then exiting (Ctrl-C again aborts without saving)", name
            )
        elif signum == signal.SIGINT:
            log.warning(
                "Ctrl-C again: aborting now without saving; the next start resumes from the newest complete checkpoint"
            )
            raise KeyboardInterrupt
        else:
            log.warning("received %s again: already finishing this step to save and exit", name)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __bool__(self) -> bool:
        return self.signal is not None


EXIT_ABORTED = 128 + signal.SIGINT  # what a shell reports for a process ended by Ctrl-C


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - ending the process anyway
            pass


_CODES = {name: i + 1 for i, name in enumerate(COMMANDS)}


def agree(stop: bool, commands: list[Command]) -> tuple[bool, list[Command]]:
    """Across processes: stop if any process wants to; process 0's commands (one per sync) for all."""
    if jax.process_count() == 1:
        return stop, commands
    first = commands[0] if commands else None
    mine = np.array([float(stop), _CODES[first.name] if first else 0, first.value if first else 0.0], np.float64)
    rows = np.asarray(multihost_utils.process_allgather(mine))
    any_stop = bool(rows[:, 0].max() > 0)
    code, value = int(rows[0, 1]), float(rows[0, 2])
    names = {v: k for k, v in _CODES.items()}
    return any_stop, ([Command(names[code], value)] if code else [])


class Console:
    """The run's steering wheel: at each sync point, agrees with the other processes on stopping and
    on process 0's commands, then runs each command's handler (`handlers[name](progress, command)`)."""

    def __init__(self, mode: str, primary: bool, handlers: dict[str, Callable]):
        enabled = {"on": True, "off": False, "auto": None}[mode] if primary else False
        self.reader = CommandReader(enabled=enabled)
        self.handlers = handlers
        self.multi = jax.process_count() > 1

    @property
    def enabled(self) -> bool:
        return self.reader.enabled

    def _poll(self) -> list[Command]:
        cmds = self.reader.poll()
        if self.multi and len(cmds) > 1:  # one command per sync point across hosts; keep the rest for later
            for c in cmds[1:]:
                self.reader.queue.put(c)
            cmds = cmds[:1]
        return cmds

    def sync(self, stop: StopRequest, progress) -> None:
        want_stop, commands = agree(bool(stop), self._poll())
        if want_stop and not stop:
            stop.signal = -1  # another host was asked to stop
        for cmd in commands:
            log.info("command: %s%s", cmd.name, f" {cmd.value:g}" if cmd.name == "lr" else "")
            self.handlers[cmd.name](progress, cmd)
            if cmd.name == "quit":
                stop.signal = stop.signal or -2
