"""Training pieces in one process on 8 fake CPU devices: sharding rules, sharded == single-device
steps, optimizers and schedules, frozen parameters, the non-finite guard, blocked attention,
console commands, reference export."""

import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, tiny
from tests.conftest import GOLDEN_DIR
from valle_jax import appending, runs, sources
from valle_jax.atomic import OBJECT_STORE_ROOTS, io_error, io_error_line
from valle_jax.checkpointing import load_model, params_of, save_model
from valle_jax.config import ConfigError, MeshConfig, OptimConfig, mesh_config, model_config
from valle_jax.export import main as export_main
from valle_jax.models import init_model
from valle_jax.models import layers as L
from valle_jax.models.attention import _flash, _forward, flash_attend
from valle_jax.models.convert import from_reference, infer_config, normalise_keys, to_reference
from valle_jax.models.dense_attention import dense_attend
from valle_jax.models.feed_forward import feed_forward
from valle_jax.plot import read_metrics
from valle_jax.train import log_file
from valle_jax.training import control
from valle_jax.training import lock as lock_module
from valle_jax.training import loop as loop_module
from valle_jax.training.checkpoint import Checkpoints, CheckpointWriteError
from valle_jax.training.compiled import CompiledSteps
from valle_jax.training.control import Command, CommandReader, parse
from valle_jax.training.lock import LOCK_FILE, WorkdirBusy, WorkdirLock
from valle_jax.training.loop import Trainer
from valle_jax.training.optim import make_optimizer, make_schedule
from valle_jax.training.sharding import make_mesh, param_shardings, resolve_shape, spec_for
from valle_jax.training.step import abstract_model

# a small fixed-shape training setup over the test store: one text and one response bucket
TEST_OVERRIDES = {
    "data.batch_size": 8,
    "data.text_buckets": (64,),
    "data.resp_buckets": (320,),
    "data.prompt_duration": 1.0,
    "data.duration_range": (0.5, 4.2),
    "data.sample_type": "path",
    "train.eval_every": 0,
    "train.peak_flops": 1e12,
}


def test_config(store_path, **more):
    c = tiny.get_config()
    for key, value in {**TEST_OVERRIDES, "data.store": str(store_path), **more}.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


test_config.__test__ = False  # a helper, not a test


def make_trainer(cfg, workdir, devices=None):
    return Trainer(cfg, workdir, commands="off", devices=devices)


def run_steps(trainer, n):
    state, data_state, _ = trainer.restore_or_init()
    it = trainer.iterator(data_state)
    losses = []
    for _ in range(n):
        batch = trainer.layout.global_batch(next(it))
        state, m = trainer.train_step(state, batch, np.float32(1.0))
        losses.append(float(m["loss"]))
    return state, losses


