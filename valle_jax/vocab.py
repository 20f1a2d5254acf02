"""Merging a checkpoint's phoneme and language vocabularies with a training store's (train.init_from).

The checkpoint's symbols keep their ids and rows; the store's new symbols take the next free ids
after the checkpoint's largest, and their rows start as the mean of the rows the checkpoint's map
uses. New language rows start as the mean of the old ones. See valle_jax.training.init_from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from valle_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The run's text and language vocabularies, as merged with a checkpoint's."""

    symmap: dict  # phoneme -> id: the checkpoint's ids, then the store's new symbols
    added: tuple[str, ...]  # the store's symbols the checkpoint's map lacked
    remap: np.ndarray | None  # store text id -> run text id (None: the same ids)
    n_langs: int  # rows of the language table


def merge_vocab(ckpt_map: Mapping[str, int], store_map: Mapping[str, int], n_tokens: int) -> Vocab:
    """The checkpoint's map plus the store's new symbols, and the store-id -> run-id table."""
    merged = dict(ckpt_map)
    next_id = max(merged.values(), default=-1) + 1
    added = []
    for sym in sorted(store_map, key=lambda s: (store_map[s], s)):
        if sym not in merged:
            merged[sym], next_id = next_id, next_id + 1
            added.append(sym)
    if next_id > n_tokens:
        raise ConfigError(
            f"the merged phoneme map needs {next_id} text ids but the model's text table has {n_tokens} rows "
            f"(model.n_tokens): {len(added)} symbols are new to the checkpoint"
        )
    return Vocab(merged, tuple(added), remap_table(store_map, merged, n_tokens), 0)


def remap_table(store_map: Mapping[str, int], run_map: Mapping[str, int], n_tokens: int) -> np.ndarray | None:
    """int32[n_tokens]: a store id -> the run's id of the same symbol (None when all are the same)."""
    missing = sorted(set(store_map) - set(run_map))
    if missing:
        raise ConfigError(f"the store's symbols {missing} are not in the run's phoneme map")
    table = np.arange(n_tokens, dtype=np.int32)
    assigned: dict[int, str] = {}
    for sym, i in store_map.items():
        first = assigned.setdefault(i, sym)
        if run_map[first] != run_map[sym]:  # two symbols sharing a store id must share a run id
            raise ConfigError(f"the store gives {first!r} and {sym!r} the same id {i}, the run's map does not")
        table[i] = run_map[sym]
    return None if np.array_equal(table, np.arange(n_tokens)) else table


def grow(params: dict, ckpt_map: Mapping[str, int], vocab: Vocab, n_langs: int) -> dict:
    """`params` with rows for the added symbols and languages (see the module docstring)."""
    params = dict(params)
    text = np.array(params["text_emb"], np.float32)
    if vocab.added:
        used = sorted(set(ckpt_map.values()))
        text[[vocab.symmap[s] for s in vocab.added]] = text[used].mean(axis=0) if used else 0.0
    params["text_emb"] = text
    langs = np.asarray(params["lang_emb"], np.float32)
    if n_langs > len(langs):
        extra = np.broadcast_to(langs.mean(axis=0, keepdims=True), (n_langs - len(langs), langs.shape[1]))
        params["lang_emb"] = np.concatenate([langs, extra])
    return params
