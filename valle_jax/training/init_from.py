"""`train.init_from`: start a new run from pretrained weights (fresh optimizer, step 0).

The source is any checkpoint path (valle_jax.sources: model directory, training workdir with
`train.init_from_step`, reference fp32.pth / state-dict .pth / .npz / .safetensors, hf://). It
applies only to a workdir without checkpoints: a workdir that has some resumes, whatever init_from
says, and the log says which of the two happened.

The source must be the model the config describes: every field that shapes the parameters (arch,
width, heads, layers, kv heads, ffn, codes, levels, version, experts, retnet variant) must agree, or
the run stops with the fields named, before anything is loaded into a wrong shape. Two things may
differ, and then grow:

* The phoneme map. Symbols of the training store that the checkpoint's map lacks get the next free
  ids after the checkpoint's largest (the text table has `n_tokens` rows, far more than any map
  uses, so the table keeps its shape); the checkpoint's symbols keep their ids and rows bit for
  bit. A new symbol's row starts as the mean of the rows the checkpoint's map uses: a "typical
  phoneme" the model already reads sensibly, rather than a random row it has never seen. The store's
  ids are remapped into the merged map as batches are read (RemappedStore), and the merged map is
  what the run saves (run.json, exports).
* The language table. A store with language ids past the checkpoint's `n_langs` grows `lang_emb`
  to cover them (the model config's n_langs grows with it); new rows start as the mean of the old.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from valle_jax import runs
from valle_jax.checkpointing import CheckpointError
from valle_jax.config import ConfigError, ModelConfig, TrainConfig
from valle_jax.data.store import Store
from valle_jax.hub import HubError
from valle_jax.models.convert import ConversionError
from valle_jax.sources import Weights, as_numpy, load_weights
from valle_jax.vocab import Vocab, grow, merge_vocab, remap_table

log = logging.getLogger("valle_jax.train")

# the fields (beyond runs.SHAPE_FIELDS, less n_langs which may grow) that decide parameter shapes
MUST_MATCH = tuple(f for f in runs.SHAPE_FIELDS if f != "n_langs") + ("retnet_variant", "n_experts")


@dataclasses.dataclass(frozen=True)
class Start:
    """How a run starts: the model it trains, its vocabularies and, for a fresh init_from run, the
    parameters to start from."""

    model: ModelConfig
    vocab: Vocab
    params: dict | None = None  # numpy, grown to `model` (None: random init, or a resume)
    origin: str = ""  # the source, for the log
    base_langs: int = 0  # the source's language rows (those past it were grown)

    def grown_rows(self) -> tuple[list[int], list[int]]:
        """(text rows, language rows) that this run added to its source's tables."""
        text = [self.vocab.symmap[s] for s in self.vocab.added]
        return text, list(range(self.base_langs, self.model.n_langs)) if self.params is not None else []


def check_same_model(source: ModelConfig, config: ModelConfig, where: str) -> None:
    """ConfigError naming every shape field where the checkpoint and the config differ."""
    diff = {f: (getattr(source, f), getattr(config, f)) for f in MUST_MATCH if getattr(source, f) != getattr(config, f)}
    if diff:
        flags = " ".join(f"--config.model.{k}={v[0]}" for k, v in diff.items() if not k.startswith("n_experts"))
        raise ConfigError(
            f"train.init_from {where} is another model than the config's (checkpoint, config): {diff}; "
            f"make the config describe the checkpoint ({flags}{' --config.model.size=' if 'd_model' in diff else ''})"
        )