def test_mesh_shape_and_rules():
    assert resolve_shape((-1, 2, 1), 8) == (4, 2, 1)
    with pytest.raises(ConfigError, match="needs 12 devices"):
        resolve_shape((3, 2, 2), 8)
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        MeshConfig(rules=(("embed", "fsdq"),))
    mcfg = mesh_config(base.get_config()).__class__(shape=(2, 2, 2), rules=mesh_config(base.get_config()).rules)
    mesh = make_mesh(mcfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    cfg = model_config(tiny.get_config())
    sh = param_shardings(abstract_model(cfg), mesh, mcfg)
    P = jax.sharding.PartitionSpec
    assert sh["backbone"]["q"].spec == P(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
    assert sh["backbone"]["down"].spec == P(None, "tensor", "fsdp")  # layers, mlp, embed
    assert sh["text_emb"].spec == P("tensor", "fsdp")  # vocab 1024, embed
    assert sh["classifier"].spec == P("fsdp", None)  # 1025 classes: not divisible, replicated
    assert sh["lang_emb"].spec == P(None, "fsdp")
    # a mesh axis is used once per array even if two logical axes map to it
    assert spec_for((4, 4), ("embed", "mlp"), {"embed": ("fsdp",), "mlp": ("fsdp",)}, mesh) == P("fsdp", None)


@pytest.mark.needs_espeak
def test_sharded_step_equals_single_device_step(store_path, tmp_path):
    cfg8 = test_config(store_path)
    cfg8.mesh.shape = (2, 2, 2)
    cfg1 = test_config(store_path)
    cfg1.mesh.shape = (1, 1, 1)
    t8 = make_trainer(cfg8, tmp_path / "eight")
    t1 = make_trainer(cfg1, tmp_path / "one", devices=jax.devices()[:1])
    s8, l8 = run_steps(t8, 3)
    s1, l1 = run_steps(t1, 3)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert l8[2] != l8[0]
    q = s8["params"]["backbone"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 24, 2, 12)
    mu = jax.tree.leaves(s8["opt_state"], is_leaf=lambda x: hasattr(x, "sharding"))
    assert any(getattr(x, "sharding", None) == q.sharding and x.shape == q.shape for x in mu), (
        "the optimizer's moments of q are sharded like q"
    )
    for a, b in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    t8.checkpoints.close(), t1.checkpoints.close()


@pytest.mark.needs_espeak
def test_frozen_parameters_and_nonfinite_guard(store_path, tmp_path):
    cfg = test_config(store_path, **{"optim.frozen": (r"^text_emb$", r"backbone/q$")})
    t = make_trainer(cfg, tmp_path / "run")
    state, _, _ = t.restore_or_init()
    before = jax.device_get(state["params"])
    it = t.iterator(None)
    batch = t.layout.global_batch(next(it))
    state, m = t.train_step(state, batch, np.float32(1.0))
    after = jax.device_get(state["params"])
    np.testing.assert_array_equal(after["text_emb"], before["text_emb"])
    np.testing.assert_array_equal(after["backbone"]["q"], before["backbone"]["q"])
    assert not np.array_equal(after["backbone"]["k"], before["backbone"]["k"])
    assert bool(m["finite"])
    # a NaN in the parameters makes the loss NaN: the update is not applied and `finite` says so
    poisoned = dict(state["params"], sep=state["params"]["sep"] * jnp.nan)
    state2 = {**state, "params": poisoned}
    kept = jax.device_get(poisoned["backbone"]["k"])
    state3, m = t.train_step(state2, t.layout.global_batch(next(it)), np.float32(1.0))
    assert not bool(m["finite"])
    np.testing.assert_array_equal(jax.device_get(state3["params"]["backbone"]["k"]), kept)
    assert int(state3["step"]) == 2
    with pytest.raises(ConfigError, match="match no parameter"):
        make_trainer(test_config(store_path, **{"optim.frozen": ("no_such_param",)}), tmp_path / "bad")
    t.checkpoints.close()


@pytest.mark.needs_espeak
def test_embedding_injection_replaces_and_freezes_the_tables(store_path, tmp_path):
    cfg = model_config(test_config(store_path))
    donor = jax.device_get(params_of(init_model(cfg, seed=7)))
    save_model(tmp_path / "donor", cfg, donor, {"a": 1})
    t = make_trainer(test_config(store_path, **{"optim.embeddings": str(tmp_path / "donor")}), tmp_path / "run")
    assert sorted(t.injected) == ["lang_emb", "prom_emb", "resp_emb_ar", "resp_emb_nar", "text_emb"]
    state, _ = run_steps(t, 2)
    got = jax.device_get(state["params"])
    for k in t.injected:
        np.testing.assert_array_equal(got[k], donor[k], err_msg=k)  # injected, then never updated
    assert not np.array_equal(got["sep"], donor["sep"]) and not np.array_equal(got["classifier"], donor["classifier"])
    t.checkpoints.close()
    bad = model_config(test_config(store_path, **{"model.size": "", "model.d_model": 64}))
    save_model(tmp_path / "wide", bad, jax.device_get(params_of(init_model(bad, seed=1))), {"a": 1})
    with pytest.raises(ConfigError, match="do not fit"):
        make_trainer(test_config(store_path, **{"optim.embeddings": str(tmp_path / "wide")}), tmp_path / "run2")


@pytest.mark.needs_espeak
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips(store_path, tmp_path, caplog, mode):
    """A learning rate of 1e30 blows the parameters up after one step; the loss then is not finite."""
    cfg = test_config(
        store_path,
        **{
            "optim.learning_rate": 1e30,
            "optim.clip_norm": 0.0,
            "train.steps": 4,
            "train.save_every": 1,
            "train.log_every": 1,
            "train.nonfinite": mode,
        },
    )
    t = make_trainer(cfg, tmp_path / mode)
    with caplog.at_level("INFO"):
        rc = t.run()
    if mode == "stop":
        assert rc == 3
        assert "non-finite loss" in caplog.text and "last good checkpoint" in caplog.text
        assert t.checkpoints.all_steps() and max(t.checkpoints.all_steps()) < 4
    else:
        assert rc == 0 and "update skipped" in caplog.text and "finished 4 steps" in caplog.text


def test_schedules_and_optimizers():
    cos = make_schedule(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, end_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.55, abs=1e-6) and float(cos(110)) == pytest.approx(0.1)
    lin = make_schedule(OptimConfig(learning_rate=2.0, schedule="linear", warmup_steps=4, decay_steps=10), 100)
    assert float(lin(2)) == pytest.approx(1.0) and float(lin(9)) == pytest.approx(1.0) and float(lin(14)) == 0.0
    assert float(make_schedule(OptimConfig(learning_rate=3.0), 10)(7)) == 3.0
    params = {"w": jnp.ones((3,)), "b": jnp.ones((2,))}
    grads = {"w": jnp.full((3,), 0.5), "b": jnp.full((2,), 0.5)}
    for name in ("adamw", "prodigy", "sgd"):
        tx, _, _ = make_optimizer(OptimConfig(name=name, learning_rate=0.1 if name != "prodigy" else 1.0), params, 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates)), name
    # accumulation: no update until the k-th batch, then one
    tx, _, _ = make_optimizer(OptimConfig(name="sgd", learning_rate=1.0, grad_accum=2, clip_norm=0), params, 10)
    st = tx.init(params)
    u1, st = tx.update(grads, st, params)
    u2, st = tx.update(grads, st, params)
    assert float(jnp.abs(u1["w"]).max()) == 0.0 and float(u2["w"][0]) == pytest.approx(-0.5)
    # clipping by global norm
    tx, _, _ = make_optimizer(OptimConfig(name="sgd", learning_rate=1.0, clip_norm=0.1), params, 10)
    u, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(u)))) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_blocked_attention_matches_dense_and_its_own_autodiff(rate):
    b, s, h, g, d = 2, 37, 4, 2, 8
    k = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(k[0], (b, s, h, d))
    kk, v = jax.random.normal(k[1], (b, s, g, d)), jax.random.normal(k[2], (b, s, g, d))
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    valid = pos < jnp.array([[s], [25]])
    causal = jnp.array([True, False])
    w = jax.random.normal(k[3], (b, s, h, d))
    if rate == 0.0:  # exactly the dense attention, values and gradients
        dense = lambda q, kk, v: L.attend(q, kk, v, L.attention_mask(pos, pos, valid, causal))  # noqa: E731
        blocked = lambda q, kk, v: flash_attend(q, kk, v, pos, pos, valid, causal, block=8)  # noqa: E731
        np.testing.assert_allclose(blocked(q, kk, v), dense(q, kk, v), atol=1e-5)
        gd = jax.grad(lambda *a: (dense(*a) * w).sum(), argnums=(0, 1, 2))(q, kk, v)
        gb = jax.grad(lambda *a: (blocked(*a) * w).sum(), argnums=(0, 1, 2))(q, kk, v)
        for x, y in zip(gb, gd):
            np.testing.assert_allclose(x, y, atol=1e-4)
    # the custom backward equals autodiff through the forward scan (dropout mask regenerated alike)
    qg = q.reshape(b, s, g, h // g, d).transpose(0, 2, 3, 1, 4)
    kt, vv = kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    wg = w.reshape(b, s, g, h // g, d).transpose(0, 2, 3, 1, 4)
    seed = jnp.uint32(12345)

    custom = jax.grad(lambda *a: (_flash(*a, pos, pos, valid, causal, seed, rate, 8) * wg).sum(), argnums=(0, 1, 2))
    auto = jax.grad(lambda *a: (_forward(*a, pos, pos, valid, causal, seed, rate, 8)[0] * wg).sum(), argnums=(0, 1, 2))
    for x, y in zip(custom(qg, kt, vv), auto(qg, kt, vv)):
        np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_dense_attention_backward_equals_autodiff(rate):
    """dense_attend (own backward pass) against autodiff of layers.attend: grouped-query, causal and
    bidirectional rows, padding, a fully masked query row, dropout."""

    b, s, h, g, d = 2, 37, 4, 2, 8
    k = jax.random.split(jax.random.key(2), 5)
    q = jax.random.normal(k[0], (b, s, h, d))
    kk, v = jax.random.normal(k[1], (b, s, g, d)), jax.random.normal(k[2], (b, s, g, d))
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = L.attention_mask(pos, pos, pos < jnp.array([[s], [25]]), jnp.array([True, False]))
    mask = mask.at[1, 0, 5].set(False)  # query 5 of row 1: no key at all (uniform probabilities)
    w = jax.random.normal(k[3], (b, s, h, d))
    key = k[4] if rate else None
    plain = lambda *a: L.attend(*a, mask, rate, key)  # noqa: E731
    ours = lambda *a: dense_attend(*a, mask, rate, key)  # noqa: E731
    np.testing.assert_allclose(ours(q, kk, v), plain(q, kk, v), atol=1e-6)
    got = jax.grad(lambda *a: (ours(*a) * w).sum(), argnums=(0, 1, 2))(q, kk, v)
    want = jax.grad(lambda *a: (plain(*a) * w).sum(), argnums=(0, 1, 2))(q, kk, v)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("gated,rate,dtype", [(True, 0.0, "float32"), (False, 0.3, "float32"), (True, 0.0, "bfloat16")])
def test_feed_forward_backward_equals_autodiff(gated, rate, dtype):
    """feed_forward's own backward pass gives autodiff's gradients of the plain expression, for the
    gated (llama, retnet) and the biased, dropped-out (transformer) block."""

    k = jax.random.split(jax.random.key(3), 7)
    h, g_out = jax.random.normal(k[0], (2, 9, 6)), jax.random.normal(k[1], (2, 9, 5))
    w_a, w_out = jax.random.normal(k[2], (6, 16)), jax.random.normal(k[3], (16, 5))
    w_b = jax.random.normal(k[4], (6, 16)) if gated else None
    bias = None if gated else jax.random.normal(k[5], (16,))
    dt = jnp.dtype(dtype)
    drop_key = k[6] if rate else None
    mm = lambda x, w: jnp.einsum("bsd,df->bsf", x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)  # noqa: E731

    def plain(h, w_a, bias, w_b, w_out):
        f = jax.nn.gelu(mm(h, w_a) + (0.0 if bias is None else bias[None, None, :]), approximate=False)
        f = L.dropout(f if w_b is None else f * mm(h, w_b), rate, drop_key)
        return mm(f, w_out)

    ours = lambda *x: feed_forward(*x, dt, rate, drop_key)  # noqa: E731
    args = (h, w_a, bias, w_b, w_out)
    np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-6, atol=1e-6)
    tol = 1e-5 if dtype == "float32" else 2e-2
    got = jax.grad(lambda *x: (ours(*x) * g_out).sum(), argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(lambda *x: (plain(*x) * g_out).sum(), argnums=(0, 1, 2, 3, 4))(*args)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * float(jnp.abs(y).max()))


def test_feed_forward_backward_keeps_only_its_inputs():
    """Compiled gradient of six gated feed-forward layers: XLA's buffers hold h, a and b per
    layer, not gelu's intermediates and the product (in [S, F] buffers per layer: autodiff of the
    plain expression ~6.6, ours ~2.6, ours without the backward's dependence on its gradient ~4.3).
    A property of XLA's CPU pipeline: on an H100 autodiff's fusions keep less (ratio 0.74 there)."""
    if jax.default_backend() != "cpu":
        pytest.skip("measures XLA's CPU buffer assignment; GPU compilers fuse the plain expression themselves")

    n, s, d, f = 6, 1024, 64, 512

    def stack(ffn):
        def loss(ws, x):
            for wg, wu, wd in ws:
                x = x + ffn(x, wg, wu, wd)
            return (x * x).sum()

        return loss

    plain = stack(lambda x, wg, wu, wd: (jax.nn.gelu(x @ wg, approximate=False) * (x @ wu)) @ wd)
    ours = stack(lambda x, wg, wu, wd: feed_forward(x, wg, None, wu, wd, jnp.float32))
    spec = jax.ShapeDtypeStruct
    ws = [(spec((d, f), jnp.float32), spec((d, f), jnp.float32), spec((f, d), jnp.float32))] * n
    x = spec((1, s, d), jnp.float32)
    temp = {
        name: jax.jit(jax.grad(fn)).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
        for name, fn in (("plain", plain), ("ours", ours))
    }
    assert temp["ours"] < 0.6 * temp["plain"], temp


def test_console_commands():
    assert parse("lr 1e-4") == Command("lr", 1e-4)
    assert parse("  SAVE ") == Command("save")
    assert parse("lr") is None and parse("lr -1") is None and parse("dance") is None and parse("") is None
    stream = io.StringIO("save\nbogus\nlr 0.5\nquit\n")
    assert not CommandReader(stream).enabled  # not a terminal: never read
    reader = CommandReader(stream, enabled=True)

    deadline = time.time() + 5
    got = []
    while len(got) < 3 and time.time() < deadline:
        got += reader.poll()
        time.sleep(0.01)
    assert got == [Command("save"), Command("lr", 0.5), Command("quit")]
    closed = io.StringIO("")
    closed.close()
    assert not CommandReader(closed).enabled  # a closed stdin is not an error


@pytest.mark.skipif(not (GOLDEN_DIR / "llama_weights.npz").exists(), reason=f"golden files not found in {GOLDEN_DIR}")
@pytest.mark.parametrize("arch", ["transformer", "llama", "retnet"])
def test_reference_export_round_trip(arch):
    state = normalise_keys(dict(np.load(GOLDEN_DIR / f"{arch}_weights.npz")))
    cfg = infer_config(state, heads=4)
    back = to_reference(from_reference(state, cfg), cfg)
    assert set(back) == set(state) - {"tasks_emb.weight", "model.embed_tokens.weight"}
    for k, v in back.items():
        if k.startswith("model.retnet_rel_pos."):  # buffers: recomputed from the config, not stored
            np.testing.assert_allclose(v, state[k], rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_environment_has_eight_devices():
    assert jax.device_count() == 8, os.environ.get("XLA_FLAGS")


# compiled train steps of this module's runs, for tests that train the same config again: what they
# test is the run's storage and state, not compilation, which is most of a tiny run's time
COMPILED: dict[str, CompiledSteps] = {}


@pytest.fixture(scope="module")
def two_checkpoints(store_path, tmp_path_factory):
    """A run directory with complete checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("two_checkpoints") / "run"
    cfg = test_config(store_path, **{"train.steps": 2, "train.save_every": 1, "train.log_every": 1})
    trainer = make_trainer(cfg, workdir)
    assert trainer.run() == 0
    COMPILED["two_checkpoints"] = trainer.compiled
    return workdir, cfg


def _corrupt(step_dir, how: str) -> None:
    """Breaks the largest parameter file of a complete checkpoint step."""
    files = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim = files[-1]
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif how == "emptied":
        victim.write_bytes(b"")
    else:
        victim.unlink()


def _poison(workdir, cfg) -> None:
    """Adds a complete step 3 that loads but holds a NaN parameter."""
    c = Checkpoints(workdir / "checkpoints", async_save=False)
    try:
        params, meta, _ = c.restore_params(2)
        params = jax.tree.map(np.asarray, params)
        params["sep"] = params["sep"] * np.nan
        t = make_trainer(cfg, workdir)
        state, data_state, _ = t.restore_or_init()
        t.checkpoints.close()
        c.save(3, {**jax.device_get(state), "params": params}, data_state, {**meta, "step": 3})
    finally:
        c.close()


@pytest.mark.needs_espeak
@pytest.mark.parametrize("how", ["truncated", "emptied", "missing", "nonfinite"])
def test_restore_walks_back_past_a_bad_checkpoint(two_checkpoints, tmp_path, caplog, how):
    src, cfg = two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    if how == "nonfinite":
        _poison(workdir, cfg)
        bad, good = 3, 2
    else:
        _corrupt(workdir / "checkpoints" / "2", how)
        bad, good = 2, 1
    with caplog.at_level("WARNING"):
        run = runs.load_params(workdir)  # what export and synthesis read
    assert run.step == good
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and f"checkpoint {bad} " in warnings[0] and "\n" not in warnings[0]
    assert (workdir / "checkpoints" / str(bad)).is_dir()  # left in place
    caplog.clear()
    t = make_trainer(cfg, workdir)
    with caplog.at_level("INFO"):
        _, _, step = t.restore_or_init()
    assert step == good and f"resumed from step {good}" in caplog.text
    assert caplog.text.count(f"checkpoint {bad} in") == 1
    t.checkpoints.close()
    # a run that saves the bad step again moves the bad directory aside first
    cfg2 = test_config(store_path=cfg.data.store, **{"train.steps": bad, "train.save_every": 1, "train.log_every": 1})
    assert make_trainer(cfg2, workdir).run() == 0
    assert (workdir / "checkpoints" / f"{bad}.unreadable").is_dir()
    assert runs.load_params(workdir).step == bad


@pytest.mark.needs_espeak
def test_object_store_workdir_resumes_like_a_local_run(two_checkpoints, tmp_path, monkeypatch, caplog):
    """The object-store code path (no appends, renames or hard links: valle_jax.atomic.object_store;
    docs/cloud.md), forced on a local directory, with training's own lock and log.txt handler: a run
    that ends at step 1 and is resumed to step 2 writes the metrics, run.json and checkpoints of the
    uninterrupted local run, and reads back as one (load_weights, export into the store, plot)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref_dir, cfg = two_checkpoints
    monkeypatch.setenv(OBJECT_STORE_ROOTS, str(tmp_path))
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.0)
    # both starts take the local run's compiled step (its config but train.steps, which the constant
    # schedule does not read): three quarters off the test's time
    monkeypatch.setattr(loop_module, "CompiledSteps", lambda jitted: COMPILED["two_checkpoints"])
    workdir = tmp_path / "run"
    train_log = logging.getLogger("valle_jax.train")
    for steps in (1, 2):
        c = test_config(cfg.data.store, **{"train.steps": steps, "train.save_every": 1, "train.log_every": 1})
        with WorkdirLock(workdir), caplog.at_level("INFO", logger="valle_jax.train"):
            handler = log_file(workdir)
            train_log.addHandler(handler)
            try:
                assert make_trainer(c, workdir).run() == 0
            finally:
                train_log.removeHandler(handler)
                handler.close()
    names = {p.name for p in workdir.iterdir()}
    assert not names & {"metrics.jsonl", "log.txt", "lock"}, names
    assert {"metrics.jsonl.part-00000", "metrics.jsonl.part-00001", "log.txt.part-00001"} <= names
    got, ref = read_metrics(workdir)["train/loss"], read_metrics(ref_dir)["train/loss"]
    assert sorted(got) == sorted(ref) == [1, 2]
    np.testing.assert_allclose([got[1], got[2]], [ref[1], ref[2]], rtol=1e-6)
    assert json.loads((workdir / "run.json").read_text()) == json.loads((ref_dir / "run.json").read_text())
    log = appending.read_text(workdir / "log.txt")
    assert "started a new run" in log and "resumed from step 1" in log and "finished 2 steps" in log
    ea = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2]
    run = sources.load_weights(workdir)  # what synthesis, init_from and export read
    assert run.step == 2
    base = runs.load_params(ref_dir)
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(run.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert export_main(["--workdir", str(workdir), "--out", str(tmp_path / "model")]) == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # staged elsewhere, uploaded in place
    model, _, _ = load_model(tmp_path / "model")
    np.testing.assert_array_equal(np.asarray(params_of(model)["sep"]), np.asarray(base.params["sep"]))


def test_workdir_lock(tmp_path, caplog):
    held = WorkdirLock(tmp_path).acquire()
    with pytest.raises(WorkdirBusy, match=rf"in use by PID {os.getpid()} on this host"):
        WorkdirLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # a lock left by a process that is gone (SIGKILL) is taken over, with a warning
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "1"}))
    with caplog.at_level("WARNING"), WorkdirLock(tmp_path) as lock:
        assert lock.held and f"from PID {gone.pid}, which is gone" in caplog.text
    # on another host nothing can be checked: refused
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 123, "host": "elsewhere"}))
    with pytest.raises(WorkdirBusy, match="PID 123 on host elsewhere"):
        WorkdirLock(tmp_path).acquire()


