"""Fine-tuning and model interchange: train.init_from from every source kind, growing vocabularies,
safetensors model directories, hf:// paths through a pre-populated hub cache (no network)."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from tests.test_training import make_trainer, test_config
from valle_jax import hub
from valle_jax.audio import AudioError
from valle_jax.checkpointing import CheckpointError, params_of, read_params, save_model
from valle_jax.config import ConfigError, model_config
from valle_jax.data.store import Store
from valle_jax.export import write_reference
from valle_jax.models import init_model
from valle_jax.models.convert import to_reference
from valle_jax.models.valle import abstract_model
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
    shapes = params_of(abstract_model(wide))
    save_model(tmp_path / "wide", wide, jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes), {"a": 1})
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


def test_lora_adapters_on_every_backbone():
    """Targets on every backbone; a fresh adapter changes nothing; the merged matrix equals base plus
    the adapter's second path x·A·B within 1e-5."""
    from valle_jax.models import lora as LR
    from valle_jax.models.valle import abstract_model

    lcfg = LR.LoraConfig(rank=4, alpha=8.0)
    for arch, extra in [("llama", {}), ("transformer", {}), ("retnet", {}), ("mixtral", {"experts": 2})]:
        cfg = dataclasses.replace(model_config(_tiny()), arch=arch, **extra)
        targets = LR.find_targets(abstract_model(cfg), lcfg)
        names = {t.name for t in targets}
        assert names and all(n.startswith("backbone/") for n in names), arch
        rng = np.random.default_rng(1)
        abstract = params_of(abstract_model(cfg))
        params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract)
        fresh = jax.eval_shape(lambda: LR.init_adapters(targets, lcfg, seed=0))
        fresh = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), fresh)
        for t in targets:  # B = 0, as init_adapters makes it: the merge changes nothing, bit for bit
            node = fresh
            for k in t.path:
                node = node[k]
            node["b"] = np.zeros_like(node["b"])
        assert_same(jax.device_get(jax.jit(lambda p, a: LR.merge(p, a, targets, lcfg))(params, fresh)), params)
    zero_b = LR.init_adapters(LR.find_targets(abstract_model(model_config(_tiny())), lcfg), lcfg, seed=0)
    assert all(not np.any(np.asarray(v["b"])) for v in zero_b["backbone"].values())
    # llama: q maps embed -> (heads, head_dim), o maps (heads, head_dim) -> embed
    cfg = model_config(_tiny())
    targets = {t.name: t for t in LR.find_targets(abstract_model(cfg), lcfg)}
    rng = np.random.default_rng(0)
    for name, x_axes in [("backbone/q", "d"), ("backbone/o", "hk")]:
        t = targets[name]
        a = rng.normal(size=(*t.shape[: t.lead + t.n_in], 4)).astype(np.float32)
        b = rng.normal(size=(*t.shape[: t.lead], 4, *t.shape[t.lead + t.n_in :])).astype(np.float32)
        w = rng.normal(size=t.shape).astype(np.float32)[0]
        merged = w + np.asarray(LR.delta(t, a, b, lcfg.scale))[0]
        x = rng.normal(size=(3, *t.shape[t.lead : t.lead + t.n_in])).astype(np.float32)
        spec = {"d": ("td,dhk->thk", "td,dr->tr", "tr,rhk->thk"), "hk": ("thk,hkd->td", "thk,hkr->tr", "tr,rd->td")}
        full, down, up = spec[x_axes]
        second_path = np.einsum(full, x, w) + lcfg.scale * np.einsum(up, np.einsum(down, x, a[0]), b[0])
        np.testing.assert_allclose(np.einsum(full, x, merged), second_path, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="match no parameter"):
        LR.find_targets(abstract_model(cfg), LR.LoraConfig(rank=2, targets=("^nothing$",)))