def plan(
    train: TrainConfig, model: ModelConfig, store: Store, workdir: Path, resuming: bool, need_base: bool = False
) -> Start:
    """How the run in `workdir` starts: a resume (the run's own vocabularies), a fresh run from
    `train.init_from`, or a fresh random run (the store's vocabularies). With `need_base` (LoRA:
    the base model is not in the checkpoints) a resume loads the source's weights too."""
    store_langs = int(store.lang.max()) + 1 if len(store.lang) else 1
    recorded = runs.read_run(workdir).config.get("train", {}) if runs.is_run(workdir) else {}
    if resuming and recorded.get("init_from"):  # an init_from run's own vocabularies, recorded when it started
        run = runs.read_run(workdir)
        cfg = dataclasses.replace(model, n_langs=run.model.n_langs)
        vocab = Vocab(dict(run.symmap), (), remap_table(store.symmap, run.symmap, model.n_tokens), cfg.n_langs)
        if not need_base:
            return Start(cfg, vocab)
        weights = _load(recorded["init_from"], recorded.get("init_from_step", -1), model)
        added = tuple(s for s in run.symmap if s not in weights.symmap)
        vocab = dataclasses.replace(vocab, added=added)
        params = grow(as_numpy(weights.params), weights.symmap, vocab, cfg.n_langs)
        return Start(cfg, vocab, params, weights.origin, weights.model.n_langs)
    if resuming or not train.init_from:
        return Start(model, Vocab(dict(store.symmap), (), None, model.n_langs))
    weights = _load(train.init_from, train.init_from_step, model)
    check_same_model(weights.model, model, train.init_from)
    vocab = merge_vocab(weights.symmap, store.symmap, model.n_tokens)
    n_langs = max(weights.model.n_langs, model.n_langs, store_langs)
    vocab = dataclasses.replace(vocab, n_langs=n_langs)
    params = grow(as_numpy(weights.params), weights.symmap, vocab, n_langs)
    if vocab.added:
        log.info("the phoneme map grows by %d symbols new to the checkpoint: %s", len(vocab.added), list(vocab.added))
    if n_langs > weights.model.n_langs:
        log.info("the language table grows from %d to %d rows", weights.model.n_langs, n_langs)
    return Start(dataclasses.replace(model, n_langs=n_langs), vocab, params, weights.origin, weights.model.n_langs)


def _load(source: str, step: int, model: ModelConfig) -> Weights:
    try:
        return load_weights(source, step=step if step >= 0 else None, heads=model.n_heads)
    except (CheckpointError, ConversionError, HubError, FileNotFoundError) as e:  # one line for the command
        raise ConfigError(f"train.init_from {source}: {e}") from e


def initial_state(params: dict, tx, seed: int, layout) -> dict:
    """Step 0 of a run that starts from `params`: the parameters on the mesh, a fresh optimizer
    state, the same RNG a random start would have (training.state.fresh_state)."""
    on_mesh = jax.device_put(params, layout.params)

    def init(p):
        return {
            "params": p,
            "opt_state": tx.init(p),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    return jax.jit(init, out_shardings=layout.state)(on_mesh)


class RemappedStore(Store):
    """A store whose text ids are read through a remap table (store id -> run id)."""

    def __init__(self, store: Store, remap: np.ndarray):  # noqa: D107 - shares the store's index, not re-read
        self.__dict__.update(store.__dict__)
        self.remap = np.asarray(remap, np.int32)
        self._tag = hashlib.sha1(self.remap.tobytes()).hexdigest()[:12]

    def __repr__(self) -> str:  # stable: grain keys worker state on it
        return f"RemappedStore({str(self.path)!r}, {self._tag})"

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        codes, text = super().read(i)
        return codes, self.remap[text].astype(text.dtype)


def wrap(store: Store, vocab: Vocab) -> Store:
    return RemappedStore(store, vocab.remap) if vocab.remap is not None else store


def into_run(store: Store, run_map: Mapping[str, int], n_tokens: int) -> Store:
    """`store` reading its text ids as the run's map numbers its symbols (a validation store)."""
    missing = sorted(set(store.symmap) - set(run_map))
    if missing:  # the model has no trained row for them: validation could only score garbage
        raise ConfigError(
            f"the validation store {store.path} has symbols the run's phoneme map lacks: {missing}; "
            "pack it from data the training store covers, or train on a store holding those symbols"
        )
    remap = remap_table(store.symmap, run_map, n_tokens)
    return RemappedStore(store, remap) if remap is not None else store
