"""Trains the AR+NAR VALL-E from a packed store, resuming from WORKDIR automatically.

    python -m valle_jax.train --config configs/<preset>.py --workdir DIR [--config.x=y ...]

Multi-host (TPU pod slices, several GPU nodes): pass --distributed (or set VALLE_JAX_DISTRIBUTED=1)
on every host; on TPU jax finds the coordinator itself, elsewhere give --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
Exit status: 0 done or stopped cleanly (SIGTERM, SIGINT, `quit`), 3 non-finite loss, 1 bad config
value or store, or no checkpoint that can be restored, 2 bad command line (an unknown config key, a
missing config file) or a workdir that another live run holds, 4 a write to the workdir failed (a
full disk, a read-only or unwritable directory), 130 aborted by a second Ctrl-C. Errors are one
line; --verbose adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from valle_jax.appending import AppendFile
from valle_jax.atomic import as_path, io_error_line, object_store
from valle_jax.config_files import resolve_argv
from valle_jax.runtime import reexec_with_tcmalloc, start_training_process
from valle_jax.training.lock import WorkdirBusy, WorkdirLock

EXIT_BAD_INPUT, EXIT_USAGE, EXIT_WRITE, EXIT_ABORTED = 1, 2, 4, 130
HELP = {"--help", "-h", "-?", "--helpshort"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<preset>.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "run directory: checkpoints, logs, TensorBoard, exports; local or gs://, s3:// (docs/cloud.md)"
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("VALLE_JAX_DISTRIBUTED", "") not in ("", "0"),
    "call jax.distributed.initialize() (multi-host)",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (not needed on TPU)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job (not needed on TPU)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (not needed on TPU)")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "valle_jax" / "xla")),
    "persistent XLA compilation cache directory (a resumed run skips compiling); empty = off",
)
_COMMANDS = flags.DEFINE_enum(
    "commands",
    "auto",
    ["auto", "on", "off"],
    "read save/quit/export/eval/lr commands from stdin: auto = when it is a terminal",
)
_CPU_ASYNC = flags.DEFINE_bool(
    "cpu_async_dispatch",
    False,
    "on the CPU backend, let the next step start while the last one's buffers are being freed (JAX's default): "
    "with one step in flight two steps' XLA buffers can be alive at once (half preset: 8.6 GB resident "
    "instead of 4.9 GB); off, each step returns once it is done, at the same speed",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "print the traceback of a command-line error")
flags.mark_flags_as_required(["config", "workdir"])


def _config_path(argv: list[str]) -> str | None:
    """The --config file named on the command line (without a `:preset` suffix)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def _one_line(e: BaseException) -> str:
    while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps a KeyError
        e = e.args[0]
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text:  # an error inside the config file: its last line says what
        lines = lines[-1:]
    return " ".join(lines)


