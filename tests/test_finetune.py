"""Fine-tuning and model interchange: train.init_from from every source kind, growing vocabularies,
safetensors model directories, hf:// paths through a pre-populated hub cache (no network)."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest
import safetensors.numpy

from tests.test_training import make_trainer, test_config
from valle_jax import hub
from valle_jax.checkpointing import CheckpointError, params_of, read_params, save_model
from valle_jax.config import ConfigError, model_config
from valle_jax.data.store import Store
from valle_jax.export import write_reference
from valle_jax.models import init_model
from valle_jax.models.convert import to_reference
from valle_jax.sources import load_weights
from valle_jax.training import init_from

REV = "0123456789abcdef0123456789abcdef01234567"


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def hub_cache(root, repo: str, files: dict):
    """A huggingface_hub cache holding `files` ({path in repo: writer(path)}) at revision REV of `repo`."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(REV)
    snap = base / "snapshots" / REV
    for rel, write in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        write(snap / rel)
    return snap


@pytest.fixture(scope="module")
def donor(store_path, tmp_path_factory):
    """A random tiny model saved in every source format, with the store's phoneme map."""
    root = tmp_path_factory.mktemp("donor")
    cfg = model_config(test_config(store_path))
    params = jax.device_get(params_of(init_model(cfg, seed=7)))
    symmap = Store(store_path).symmap
    save_model(root / "orbax", cfg, params, symmap)
    save_model(root / "st", cfg, params, symmap, fmt="safetensors")
    write_reference(root / "fp32.pth", params, cfg, symmap, {})
    ref = to_reference(params, cfg)
    np.savez(root / "state.npz", **ref)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in ref.items()}, root / "ref.safetensors")
    return root, cfg, params, symmap


@pytest.mark.needs_espeak
def test_safetensors_model_dir_round_trip(donor):
    root, cfg, params, _ = donor
    assert (root / "st" / "model.safetensors").is_file() and not (root / "st" / "params").exists()
    assert_same(read_params(root / "st", cfg), params)
    bad = dict(params, text_emb=params["text_emb"][:1000])  # one parameter of the wrong shape
    save_model(root / "bad", cfg, bad, {"a": 1}, fmt="safetensors")
    with pytest.raises(CheckpointError, match=r"text_emb.*\(1000, 48\).*\(1024, 48\)"):
        load_weights(root / "bad")