def test_lora_in_activation_space_on_every_backbone():
    """The train step's adapters (LoraWeight: x·W + s·(x·A)·B, never W + AB) against the merged model:
    a zero adapter gives exactly the base model's loss, a trained one the merged model's loss within
    1e-5, and the same gradients. The backbones' products with a LoRA matrix: attention and dense
    projections (llama; the transformer's fused qkv and retnet's value-width products go through
    the same matrix product), the feed-forward's hand-written backward pass (llama), Mixtral's
    grouped expert products, XMoE's batched ones (retnet), and BitNet's merge before quantising."""
    from flax import nnx

    from valle_jax.models import lora as LR
    from valle_jax.training.step import batch_loss, init_params

    lcfg = LR.LoraConfig(rank=2, alpha=4.0)
    rng = np.random.default_rng(0)
    b, t, p, r = 2, 5, 6, 7
    batch = {
        "text": rng.integers(3, 20, (b, t)).astype(np.int32),
        "text_len": np.array([t, 3], np.int32),
        "lang": np.zeros(b, np.int32),
        "prompt": rng.integers(0, 1024, (b, p, 8)).astype(np.int16),
        "prompt_len": np.array([p, 4], np.int32),
        "resp": rng.integers(0, 1024, (b, r, 8)).astype(np.int16),
        "resp_len": np.array([r, 5], np.int32),
        "row_valid": np.ones(b, bool),
    }
    for arch, extra in [("llama", {}), ("mixtral", {"experts": 2}), ("retnet", {"experts": 2}), ("bitnet", {})]:
        cfg = dataclasses.replace(model_config(_tiny()), arch=arch, n_layers=1, **extra)
        abstract = abstract_model(cfg)
        graph, targets = nnx.graphdef(abstract), LR.find_targets(abstract, lcfg)
        params = init_params(cfg, 0)
        zero = LR.init_adapters(targets, lcfg, 1)
        trained = jax.tree.map(lambda x: x + 0.05, zero)  # B != 0
        key = jax.random.key(5)

        def loss(p):
            return batch_loss(graph, p, batch, key, cfg, (), False)[0]

        # gradients where hand-written backward passes meet adapters (the rest is autodiff of the products)
        with_grads = jax.value_and_grad if arch in ("llama", "retnet") else (lambda f: lambda a: (f(a), {}))
        by_activation = jax.jit(with_grads(lambda a: loss(LR.wrap(params, a, targets, lcfg, None))))
        by_weight = jax.jit(with_grads(lambda a: loss(LR.merge(params, a, targets, lcfg))))
        # merge(params, zero) is params bit for bit (test_lora_adapters_on_every_backbone)
        assert by_activation(zero)[0] == by_weight(zero)[0], arch
        (l_act, g_act), (l_merged, g_merged) = by_activation(trained), by_weight(trained)
        np.testing.assert_allclose(l_act, l_merged, rtol=1e-5, err_msg=arch)
        assert abs(float(l_act) - float(by_weight(zero)[0])) > 1e-4, arch  # the adapter does act
        scale = max((float(np.max(np.abs(y))) for y in jax.tree.leaves(g_merged)), default=0.0)
        for x, y in zip(jax.tree.leaves(g_act), jax.tree.leaves(g_merged)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale, err_msg=arch)
    with pytest.raises(ValueError, match="does not contract"):  # a product that is no target's
        w = LR.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), None, 1.0, 0.0)
        w.apply("nf,df->nd", jnp.ones((5, 3)), jnp.float32)


def test_lora_dropout_is_per_token():
    """The adapter's input loses elements independently per token and feature (peft's lora_dropout),
    scaled by 1/(1-p); the same seed drops the same elements."""
    from valle_jax.models import lora as LR

    w = LR.LoraWeight(jnp.ones((8, 3)), jnp.ones((8, 2)), jnp.ones((2, 3)), jnp.uint32(7), 1.0, 0.25)
    x = jnp.ones((64, 8))
    d = np.asarray(w.dropped(x))
    assert set(np.unique(d)) == {0.0, np.float32(1.0 / 0.75)}
    assert 0.15 < np.mean(d == 0) < 0.35
    assert len({tuple(row) for row in (d == 0)}) > 32  # tokens get different masks
    np.testing.assert_array_equal(np.asarray(w.dropped(x)), d)
    assert np.any(np.asarray(dataclasses.replace(w, seed=jnp.uint32(8)).dropped(x)) != d)


def _tiny():
    from configs import tiny

    return tiny.get_config()