def test_stop_request_phases(caplog, monkeypatch):
    """What SIGINT/SIGTERM do at each phase of a stop, without a run (the handler called directly;
    os._exit replaced, since these phases end the process)."""
    exits = []
    monkeypatch.setattr(control.os, "_exit", lambda code: exits.append(code))
    stop = control.StopRequest()
    with caplog.at_level("WARNING"):
        stop._handle(signal.SIGTERM, None)  # the first request: finish the step, save, exit
        assert stop and "finishing this step, saving, then exiting" in caplog.text
        stop._handle(signal.SIGTERM, None)  # SIGTERM never aborts
        assert "already finishing this step" in caplog.text
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the step finishes: abort without saving
            stop._handle(signal.SIGINT, None)
        assert "aborting now without saving" in caplog.text
        caplog.clear()
        with stop.writing(6):  # Ctrl-C while a checkpoint is written: never breaks the write
            stop._handle(signal.SIGINT, None)
            assert "checkpoint 6 is being written; exiting as soon as it is complete" in caplog.text and not exits
            stop._handle(signal.SIGINT, None)  # once more: abandons it, the process ends (130)
            assert exits == [130] and "abandoning checkpoint 6 half-written" in caplog.text
        assert stop.phase == "running"
        stop.saved(6)
        stop._handle(signal.SIGINT, None)
        assert "checkpoint 6 is complete; the run is exiting" in caplog.text and exits == [130]
    stop.exiting(4)  # the command closed everything: any signal ends the process with the run's status
    try:
        stop._handle(signal.SIGINT, None)
        assert exits == [130, 4]
    finally:
        stop.uninstall()
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_write_errors_are_one_line():
    """The errno and file of a failed write, from a Python OSError or from tensorstore's text (what
    orbax raises from a full disk: this one came from a real save under a file-size limit)."""
    enospc = OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")
    assert io_error_line(enospc) == "/w/metrics.jsonl: No space left on device (ENOSPC)"
    ts = ValueError(
        'OUT_OF_RANGE: Error writing "w/0.0" in OCDBT database at local file "/w/checkpoints/4.orbax-checkpoint-tmp'
        '/params.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/4.orbax-checkpoint-tmp/'
        'params.orbax-checkpoint-tmp/ocdbt.process_0/d/1f0e": Failed to write 3597029 bytes to file 4: File too '
        "large [os_error_code='27']"
    )
    e = CheckpointWriteError(4, Path("/w/checkpoints"), ts, *io_error(ts))
    assert str(e).startswith("cannot write checkpoint 4 in /w/checkpoints: File too large (EFBIG) (writing /w/")
    assert io_error(RuntimeError("no errno here")) == (None, None)