def _flag_error(e: BaseException, argv: list[str]) -> str:
    """One line naming the mistyped --config key, or else the error itself."""
    text = _one_line(e)
    keys = [a.split("=")[0].lstrip("-") for a in argv[1:] if a.startswith("--config.")]
    bad = [k for k in keys if any(f"'{part}'" in text or text == part for part in k.split(".")[1:])]
    if bad and isinstance(e, (AttributeError, KeyError)):
        hint = text[text.index("Did you mean") :] if "Did you mean" in text else ""
        return f"--{bad[0]}: no such config key" + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a mistyped config key or a missing config file reported in one line
    (exit status 2) instead of a traceback; `--verbose` keeps the traceback. A --config path that
    does not exist may name an installed preset (valle_jax/config_files.py)."""
    argv = resolve_argv(argv)
    if HELP.intersection(argv[1:]):  # absl's own --help exits 1; asking for help is not an error
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    verbose = "--verbose" in argv
    path = _config_path(argv)
    if path and not Path(path).is_file() and not verbose:
        print(f"error: --config {path}: no such file", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value  # loads the config file now, so that its errors are reported here
    except Exception as e:
        if verbose:
            raise
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return rest


class _HideOrbaxErrors(logging.Filter):
    """orbax logs a failed save several times, with tracebacks, from its background threads, and
    asyncio reports its failed write tasks and futures as "Task/Future exception was never retrieved"
    when they are collected (a future's report names only the orbax temp path it failed to write); the
    trainer then reports the failure in one line. Kept in log.txt and with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        orbax_task = record.name == "asyncio" and "orbax" in record.getMessage()
        return not (from_orbax or orbax_task)


class _OnceOnError:
    """On a full or read-only disk a log file says so once and leaves the console to log alone
    (logging's default prints a traceback for every line that fails)."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        logging.getLogger().removeHandler(self)
        print(
            f"warning: cannot write {self.name_of_file} ({io_error_line(error) or error}): logging to the console only",
            file=sys.stderr,
        )
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the failure is reported above; closing must not raise again
            pass


class _LogFile(_OnceOnError, logging.FileHandler):
    """WORKDIR/log.txt on a local disk."""

    @property
    def name_of_file(self) -> str:
        return self.baseFilename


class _ObjectStoreLog(_OnceOnError, logging.Handler):
    """WORKDIR/log.txt on an object store: its lines go into valle_jax.appending's parts, uploaded at
    most every FLUSH_SECS and when the run ends (a killed run loses at most that much of its log)."""

    FLUSH_SECS = 10.0

    def __init__(self, path):
        super().__init__()
        self.file = AppendFile(path, flush_secs=self.FLUSH_SECS)
        self.name_of_file = str(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.file.write(self.format(record) + "\n")
            self.file.flush()
        except Exception:  # noqa: BLE001 - logging's contract: report through handleError
            self.handleError(record)

    def flush(self) -> None:
        self.file.sync()

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            super().close()


def log_file(workdir) -> logging.Handler:
    """The handler writing WORKDIR/log.txt (valle_jax.atomic.object_store decides which kind)."""
    path = as_path(workdir) / "log.txt"
    return _ObjectStoreLog(path) if object_store(path) else _LogFile(path, encoding="utf-8")


def _hide_closed_loop_errors() -> None:
    """After a failed save, tensorstore's callbacks still try to reach orbax's closed asyncio loop and
    each prints a `RuntimeError: Event loop is closed` traceback; the trainer reports the failure in
    one line instead. Other uncaught errors are printed as usual."""

    def closed_loop(value) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, value, tb: None if closed_loop(value) else excepthook(kind, value, tb)
    sys.unraisablehook = lambda u: None if closed_loop(u.exc_value) else unraisablehook(u)


def setup_logging(workdir, primary: bool, verbose: bool = False) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    if not verbose:
        console.addFilter(_HideOrbaxErrors())
        _hide_closed_loop_errors()
    root.addHandler(console)
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        file = log_file(workdir)
        file.setFormatter(fmt)
        root.addHandler(file)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start_training_process(_CONFIG.value.model.arch, _CPU_ASYNC.value)  # before JAX's backend starts
    # JAX and the trainer are imported here, not at the top: `python -m valle_jax.train` first
    # re-executes itself with TCMalloc preloaded (__main__ below), and the first process should not
    # pay for importing them
    import jax  # noqa: PLC0415 - heavy, imported after the TCMalloc re-exec

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    from valle_jax.training.control import StopRequest  # noqa: PLC0415 - see `import jax` above

    workdir = as_path(_WORKDIR.value)
    primary = jax.process_index() == 0
    lock = WorkdirLock(workdir)
    stop = StopRequest()  # installed once training starts; until then Ctrl-C just interrupts
    try:
        code = _locked(lock, primary, stop)
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest said what it kept), or one while starting
        if not stop:
            print("interrupted while starting: this start wrote no checkpoint", file=sys.stderr)
        code = EXIT_ABORTED
    except OSError as e:  # before logging is set up: the lock or log.txt cannot be written
        if _VERBOSE.value:
            raise
        print(f"error: {io_error_line(e) or e}", file=sys.stderr)
        code = EXIT_WRITE
    stop.exiting(code)  # all written and closed: a signal from here on ends the process at once
    return code


def _locked(lock: WorkdirLock, primary: bool, stop) -> int:
    if primary:  # one lock per run: process 0 takes it for all hosts
        try:
            lock.acquire()
        except WorkdirBusy as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return _train(lock.path.parent, primary, stop)
    finally:
        lock.release()


def _train(workdir, primary: bool, stop) -> int:
    setup_logging(workdir, primary, _VERBOSE.value)
    from valle_jax.config import ConfigError  # noqa: PLC0415 - see `import jax` above
    from valle_jax.data.store import StoreError  # noqa: PLC0415 - see `import jax` above
    from valle_jax.training.checkpoint import CheckpointUnreadable, CheckpointWriteError  # noqa: PLC0415
    from valle_jax.training.loop import Trainer  # noqa: PLC0415 - see `import jax` above

    def fail(e: BaseException, line: str, code: int) -> int:
        logging.error("%s", line, exc_info=e if _VERBOSE.value else None)
        return code

    try:
        trainer = Trainer(_CONFIG.value, workdir, commands=_COMMANDS.value)
        return trainer.run(stop)
    except (ConfigError, StoreError, FileNotFoundError) as e:
        return fail(e, str(e), EXIT_BAD_INPUT)
    except CheckpointUnreadable as e:
        return fail(e, f"{e}: move {workdir / 'checkpoints'} aside to start the run afresh", EXIT_BAD_INPUT)
    except CheckpointWriteError as e:  # the loop reports its own; this comes from closing
        return fail(e, str(e), EXIT_WRITE)
    except OSError as e:  # setting up: run.json, metrics.jsonl, the checkpoint directory
        return fail(e, io_error_line(e) or str(e), EXIT_WRITE)


if __name__ == "__main__":
    reexec_with_tcmalloc("valle_jax.train")  # before JAX allocates anything (see valle_jax/runtime.py)
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