@pytest.mark.needs_espeak
def test_lora_training_sharded_export_and_merge(donor, store_path, tmp_path, monkeypatch, capsys):
    from tests.test_training import run_steps
    from valle_jax import adapters
    from valle_jax.export import export_run
    from valle_jax.export import main as export_main
    from valle_jax.sources import with_adapter

    root, cfg, params, symmap = donor
    # the base lacks the two symbols the store uses most and has one language: the run grows both
    # tables, and trains the grown rows beside the adapters
    store = Store(store_path)
    counts = np.bincount(np.concatenate([store.read(i)[1] for i in range(len(store))]), minlength=cfg.n_tokens)
    ids = list(symmap.values())
    unique = [s for s in symmap if ids.count(symmap[s]) == 1]
    dropped = sorted(unique, key=lambda s: -counts[symmap[s]])[:2]
    save_model(tmp_path / "base", cfg, params, {s: i for s, i in symmap.items() if s not in dropped})
    lora = {"train.init_from": str(tmp_path / "base"), "optim.learning_rate": 1e-2, "model.n_langs": 2}
    c8, c1 = test_config(store_path, **lora), test_config(store_path, **lora)
    for c in (c8, c1):
        c.model.lora.rank, c.model.lora.dropout = 4, 0.1
    c8.mesh.shape, c1.mesh.shape = (2, 2, 2), (1, 1, 1)
    t8 = make_trainer(c8, tmp_path / "run8")
    t1 = make_trainer(c1, tmp_path / "run1", devices=jax.devices()[:1])
    s8, l8 = run_steps(t8, 2)
    s1, l1 = run_steps(t1, 2)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)  # sharded on 8 fake devices = one device
    assert_same_close = lambda a, b: [  # noqa: E731
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    assert_same_close(jax.device_get(s8["params"]), jax.device_get(s1["params"]))
    a_q, q = s8["params"]["backbone"]["q"]["a"], s8["base"]["backbone"]["q"]
    assert a_q.sharding.spec[1] == q.sharding.spec[1] == "fsdp"  # the adapter follows its matrix's input axis
    assert s8["params"]["backbone"]["q"]["b"].sharding.spec[2] == q.sharding.spec[2] == "tensor"
    # only the adapters and the grown rows changed; the optimizer state covers only them
    base = t8.start_from.params
    assert_same(jax.device_get(s8["base"]), base)
    assert np.any(np.asarray(s8["params"]["backbone"]["q"]["b"]))
    grown = [t8.symmap[s] for s in dropped]
    assert tuple(sorted(grown)) == next(t.ids for t in t8.lora_targets if t.name == "text_emb")
    assert s8["params"]["lang_emb"]["rows"].shape == (1, cfg.d_model)  # language 1, new to the base
    table = np.asarray(jax.device_get(t8.full_params(s8))["text_emb"])
    old_rows = [i for i in range(cfg.n_tokens) if i not in grown]
    np.testing.assert_array_equal(table[old_rows], base["text_emb"][old_rows])  # the base's rows, bit for bit
    assert np.all(np.abs(table[grown] - base["text_emb"][grown]).max(axis=1) > 0)  # every grown row trained
    n_adapter = sum(np.size(x) for x in jax.tree.leaves(s8["params"]))
    n_opt = sum(np.size(x) for x in jax.tree.leaves(s8["opt_state"]) if np.ndim(x) > 0)
    assert n_opt == 2 * n_adapter  # adam's two moments, of the adapters only
    # checkpoints hold the adapters (and the run.json names the base); export, merge, synthesis loads
    t8.checkpoints.save(2, s8, t8.iterator(None).get_state(), t8._meta(2))
    t8.checkpoints.close(), t1.checkpoints.close()
    saved = json.loads((tmp_path / "run8" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert saved["lora_base"].startswith("model directory")
    out, _ = export_run(tmp_path / "run8", tmp_path / "adapter")
    assert adapters.is_adapter_dir(out)
    merged_dir, _ = export_run(tmp_path / "run8", tmp_path / "merged", merge_lora=True)
    merged = load_weights(merged_dir).params
    expect = jax.device_get(t8.full_params(s8))
    assert_same_close(merged, expect)
    assert_same_close(with_adapter(load_weights(tmp_path / "base"), out).params, expect)  # TTS.load(base, lora=)
    assert_same_close(load_weights(tmp_path / "run8").params, expect)
    # the command: merged, as safetensors, pushed to the hub (huggingface_hub's HfApi replaced: no network)
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(hub.huggingface_hub, "HfApi", FakeApi)
    argv = ["--workdir", str(tmp_path / "run8"), "--out", str(tmp_path / "pushed"), "--merge-lora"]
    assert export_main([*argv, "--format", "safetensors", "--push-to-hub", "me/voice", "--private"]) == 0
    assert calls == [
        ("create", "me/voice", True, True),
        ("upload", "me/voice", ["config.json", "model.safetensors", "symmap.json"]),
    ]
    assert "pushed" in capsys.readouterr().out
    assert export_main([*argv[:4], "--private"]) == 2  # --private alone is a usage error
    # resuming brings the adapters back onto the base
    t = make_trainer(c8, tmp_path / "run8")
    state, _, step = t.restore_or_init()
    assert step == 2
    assert_same_close(jax.device_get(state["params"]), jax.device_get(s8["params"]))
    assert_same(jax.device_get(state["base"]), base)
    t.checkpoints.close()


@pytest.mark.needs_espeak
def test_validation_store_with_unknown_symbols_fails_at_start(store_path, tmp_path):
    """A validation store the run's phoneme map cannot read stops the run before step 0, naming the
    store and its symbols (not at the first evaluation)."""
    val = tmp_path / "val"
    shutil.copytree(store_path, val)
    index = json.loads((val / "index.json").read_text())
    index["symmap"]["ʘ"] = max(index["symmap"].values()) + 1
    (val / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"validation store {val} has symbols .*\['ʘ'\]"):
        make_trainer(test_config(store_path, **{"train.eval_store": str(val)}), tmp_path / "run")


def test_trimming_removes_a_known_silence():
    from valle_jax import voice
    from valle_jax.audio import SAMPLE_RATE

    sr = SAMPLE_RATE
    t = np.arange(sr) / sr
    speech = (0.05 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    wav = np.concatenate([np.zeros(sr // 2, np.float32), speech, np.zeros(int(0.7 * sr), np.float32)])
    cut = voice.trim(wav)
    assert abs(len(cut) - (sr + 2 * voice.PAD * sr)) <= 0.02 * sr  # 1 s of tone and the two pads
    np.testing.assert_array_equal(cut[int(voice.PAD * sr) : int(voice.PAD * sr) + 100], speech[:100])
    loud = voice.normalise(cut)
    assert abs(20 * np.log10(np.sqrt(np.mean(loud.astype(np.float64) ** 2))) - voice.TARGET_DBFS) < 0.1


@pytest.mark.needs_espeak
def test_a_voice_file_gives_the_codes_of_its_wav(codec, corpus, tmp_path):
    from valle_jax import voice
    from valle_jax.config import ModelConfig
    from valle_jax.tts import TTS

    wav = sorted(corpus.rglob("*.wav"))[0]
    voice.make([wav], tmp_path / "v.npz", codec)  # what `python -m valle_jax.voice make` runs
    assert voice.main(["make", str(wav), "--out", str(tmp_path / "v.wav")]) == 2  # a voice file is an .npz
    tts = TTS.__new__(TTS)  # prompt() needs the config and the codec only
    tts.cfg, tts._codec, tts.trim = ModelConfig(), codec, True
    from_wav, from_file = tts.prompt(str(wav), 0), tts.prompt(str(tmp_path / "v.npz"), 0)
    np.testing.assert_array_equal(from_file.codes, from_wav.codes)
    assert from_file.sources == (str(wav),)
    tts.trim = False
    raw = tts.prompt(str(wav), 0)
    assert len(raw.codes) > len(from_wav.codes)  # espeak's leading and trailing silence were cut
    with pytest.raises(AudioError, match="not a voice file"):
        np.savez(tmp_path / "x.npz", a=np.zeros(3))
        tts.prompt(str(tmp_path / "x.npz"), 0)
