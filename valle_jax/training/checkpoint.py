"""Training checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints/<step>/`.

Items: "params" and "opt_state" (sharded arrays, restored onto whatever mesh the target says),
"train" (step counter and base RNG key), "data" (the grain iterator state, JSON) and "meta"
(run statistics, JSON). Saves are asynchronous; orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-save leaves a directory that `latest_step`
never returns (and that the next start removes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "train", "data", "meta")


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 4, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            train=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=True)

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
        """(params, meta, step) only: what export needs, without the optimizer state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = (
            ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
        )
        out = self.manager.restore(step, args=ocp.args.Composite(params=target, meta=ocp.args.JsonRestore()))
        return out["params"], out["meta"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
