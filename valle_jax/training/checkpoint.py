"""Training checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints/<step>/`, a local
directory or an object store's (gs://, s3://: orbax writes those itself, through etils.epath and
tensorstore, with its own commit marker instead of a rename).

Items: "params" and "opt_state" (sharded arrays, restored onto whatever mesh the target says),
"train" (step counter and base RNG key), "data" (the grain iterator state, JSON) and "meta"
(run statistics, JSON). Saves are asynchronous; orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-save leaves a directory that `latest_step`
never returns (and that the next start removes).

A complete step can still be unreadable (a disk filled up, files truncated or removed afterwards) or
hold non-finite parameters. Restoring the latest step therefore walks back from the newest complete
step to the first that loads and is finite, warning once per bad step and leaving its directory in
place; a run that later saves that step again first moves the bad directory aside.

A save that cannot be written (a full disk, a read-only or unwritable directory) raises
CheckpointWriteError, one line naming the step, the file and the errno's meaning, whenever orbax
reports it: asynchronous saves fail in a background thread and surface at the next save or wait.
The failed step's temporary directory is removed at once (to give back the space it took); the
complete steps before it are untouched.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from valle_jax.atomic import as_path, errno_meaning, io_error

log = logging.getLogger("valle_jax.train")

ITEMS = ("params", "opt_state", "train", "data", "meta")


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 4, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.bad: set[int] = set()  # complete steps found unreadable; saving one again moves it aside
        self.queued: int | None = None  # the newest step handed to orbax (maybe still being written)

    def has(self, step: int) -> bool:
        """Whether a good checkpoint of `step` exists (or is being written)."""
        return step in self.manager.all_steps() and step not in self.bad

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> bool:
        """Queues an asynchronous save of `step` (raises CheckpointWriteError if this or the last save failed)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            train=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        with self._writing(step):
            if step in self.bad:
                self._move_aside(step)
            saved = self.manager.save(step, args=args, force=True)
        self.queued = step
        return saved

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any, dict]:
        """(state, data state, meta) of `step`, arrays laid out as `abstract_state`'s shardings say."""
        train_target = {"step": abstract_state["step"], "rng": abstract_state["rng"]}
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                train=ocp.args.StandardRestore(train_target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = {"params": out["params"], "opt_state": out["opt_state"], **out["train"]}
        return state, out["data"], out["meta"]

    def restore_params(self, step: int | None = None, abstract_params: dict | None = None) -> tuple[dict, dict, int]:
        """(params, meta, step) only: what export needs, without the optimizer state. Without
        `step`, the newest good one (see `newest_good`)."""
        target = (
            ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
        )

        def load(s: int):
            out = self.manager.restore(s, args=ocp.args.Composite(params=target, meta=ocp.args.JsonRestore()))
            return out["params"], out["meta"]

        if step is not None:
            params, meta = load(step)
            return params, meta, step
        (params, meta), step = self.newest_good(load, lambda out: out[0])
        return params, meta, step

    def newest_good(self, load: Callable[[int], Any], params_of: Callable[[Any], Any]) -> tuple[Any, int]:
        """(load(step), step) for the newest complete step that loads and whose parameters
        (`params_of(loaded)`) are finite; each bad step is named once in a warning and left in place.
        Raises FileNotFoundError when there is no complete step, CheckpointUnreadable when none is good."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        for step in steps:
            try:
                out = load(step)
                if not all_finite(params_of(out)):
                    raise CheckpointUnreadable("its parameters are not all finite")
                return out, step
            except Exception as e:  # orbax and tensorstore raise many kinds; any of them makes the step bad
                self.bad.add(step)
                log.warning(
                    "checkpoint %d in %s is unreadable, trying an older one: %s", step, self.directory, _one_line(e)
                )
        raise CheckpointUnreadable(f"no checkpoint in {self.directory} can be restored (steps {steps}, see above)")

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        dst, n = self.directory / f"{step}.unreadable", 1
        while dst.exists():
            dst, n = self.directory / f"{step}.unreadable{n}", n + 1
        if src.exists():
            src.rename(dst)
            log.warning("moved the unreadable checkpoint %d aside to %s before saving step %d again", step, dst, step)
        self.manager.reload()
        self.bad.discard(step)

    @contextlib.contextmanager
    def _writing(self, step: int):
        """Turns a failed write of `step` (or of the asynchronous save before it, which orbax reports
        now) into CheckpointWriteError, and removes the failed step's temporary directory."""
        try:
            yield
        except Exception as e:  # orbax and tensorstore raise many kinds (ValueError with an errno in its text)
            code, path = io_error(e)
            failed = _step_in(path or str(e), self.directory)
            if failed is None:
                failed = self.queued if self.queued is not None and not self.has_complete(self.queued) else step
            for tmp in self.directory.glob(f"{failed}.orbax-checkpoint-tmp*"):
                with contextlib.suppress(OSError):
                    tmp.rmtree()
            raise CheckpointWriteError(failed, self.directory, e, code, path) from e

    def has_complete(self, step: int) -> bool:
        return (self.directory / str(step)).is_dir()

    def wait(self) -> None:
        """Waits for the asynchronous save; raises CheckpointWriteError if it failed."""
        with self._writing(self.queued if self.queued is not None else -1):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class CheckpointUnreadable(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; `str()` is one line naming the step, the file and the cause."""

    def __init__(self, step: int, directory: Path, cause: BaseException, code: int | None, path: str | None):
        self.step, self.directory, self.errno = step, directory, code
        reason = errno_meaning(code) if code is not None else _one_line(cause)
        where = f" (writing {path})" if path else ""
        super().__init__(f"cannot write checkpoint {step} in {directory}: {reason}{where}")


def _step_in(text: str, directory: Path) -> int | None:
    """The step of a path (or error text) under `directory`: `<dir>/<step>` or orbax's `<step>.orbax-checkpoint-tmp`."""
    m = re.search(re.escape(str(directory)) + r"/(\d+)(?:[./]|$)", text)
    return int(m.group(1)) if m else None


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` is finite (one reduction on the device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves))


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