@pytest.mark.needs_espeak
def test_init_from_every_source_kind(donor, store_path, tmp_path, monkeypatch, caplog):
    root, cfg, params, _ = donor
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = root / "orbax"
    hub_cache(tmp_path / "hub", "me/tiny", {f"model/{p.name}": _copier(p) for p in (root / "st").iterdir()})
    hub_cache(tmp_path / "hub", "me/ref", {"fp32.pth": _copier(root / "fp32.pth")})
    kinds = [src, root / "st", root / "fp32.pth", root / "state.npz", root / "ref.safetensors"]
    kinds += ["hf://me/tiny/model", "hf://me/ref"]
    train = test_config(store_path)
    for kind in kinds:
        start = init_from.plan(
            dataclasses.replace(_train_cfg(train), init_from=str(kind)), cfg, Store(store_path), tmp_path / "x", False
        )
        assert start.vocab.remap is None and not start.vocab.added, kind
        assert_same(start.params, params)
    assert (hub.cache_dir().parent / "valle_jax" / "converted").is_dir()  # the hub's fp32.pth, converted once
    # the whole path through the trainer: step 0 holds exactly the source's parameters, so its logits are the source's
    with caplog.at_level(logging.INFO, logger="valle_jax.train"):
        t = make_trainer(test_config(store_path, **{"train.init_from": str(src)}), tmp_path / "run")
        state, data_state, step = t.restore_or_init()
    assert step == 0 and data_state is None and "from the model directory" in caplog.text
    assert_same(jax.device_get(state["params"]), params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
    # a workdir as the source, at a chosen step
    t.checkpoints.save(0, state, t.iterator(None).get_state(), t._meta(0))
    t.checkpoints.close()
    start = init_from.plan(
        dataclasses.replace(_train_cfg(train), init_from=str(tmp_path / "run"), init_from_step=0),
        cfg,
        Store(store_path),
        tmp_path / "y",
        False,
    )
    assert "step 0 of the training run" in start.origin
    assert_same(start.params, params)
    # resuming wins over init_from, and says so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="valle_jax.train"):
        t2 = make_trainer(test_config(store_path, **{"train.init_from": str(root / "fp32.pth")}), tmp_path / "run")
        _, _, step = t2.restore_or_init()
    assert "resumed from step 0" in caplog.text and "is not used" in caplog.text
    t2.checkpoints.close()
    # offline with an empty cache: the error names the repository and the variable
    with pytest.raises(hub.HubError, match=r"me/absent.*HF_HUB_OFFLINE"):
        load_weights("hf://me/absent/model")


def _copier(src):
    return lambda dst: dst.write_bytes(src.read_bytes())


def _train_cfg(config):
    from valle_jax.config import train_config

    return train_config(config)


@pytest.mark.needs_espeak
def test_mismatched_source_is_named(donor, store_path, tmp_path):
    root, cfg, _, _ = donor
    wide = dataclasses.replace(cfg, d_model=64)
    save_model(tmp_path / "wide", wide, jax.device_get(params_of(init_model(wide, seed=1))), {"a": 1})
    with pytest.raises(ConfigError, match=r"'d_model': \(64, 48\)"):
        make_trainer(test_config(store_path, **{"train.init_from": str(tmp_path / "wide")}), tmp_path / "run")
    with pytest.raises(CheckpointError, match="nothing.pth: checkpoint not found"):
        load_weights(tmp_path / "nothing.pth")
    with pytest.raises(ConfigError, match="train.init_from .*nothing.pth: checkpoint not found"):
        make_trainer(test_config(store_path, **{"train.init_from": str(tmp_path / "nothing.pth")}), tmp_path / "r2")


@pytest.mark.needs_espeak
def test_growing_vocabularies_keep_old_rows(donor, store_path, tmp_path):
    root, cfg, params, symmap = donor
    # the checkpoint's map lacks three of the store's symbols and numbers one of them differently
    ordered = sorted(symmap, key=lambda s: symmap[s])
    dropped = ordered[-3:]
    old = {s: i for s, i in symmap.items() if s not in dropped}
    ids = list(symmap.values())
    moved = next(s for s in ordered[4:] if ids.count(symmap[s]) == 1 and s not in dropped)
    old[moved] = max(symmap.values()) + 10
    save_model(tmp_path / "old", cfg, params, old)
    config = test_config(store_path, **{"train.init_from": str(tmp_path / "old"), "model.n_langs": 2})
    t = make_trainer(config, tmp_path / "run")
    vocab = t.start_from.vocab
    assert set(vocab.added) == set(dropped) and all(vocab.symmap[s] == i for s, i in old.items())
    state, _, _ = t.restore_or_init()
    got = jax.device_get(state["params"])
    used = sorted(set(old.values()))
    np.testing.assert_array_equal(got["text_emb"][used], params["text_emb"][used])  # old rows bit for bit
    for s in dropped:
        np.testing.assert_allclose(got["text_emb"][vocab.symmap[s]], params["text_emb"][used].mean(0), rtol=1e-6)
    assert t.model_cfg.n_langs == 2 and got["lang_emb"].shape == (2, cfg.d_model)
    np.testing.assert_array_equal(got["lang_emb"][0], params["lang_emb"][0])
    # batches read the store's ids through the merged map, which the run saves
    i = next(k for k in range(len(t.store)) if symmap[moved] in Store(store_path).read(k)[1])
    raw, mapped = Store(store_path).read(i)[1], t.store.read(i)[1]
    assert np.all(mapped[raw == symmap[moved]] == old[moved])
    inverse = {}
    for sym, k in symmap.items():
        inverse.setdefault(k, sym)
    np.testing.assert_array_equal(mapped, [vocab.symmap[inverse[k]] if k in inverse else k for k in raw.tolist()])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["symmap"] == vocab.symmap
    t.checkpoints.close()
