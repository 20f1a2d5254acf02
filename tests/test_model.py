"""The model: golden parity, converter, causality, padding invariance, traced levels, KV cache, sizes."""

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN_DIR, assert_parity
from flax import nnx

from tools import parity
from valle_jax.checkpointing import load_model, model_with_params, params_of, save_model
from valle_jax.config import SIZES, ModelConfig
from valle_jax.data.batch import pad_batch
from valle_jax.models import init_model, jit_forward, jit_method, loss_and_metrics, targets
from valle_jax.models.convert import ConversionError, from_reference, infer_config
from valle_jax.models.valle import abstract_model

ROOT = Path(__file__).resolve().parents[1]
needs_golden = pytest.mark.skipif(
    not (GOLDEN_DIR / "inputs.npz").exists(), reason=f"golden files not found at {GOLDEN_DIR} (set VALLE_JAX_GOLDEN)"
)
ARCHS = ["transformer", "llama", "retnet"]
GOLDEN_ARCHS = ARCHS + ["mixtral"]  # mixtral: HF Mixtral, 4 experts (tests/test_moe.py has the rest)


def tiny(arch="llama", **kw):
    return ModelConfig(arch=arch, d_model=32, n_heads=4, n_layers=2, n_tokens=64, **kw)


def random_batch(rng, lengths, q=8, n_tokens=64):
    texts = [rng.integers(1, n_tokens, t) for t, _, _ in lengths]
    prompts = [rng.integers(0, n_tokens, (p, q)) for _, p, _ in lengths]
    resps = [rng.integers(0, n_tokens, (r, q)) for _, _, r in lengths]
    return pad_batch(texts, [0] * len(lengths), prompts, resps)


@needs_golden
@pytest.mark.parametrize("arch", GOLDEN_ARCHS)
def test_golden_parity(arch):
    results = parity.check(GOLDEN_DIR, arch)
    assert_parity(results, ["ar_l0", "nar_l1", "nar_l7"])


