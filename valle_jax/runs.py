"""Reading and recording a training run directory (WORKDIR of `python -m valle_jax.train`).

A run directory holds `run.json` (the model config, the phoneme map and the full training config,
written by training) and `checkpoints/<step>/` (valle_jax.training.checkpoint). Export, synthesis
and training all read a run through this module, so none of them needs another's code to do it.
A run directory may be local or on an object store (gs://, s3://... through etils.epath; docs/cloud.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
from etils import epath

from valle_jax.atomic import as_path, write_text
from valle_jax.checkpointing import params_of
from valle_jax.config import ConfigError, ModelConfig
from valle_jax.data.languages import REFERENCE_LANGS
from valle_jax.models.valle import abstract_model
from valle_jax.training.checkpoint import Checkpoints

RUN_FILE = "run.json"  # written by training into its workdir: model config, symmap, full config

# ModelConfig fields that change the parameters: resuming a run with other values is an error
# (runtime fields such as dtype, remat or attention may change between restarts)
SHAPE_FIELDS = (
    "arch",
    "d_model",
    "n_heads",
    "n_layers",
    "n_kv_heads",
    "ffn_mult",
    "n_tokens",
    "n_prom_levels",
    "n_resp_levels",
    "n_langs",
    "version",
)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What `run.json` says about a run."""

    model: ModelConfig  # the model it trains
    symmap: dict  # phoneme -> id of its store
    config: dict  # the full training config (ml_collections, as a dict)
    langs: dict = dataclasses.field(default_factory=lambda: dict(REFERENCE_LANGS))  # language -> row, of its store


@dataclasses.dataclass(frozen=True)
class RunParams:
    """One checkpoint's parameters, with what an export or a synthesis needs beside them."""

    params: dict  # nested dict of arrays, as nnx.state(VALLE(model), nnx.Param)
    model: ModelConfig
    symmap: dict
    stats: dict  # run_stats of the checkpoint's meta
    step: int
    langs: dict = dataclasses.field(default_factory=lambda: dict(REFERENCE_LANGS))  # language -> row


def is_run(path: str | Path | epath.Path) -> bool:
    return (as_path(path) / RUN_FILE).is_file()


def read_run(workdir: str | Path | epath.Path) -> RunRecord:
    path = as_path(workdir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a valle_jax training directory (no {RUN_FILE})")
    run = json.loads(path.read_text("utf-8"))
    return RunRecord(ModelConfig(**run["model"]), run["symmap"], run["config"], run.get("langs") or REFERENCE_LANGS)


def check_languages(model: ModelConfig, langs: Mapping[str, int], used: Sequence[int], store: str | Path) -> None:
    """Every language the store's utterances use (ids `used`) must have a row in the model's
    language table: past it, the embedding lookup would silently read another row."""
    top = max((int(i) for i in used), default=0)
    if top >= model.n_langs:
        past = sorted(k for k, v in langs.items() if model.n_langs <= v <= top and v in set(map(int, used)))
        raise ConfigError(
            f"{store} holds utterances in {past} (language map {dict(langs)}), but the model's language "
            f"table has {model.n_langs} rows: set --config.model.n_langs={top + 1}"
        )


def check_run(
    workdir: epath.Path, model: ModelConfig, symmap: Mapping, store: str | Path, langs: Mapping | None = None
) -> None:
    """Raises ConfigError when `workdir` already holds a run of another model, phoneme or language map."""
    if not is_run(workdir):
        return
    old = json.loads((workdir / RUN_FILE).read_text("utf-8"))
    new = dataclasses.asdict(model)
    changed = {k: (old["model"].get(k), new[k]) for k in SHAPE_FIELDS if old["model"].get(k) != new[k]}
    if changed:
        raise ConfigError(f"{workdir} holds a run of another model (old, new): {changed}; use a new --workdir")
    if old["symmap"] != symmap:
        raise ConfigError(f"{store} uses another phoneme map than the run in {workdir}")
    if langs is not None and old.get("langs") not in (None, dict(langs)):
        raise ConfigError(
            f"{store} has another language map than the run in {workdir}: {old['langs']} vs {dict(langs)}"
        )


def write_run(
    workdir: epath.Path, model: ModelConfig, symmap: Mapping, config: Mapping, langs: Mapping | None = None
) -> None:
    record = {
        "model": dataclasses.asdict(model),
        "symmap": dict(symmap),
        "config": dict(config),
        "langs": dict(langs or REFERENCE_LANGS),
    }
    write_text(workdir / RUN_FILE, json.dumps(record, indent=1, default=list))


def run_stats(meta: Mapping) -> dict:
    """Training statistics for an export, under our names and the reference's (reference.md §7.8)."""
    stats = dict(meta.get("stats", {}))
    stats.update(
        step=meta["step"],
        global_step=meta["step"],
        micro_step=meta.get("micro_step", meta["step"]),
        global_samples=stats.get("samples", 0),
    )
    return stats


def load_params(workdir: str | Path | epath.Path, step: int | None = None) -> RunParams:
    """Checkpoint `step` (default: the latest complete one) of a run, its parameters on the first
    device and without the optimizer state."""
    workdir = as_path(workdir)
    run = read_run(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params_of(abstract_model(run.model))
    )
    ckpts = Checkpoints(workdir / "checkpoints", async_save=False)
    try:
        params, meta, step = ckpts.restore_params(step, target)
    finally:
        ckpts.close()
    return RunParams(params, run.model, run.symmap, run_stats(meta), step, run.langs)