@pytest.mark.needs_espeak
@pytest.mark.parametrize("when", ["step", "save", "disk full"])
def test_second_ctrl_c_and_full_disk(store_path, tmp_path, caplog, when):
    """A run of 6 steps saving every 2, in this process, with real signals sent from inside it: the
    first SIGINT at step 3, the second while the step finishes ("step": aborts, checkpoint 2 kept), or
    while checkpoint 3 is handed to orbax and a third once it is complete ("save": the save completes,
    exit 0). "disk full": no signal; metrics.jsonl's write at step 3 raises ENOSPC (a monkeypatched
    file object: what a full disk makes `write` do), the run stops with status 4 in one line and
    checkpoint 2 restores."""
    cfg = test_config(store_path, **{"train.steps": 6, "train.save_every": 2, "train.log_every": 1})
    t = make_trainer(cfg, tmp_path / "run")
    ctrl_c = lambda: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731 - the handler runs at once, in this thread
    step = t.train_one_step

    def train_one_step(p):
        step(p)
        if p.step == 3 and when != "disk full":
            ctrl_c()
            if when == "step":
                ctrl_c()

    t.train_one_step = train_one_step
    if when == "save":
        orbax_save = t.checkpoints.manager.save
        t.checkpoints.manager.save = lambda s, **kw: (ctrl_c() if s == 3 else None, orbax_save(s, **kw))[1]
        close = t.writer.close
        t.writer.close = lambda: (ctrl_c(), close())
    if when == "disk full":
        jsonl = t.writer.jsonl

        class Full:
            def write(self, text):
                if '"step": 3' in text:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), jsonl.name)
                return jsonl.write(text)

            def __getattr__(self, name):
                return getattr(jsonl, name)

        t.writer.jsonl = Full()
    with caplog.at_level("INFO"):
        if when == "step":
            with pytest.raises(KeyboardInterrupt):
                t.run()
        else:
            rc = t.run()
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints", async_save=False)
    try:
        _, _, restored = ckpts.restore_params()
    finally:
        ckpts.close()
    assert signal.getsignal(signal.SIGINT) != t.stop._handle  # uninstalled after run()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    if when == "step":
        assert "aborting now without saving" in caplog.text and restored == 2
    elif when == "save":
        assert rc == 0 and "checkpoint 3 is being written; exiting as soon as it is complete" in caplog.text
        assert "stopped at step 3 (checkpoint saved)" in caplog.text and restored == 3
        assert "checkpoint 3 is complete; the run is exiting" in caplog.text
    else:
        assert rc == 4 and restored == 2 and len(errors) == 1, errors
        assert (
            "metrics.jsonl: No space left on device (ENOSPC); the run stops here and checkpoint 2 is kept"
            in (errors[0])
        )