@needs_golden
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_cli_reads_the_batch2_format(arch, tmp_path):
    """A two-sample, mixed-level, padded case in the withheld files' exact format, built from the
    shipped outputs: causality makes a NAR sample on the first 60 response frames produce the first
    rows of the full nar_l1 logits."""
    for f in (f"{arch}_weights.npz", f"{arch}_config.json"):
        shutil.copy(GOLDEN_DIR / f, tmp_path / f)
    inp, out = np.load(GOLDEN_DIR / "inputs.npz"), np.load(GOLDEN_DIR / f"{arch}_outputs.npz")
    n1 = 20 + 75 + 60 + 4
    np.savez(
        tmp_path / "inputs_batch2.npz",
        text_b0=inp["text"],
        text_b1=inp["text"],
        lang=inp["lang"],
        prompt_b0=inp["prompt"],
        prompt_b1=inp["prompt"],
        response_b0=inp["response"],
        response_b1=inp["response"][:60],
        quant_levels=np.array([0, 1]),
    )
    logits = [out["logits_ar_l0"], out["logits_nar_l1"][:n1]]
    tgt = np.concatenate([out["loss_target_ar_l0"], out["loss_target_nar_l1"][:n1]])
    rows = np.concatenate([logits[0][:-1], logits[1]]).astype(np.float64)
    keep = tgt != -100
    logp = rows - np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1, keepdims=True)) - rows.max(1, keepdims=True)
    loss = -logp[keep, tgt[keep]].mean()
    acc = np.mean([(rows[i] > rows[i, tgt[i]]).sum() < 10 for i in np.flatnonzero(keep)])
    np.savez(
        tmp_path / f"{arch}_outputs_batch2.npz",
        quant_levels=np.array([0, 1]),
        logits_b0=logits[0],
        logits_b1=logits[1],
        loss=np.float32(loss),
        acc_top10=np.float32(acc),
        loss_target=tgt,
    )
    run = subprocess.run(
        [sys.executable, "-m", "tools.parity", str(tmp_path), "--arch", arch], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "batch2" in run.stdout and "1/1 cases within" in run.stdout
    # a wrong reference makes it fail
    np.savez(
        tmp_path / f"{arch}_outputs_batch2.npz",
        quant_levels=np.array([0, 1]),
        logits_b0=logits[0] + 1e-3,
        logits_b1=logits[1],
        loss=np.float32(loss),
        acc_top10=np.float32(acc),
        loss_target=tgt,
    )
    bad = subprocess.run(
        [sys.executable, "-m", "tools.parity", str(tmp_path), "--arch", arch], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "FAILED: ['batch2']" in bad.stdout


@needs_golden
def test_pth_conversion_round_trip(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.convert_reference",
            str(GOLDEN_DIR / "transformer_state_dict.pth"),
            "--out",
            str(tmp_path / "m"),
            "--heads",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    model, cfg, symmap = load_model(tmp_path / "m")
    assert cfg.arch == "transformer" and cfg.n_heads == 4 and len(symmap) == 229
    golden_model, _ = parity.load_golden_model(GOLDEN_DIR, "transformer")
    b = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(0), [(12, 30, 40)], n_tokens=1024).items()}
    lv = jnp.array([3])
    assert np.array_equal(np.asarray(jit_forward(model)(b, lv)[0]), np.asarray(jit_forward(golden_model)(b, lv)[0]))


def test_converter_lists_every_bad_key():
    cfg = tiny("transformer")
    from valle_jax.models.convert import reference_layout

    state = {k: np.zeros(s, np.float32) for k, s in reference_layout(cfg).items()}
    assert infer_config(state, heads=4) == cfg
    model_with_params(cfg, from_reference(state, cfg))
    broken = dict(state)
    del broken["blocks.1.attn.norm.bias"]
    broken["blocks.0.ffn.block.0.bias"] = np.zeros(7, np.float32)
    broken["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError) as e:
        from_reference(broken, cfg)
    msg = str(e.value)
    assert "1 missing: ['blocks.1.attn.norm.bias']" in msg and "1 unexpected: ['extra.weight']" in msg
    assert "blocks.0.ffn.block.0.bias: (7,), expected (128,)" in msg
    renamed = {("retnet." + k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    assert infer_config(renamed, heads=4).arch == "transformer"
    with pytest.raises(ConversionError, match="pass --heads"):
        infer_config(state)


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_by_gradients(arch):
    for bidirectional in (False, True) if arch != "retnet" else (False,):  # retention is always causal
        cfg = tiny(arch, bidirectional_nar=bidirectional)
        model = init_model(cfg, 1)
        s, i = 24, 10
        x = jax.random.normal(jax.random.key(0), (2, s, cfg.d_model))
        pos = jnp.broadcast_to(jnp.arange(s), (2, s))
        valid = jnp.ones((2, s), bool)
        levels = jnp.array([0, 3])
        grad = jit_method(model, lambda m, x: jax.grad(lambda x: m.run(x, pos, valid, levels)[0][:, i].sum())(x))(x)
        future = jnp.abs(grad[:, i + 1 :]).sum((1, 2))
        past = jnp.abs(grad[:, : i + 1]).sum((1, 2))
        assert future[0] == 0 and past[0] > 0  # the AR row is causal
        assert (future[1] > 0) == bidirectional  # NAR rows: causal unless the option is on


@pytest.mark.parametrize("arch", ARCHS + ["mixtral"])
def test_padding_invariance(arch):
    cfg = tiny(arch)
    model = init_model(cfg, 2)
    rng = np.random.default_rng(0)
    short = random_batch(rng, [(7, 9, 11)])
    long = random_batch(rng, [(15, 20, 30)])
    both = pad_batch(
        [short["text"][0], long["text"][0]],
        [0, 0],
        [short["prompt"][0], long["prompt"][0]],
        [short["resp"][0], long["resp"][0]],
    )
    forward = jit_forward(model)
    for level in (0, 2):
        alone, valid = forward({k: jnp.asarray(v) for k, v in short.items()}, jnp.array([level]))
        batched, bvalid = forward({k: jnp.asarray(v) for k, v in both.items()}, jnp.array([level, 5]))
        n = int(valid[0].sum())
        assert int(bvalid[0].sum()) == n == 7 + 9 + 11 + 4 + (level == 0)
        np.testing.assert_allclose(np.asarray(batched[0, :n]), np.asarray(alone[0, :n]), atol=1e-5)
        assert not np.asarray(batched[0, n:]).any()  # padding rows are zero


@needs_golden
def test_per_level_training_is_one_compile_and_matches_golden():
    model, cfg = parity.load_golden_model(GOLDEN_DIR, "llama")
    inp, out = np.load(GOLDEN_DIR / "inputs.npz"), np.load(GOLDEN_DIR / "llama_outputs.npz")
    batch = pad_batch([inp["text"]] * 3, [0] * 3, [inp["prompt"]] * 3, [inp["response"]] * 3)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graph, state = nnx.split(model)
    traces = []

    @jax.jit
    def loss_fn(state, batch, levels):
        traces.append(1)
        m = nnx.merge(graph, state)
        logits, _ = m(batch, levels)
        t, _ = targets(batch, levels, cfg.stop_token)
        return logits, loss_and_metrics(logits, t, levels)[1]

    for levels in ([0, 1, 7], [7, 0, 1]):
        logits, metrics = loss_fn(state, batch, jnp.array(levels))
        for row, lv in enumerate(levels):
            tag = {0: "ar_l0", 1: "nar_l1", 7: "nar_l7"}[lv]
            ref = out[f"logits_{tag}"]
            np.testing.assert_allclose(np.asarray(logits[row, : len(ref)]), ref, atol=1e-5)
            np.testing.assert_allclose(float(metrics["loss_per_level"][lv]), float(out[f"loss_{tag}"]), atol=1e-5)
    assert len(traces) == 1  # the level is traced: one compile serves every level


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_matches_teacher_forcing(arch):
    cfg = tiny(arch, n_kv_heads=2 if arch == "llama" else 0)
    model = init_model(cfg, 3)
    b = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(1), [(6, 8, 10), (9, 5, 7)]).items()}
    levels = jnp.array([0, 0])
    x, valid = jit_method(model, lambda m, b: m.embed(b, levels))(b)
    s = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(s), valid.shape)
    full = jit_method(model, lambda m, x: m.run(x, pos, valid, levels)[0])(x)
    prefix = 12
    cache = model.init_cache(2, s)
    step = jit_method(model, lambda m, x, p, v, c: m.run(x, p, v, levels, cache=c))
    first, _, cache = step(x[:, :prefix], pos[:, :prefix], valid[:, :prefix], cache)
    outs = [first]
    for t in range(prefix, s):
        o, _, cache = step(x[:, t : t + 1], pos[:, t : t + 1], valid[:, t : t + 1], cache)
        outs.append(o)
    cached = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=2e-5)
    if arch == "retnet":  # a recurrent state: it absorbed each row's valid positions, padding not
        np.testing.assert_array_equal(np.asarray(cache["count"]), np.asarray(valid.sum(1)))
    else:
        assert int(cache["index"]) == s


