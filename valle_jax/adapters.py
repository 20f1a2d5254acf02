"""LoRA adapters outside training: adapter directories, LoRA runs, merging into a base model.

An adapter directory (`python -m valle_jax.export --workdir LORA_RUN --out DIR`) holds
    lora.json          {"format": "valle_jax.lora", "version": 1, "lora": LoraConfig, "model": ModelConfig,
                        "base": the base model's path (train.init_from), "base_step": its step or -1, "stats",
                        "rows": {table: the ids of the rows the run grew and trained} (absent: none)}
    adapter.safetensors  A and B of each adapted matrix ("backbone.q.a", "backbone.q.b", ...), and the
                       trained delta of the grown rows ("text_emb.rows", "lang_emb.rows"; models.lora.GrownRows)
    symmap.json        the run's phoneme map (the base's, grown by the store's new symbols)
Synthesis merges it into a base (`--checkpoint BASE --lora DIR`, `TTS.load(BASE, lora=DIR)`);
`export --merge-lora` writes the merged model as a plain model directory.

A LoRA run's checkpoints hold only the adapters; `load_run` brings back the base it names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy

from valle_jax import runs
from valle_jax.atomic import as_path, staged_dir
from valle_jax.checkpointing import CheckpointError, flatten, unflatten
from valle_jax.config import ModelConfig
from valle_jax.models import lora as LR
from valle_jax.models.valle import abstract_model
from valle_jax.training.checkpoint import Checkpoints
from valle_jax.vocab import Vocab, grow

FORMAT, VERSION = "valle_jax.lora", 1
ADAPTER_FILE, META_FILE = "adapter.safetensors", "lora.json"


@dataclasses.dataclass(frozen=True)
class Adapter:
    adapters: dict  # nested like the parameters: {"backbone": {"q": {"a", "b"}}}
    lora: LR.LoraConfig
    model: ModelConfig  # the model it adapts
    symmap: dict
    base: str  # the base model's path
    base_step: int  # -1: its newest
    stats: dict
    rows: dict = dataclasses.field(default_factory=dict)  # table -> the grown rows' ids (models.lora.GrownRows)

    def targets(self, model: ModelConfig) -> list:
        return targets_for(model, self.lora, self.rows)


def targets_for(model: ModelConfig, lora: LR.LoraConfig, rows: dict) -> list:
    """What an adapter adapts in `model`: its matrices, and the grown rows (`rows`: table -> ids) it trained."""
    abstract = abstract_model(model)
    grown = LR.grown_rows(abstract, rows.get("text_emb", ()), rows.get("lang_emb", ()))
    return LR.find_targets(abstract, lora) + grown


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (as_path(path) / META_FILE).is_file()


def run_lora(workdir: str | os.PathLike) -> LR.LoraConfig:
    """The LoRA config a run trained with (rank 0: none)."""
    return LR.lora_config(_Section(runs.read_run(workdir).config))


class _Section(dict):
    """run.json's config as lora_config reads it (`config.model.get("lora")`)."""

    @property
    def model(self):
        return self.get("model", {})


def load_run(workdir: str | os.PathLike, step: int | None, load_base: Callable) -> tuple[Adapter, object, int]:
    """(adapter, base Weights, step) of a LoRA run's checkpoint; `load_base(path, step)` reads the
    base (valle_jax.sources.load_weights), whose vocabularies grow as the run's did."""
    run = runs.read_run(workdir)
    lcfg = run_lora(workdir)
    recorded = run.config.get("train", {})
    base_path, base_step = recorded.get("init_from", ""), int(recorded.get("init_from_step", -1))
    base = load_base(base_path, base_step if base_step >= 0 else None)
    added = tuple(s for s in run.symmap if s not in base.symmap)
    rows = {"text_emb": [run.symmap[s] for s in added], "lang_emb": list(range(base.model.n_langs, run.model.n_langs))}
    rows = {k: v for k, v in rows.items() if v}
    targets = targets_for(run.model, lcfg, rows)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: LR.init_adapters(targets, lcfg, 0)),
    )
    ckpts = Checkpoints(as_path(workdir) / "checkpoints", async_save=False)
    try:
        adapters, meta, step = ckpts.restore_params(step, target)
    finally:
        ckpts.close()
    vocab = Vocab(dict(run.symmap), added, None, run.model.n_langs)
    params = grow(jax.tree.map(np.asarray, base.params), base.symmap, vocab, run.model.n_langs)
    base = dataclasses.replace(base, params=params, model=run.model, symmap=dict(run.symmap))
    adapter = Adapter(
        jax.tree.map(np.asarray, adapters),
        lcfg,
        run.model,
        dict(run.symmap),
        base_path,
        base_step,
        runs.run_stats(meta),
        rows,
    )
    return adapter, base, step


def merged(params: dict, adapter: Adapter, model: ModelConfig) -> dict:
    """`params` (numpy) with the adapter merged in, float32."""
    check_fits(adapter, model)
    targets = adapter.targets(model)
    out = jax.jit(lambda p, a: LR.merge(p, a, targets, adapter.lora))(params, adapter.adapters)
    return jax.tree.map(np.asarray, out)


def check_fits(adapter: Adapter, model: ModelConfig) -> None:
    diff = {
        f: (getattr(adapter.model, f), getattr(model, f))
        for f in runs.SHAPE_FIELDS
        if getattr(adapter.model, f) != getattr(model, f)
    }
    if diff:
        raise CheckpointError(f"the adapter was trained on another model than this one (adapter's, model's): {diff}")


def save(out: str | os.PathLike, adapter: Adapter, overwrite: bool = False) -> Path:
    out = as_path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    with staged_dir(out, META_FILE) as tmp:
        safetensors.numpy.save_file(flatten(adapter.adapters), tmp / ADAPTER_FILE, metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "lora": dataclasses.asdict(adapter.lora),
            "model": dataclasses.asdict(adapter.model),
            "base": adapter.base,
            "base_step": adapter.base_step,
            "stats": adapter.stats,
            **({"rows": adapter.rows} if adapter.rows else {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=list))
        (tmp / "symmap.json").write_text(json.dumps(adapter.symmap, ensure_ascii=False))
    return out


def load(directory: str | os.PathLike) -> Adapter:
    path = as_path(directory)
    if not is_adapter_dir(path):
        raise CheckpointError(
            f"{path} is not a LoRA adapter directory (no {META_FILE}; see python -m valle_jax.export)"
        )
    meta = json.loads((path / META_FILE).read_text("utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {meta.get('format')} v{meta.get('version')}, expected {FORMAT} v{VERSION}"
        )
    lcfg = LR.LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})
    return Adapter(
        unflatten(safetensors.numpy.load((path / ADAPTER_FILE).read_bytes())),
        lcfg,
        ModelConfig(**meta["model"]),
        json.loads((path / "symmap.json").read_text("utf-8")),
        meta.get("base", ""),
        int(meta.get("base_step", -1)),
        meta.get("stats", {}),
        {k: [int(i) for i in v] for k, v in meta.get("rows", {}).items()},
    )