def _count(cfg):
    abstract = abstract_model(cfg)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_of(abstract)))


# reference.md §3.5, minus the tables the reference holds but never uses: tasks_emb (8 x d) and llama's
# embed_tokens (1025 x d)
SPEC_COUNTS = {
    ("transformer", "full"): 170_005_505,
    ("transformer", "half"): 47_254_529,
    ("transformer", "quarter"): 14_190_593,
    ("transformer", "double"): 321_123_329,
    ("llama", "full"): 221_289_473,
    ("llama", "half"): 60_313_601,
    ("llama", "quarter"): 17_574_401,
    ("llama", "double"): 422_640_641,
    ("retnet", "full"): 220_511_233,
    ("retnet", "half"): 59_924_481,  # the reference's fork
    ("retnet", "quarter"): 17_379_841,
    ("retnet", "double"): 422_132_737,
}


@pytest.mark.parametrize("arch,size", sorted(SPEC_COUNTS))
def test_parameter_counts_match_the_spec(arch, size):
    d, h, n = SIZES[size]
    unused = 8 * d + (1025 * d if arch == "llama" else 0)
    assert _count(ModelConfig(arch=arch, d_model=d, n_heads=h, n_layers=n)) == SPEC_COUNTS[(arch, size)] - unused


@needs_golden
def test_golden_tiny_counts():
    import json

    for arch in ARCHS:
        ref = json.loads((GOLDEN_DIR / f"{arch}_config.json").read_text())["n_parameters"]
        unused = 8 * 48 + (1025 * 48 if arch == "llama" else 0)
        variant = {"retnet_variant": "torchscale"} if arch == "retnet" else {}  # see golden/README's warning
        assert _count(ModelConfig(arch=arch, d_model=48, n_heads=4, n_layers=2, **variant)) == ref - unused


def test_every_parameter_has_logical_axes():
    for arch, extra in [(a, {}) for a in GOLDEN_ARCHS] + [("retnet", {"retnet_variant": "torchscale"})]:
        model = init_model(tiny(arch, version=4, **extra), 0)
        for path, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param):
                assert len(var.logical_axes) == var[...].ndim, path


def loss_grads(cfg, batch, levels, seed=4):
    """Gradients of the reference loss for a freshly initialised model (remat and scan comparisons)."""
    graph, state = nnx.split(init_model(cfg, seed))

    def loss(state):
        logits, _ = nnx.merge(graph, state)(batch, levels)
        return loss_and_metrics(logits, targets(batch, levels, cfg.stop_token)[0], levels)[0]

    return jax.jit(jax.grad(loss))(state)


def test_bf16_compute_remat_and_dropout():
    b = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(2), [(6, 8, 10)]).items()}
    lv = jnp.array([0])
    ref, _ = jit_forward(init_model(tiny("llama"), 4))(b, lv)
    low, _ = jit_forward(init_model(tiny("llama", dtype="bfloat16"), 4))(b, lv)
    assert low.dtype == jnp.float32 and float(jnp.abs(low - ref).max()) < 0.1

    g1, g2 = loss_grads(tiny("transformer"), b, lv), loss_grads(tiny("transformer", remat=True), b, lv)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6), g1, g2)
    drop = jit_method(init_model(tiny("transformer"), 4), lambda m, key: m(b, lv, dropout_key=key)[0])
    d1, d2 = drop(jax.random.key(0)), drop(jax.random.key(1))
    det, _ = jit_forward(init_model(tiny("transformer"), 4))(b, lv)
    assert not np.allclose(np.asarray(d1), np.asarray(d2)) and not np.allclose(np.asarray(d1), np.asarray(det))


def test_save_and_load_model(tmp_path):
    cfg = tiny("llama", version=4)
    model = init_model(cfg, 5)
    save_model(tmp_path / "m", cfg, params_of(model), {"a": 1})
    loaded, cfg2, symmap = load_model(tmp_path / "m")
    assert cfg2 == cfg and symmap == {"a": 1}
    jax.tree.map(
        lambda a, c: np.testing.assert_array_equal(np.asarray(a), np.asarray(c)), params_of(model), params_of(loaded)
    )
    with pytest.raises(FileExistsError):
        save_model(tmp_path / "m", cfg, params_of(model), {})


def test_level_draws_are_traced_and_follow_the_distribution():
    key = jax.random.key(0)
    from valle_jax.models import draw_levels

    uniform = np.asarray(jax.jit(lambda k: draw_levels(k, 8000))(key))
    counts = np.bincount(uniform, minlength=8)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 expected each
    ar_heavy = np.asarray(draw_levels(key, 8000, probs=[0.5] + [0.5 / 7] * 7))
    assert 0.46 < (ar_heavy == 0).mean() < 0.54


@needs_golden
def test_reference_fp32_export_converts_with_its_symmap(tmp_path):
    import torch

    with np.load(GOLDEN_DIR / "llama_weights.npz") as z:
        module = {k: torch.from_numpy(z[k]) for k in z.files}
    symmap = {"<s>": 1, "</s>": 2, " ": 3, "x": 4}
    torch.save(
        {"module": module, "stats": {"global_step": 1234}, "userdata": {"symmap": symmap}}, tmp_path / "fp32.pth"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.convert_reference",
            str(tmp_path / "fp32.pth"),
            "--out",
            str(tmp_path / "m"),
            "--heads",
            "4",
            "--arch",
            "llama",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    model, cfg, got_symmap = load_model(tmp_path / "m")
    assert got_symmap == symmap and cfg.arch == "llama"
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.convert_reference",
            str(tmp_path / "fp32.pth"),
            "--out",
            str(tmp_path / "m2"),
            "--heads",
            "4",
            "--arch",
            "transformer",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "keys are those of a llama model" in wrong.stderr
