"""The CPU decoding kernels (valle_jax/kernels): rows_linear against float64 products, decoding with
them against decoding with XLA's dot, bfloat16 step weights, and the fallbacks."""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from valle_jax import backend, kernels
from valle_jax import decoding as D
from valle_jax.backend import StepWeight
from valle_jax.config import ModelConfig
from valle_jax.models import init_model

XLA_LAYOUT = backend.CacheLayout(backend.Backend.XLA)
kernel_attend = functools.partial(backend.attend_cache, layout=backend.CacheLayout(backend.Backend.CPU_KERNELS))
needs_kernels = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not kernels.available(), reason=f"CPU kernels unavailable here: {kernels._load()}"
)
GREEDY = D.Settings(max_ar_steps=16, ar_temp=0.0, nar_temp=0.0)


@pytest.fixture(autouse=True)
def kernels_for_every_size(monkeypatch):
    """The test models' matrices are smaller than the size from which decoding uses rows_linear."""
    monkeypatch.setattr(kernels, "MIN_WEIGHT_ELEMENTS", 0)


def runs_here(isa):
    """A test parameter per instruction-set build, skipped where this CPU cannot run it."""
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.isas(), reason=f"this CPU has no {isa}"))


ISAS = [runs_here(isa) for isa in kernels.ISAS]


def as_float64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 512, 1536),
        (2, 24, 30),
        (3, 64, 101),
        (4, 37, 9),
        (5, 20, 40),
        (6, 200, 48),
        (7, 3, 33),
        (8, 200, 48),
        (11, 16, 64),
        (12, 16, 70),
        (13, 16, 50),
        (25, 40, 20),
        (32, 72, 97),
        (64, 20, 65),
    ],
)
def test_rows_linear_matches_a_float64_product(dtype, m, k, n, isa):
    """Every row count of a pass (1..12), more rows split into passes (13, 25, 32, 64), widths that
    end in a partial panel or a partial vector of one, in every build."""
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32), dtype)
    got = np.asarray(jax.jit(functools.partial(kernels.rows_linear, n=n, isa=isa))(jnp.asarray(x), kernels.pack(w)))
    want = x.astype(np.float64) @ as_float64(w)  # w as stored (bf16: rounded)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_pack_keeps_every_column_in_panels():
    w = jnp.arange(5 * 70, dtype=jnp.float32).reshape(5, 70)
    packed = kernels.pack(w)
    assert packed.shape == (3, 5, 32)
    np.testing.assert_array_equal(packed[1, 2], w[2, 32:64])
    np.testing.assert_array_equal(packed[2, :, 6:], 0.0)  # past the last column
    np.testing.assert_array_equal(kernels.unpack(packed, 70), w)


@needs_kernels
def test_rows_linear_rejects_mismatched_operands():
    w = kernels.pack(jnp.ones((8, 40)))
    with pytest.raises(ValueError, match="do not make"):
        kernels.rows_linear(jnp.ones((2, 9)), w, 40)
    with pytest.raises(ValueError, match="do not make"):
        kernels.rows_linear(jnp.ones((2, 8)), w, 70)
    with pytest.raises(ValueError, match="do not make"):
        kernels.rows_linear(jnp.ones((2, 8)), jnp.ones((40, 8)), 40)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.rows_linear(jnp.ones((2, 8)), w.astype(jnp.float16), 40)


def test_step_weight_computes_the_einsum_it_replaces():
    """Through the kernel (few rows) and through XLA's dot (many rows, a prefill), for a weight whose
    contraction spans two axes; a spec it cannot compute is refused."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 6, 10)), jnp.float32)  # [heads, head_dim, out]
    sw = StepWeight.of(w, 2)
    assert sw.w_KN is None and sw.unpacked().w_PKC is None  # one copy each
    np.testing.assert_array_equal(sw.dense(), w.reshape(24, 10))
    for rows in (1, 50):
        x = jnp.asarray(rng.standard_normal((rows, 1, 4, 6)), jnp.float32)
        want = jnp.einsum("bshk,hkd->bsd", x, w, precision="highest")
        for weight in (sw, sw.unpacked(), StepWeight.of(w, 2, packed=False)):
            np.testing.assert_allclose(weight.apply("bshk,hkd->bsd", x, jnp.float32), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot compute"):
        sw.apply("bsd,dhk->bshk", jnp.ones((1, 1, 4)), jnp.float32)


def logits_and_tokens(dec, inputs):
    ar = dec.ar(inputs, GREEDY, keep_logits=True)
    return np.asarray(ar.tokens), np.asarray(ar.logits)[:, : GREEDY.max_ar_steps]


def inputs_of(seed, sizes=((12, 40), (7, 25))):
    rng = np.random.default_rng(seed)
    return D.make_inputs(
        [list(rng.integers(1, 200, t)) for t, _ in sizes],
        [rng.integers(0, 1024, (p, 8)) for _, p in sizes],
        [0] * len(sizes),
        8,
    )


@needs_kernels
@pytest.mark.parametrize("arch", ["transformer", "llama", "retnet"])
def test_kernel_steps_equal_xla_steps(arch):
    """The AR over step_layers (the kernels: rows_linear, the prefill's block_attention, the steps'
    cache_attention) gives XLA's greedy tokens and logits, and the NAR over the same layers
    (block_attention) XLA's greedy codes, for every backbone and a batch of different lengths."""
    cfg = ModelConfig(arch=arch, d_model=48, n_heads=4, n_layers=2, n_kv_heads=2 if arch == "llama" else 0)
    model = init_model(cfg, 3)
    with_kernels, without = D.Decoder(model), D.Decoder(model, cpu_kernels=False)
    assert with_kernels.step_layers is not None and without.step_layers is None
    assert with_kernels.nar_layers is with_kernels.step_layers and without.nar_layers is None
    inputs = inputs_of(3)
    (tk, lk), (tx, lx) = logits_and_tokens(with_kernels, inputs), logits_and_tokens(without, inputs)
    np.testing.assert_array_equal(tk, tx)
    np.testing.assert_allclose(lk, lx, atol=1e-5)
    ar = without.ar(inputs, GREEDY)
    codes_k, codes_x = with_kernels.nar(inputs, ar, GREEDY), without.nar(inputs, ar, GREEDY)
    assert int(np.count_nonzero(np.asarray(codes_x)[..., 1:])) > 0
    np.testing.assert_array_equal(codes_k, codes_x)


@needs_kernels
def test_steps_wider_than_the_kernel_unpack_the_weights_once(monkeypatch):
    """A batch with more rows than rows_linear takes decodes through XLA's dot over the unpacked
    weights: unpacked once, before the loop (no transpose inside a while body), with XLA's tokens."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 1)
    cfg = ModelConfig(arch="llama", d_model=48, n_heads=4, n_layers=2)
    model = init_model(cfg, 8)
    dec = D.Decoder(model)
    inputs = inputs_of(8)
    call = dec.ar_call(GREEDY, dec.n_slots(GREEDY.max_ar_steps))
    hlo = call.func.lower(dec.params, inputs, D.Knobs.of(GREEDY, 2), jax.random.key(0), **call.keywords)
    hlo = hlo.compile().as_text()
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    assert bodies
    for computation in re.split(r"\n(?=\S)", hlo):
        if computation.split(" ", 1)[0].lstrip("%") in bodies:
            assert "transpose" not in computation
    np.testing.assert_array_equal(
        logits_and_tokens(dec, inputs)[0], logits_and_tokens(D.Decoder(model, cpu_kernels=False), inputs)[0]
    )


@needs_kernels
def test_bfloat16_step_weights_compute_in_float32():
    """dtype=bfloat16 on the CPU: the AR's matmul weights and KV cache are bfloat16 (half the bytes),
    activations stay float32. So it decodes as a float32 model whose layer weights were rounded to
    bfloat16, with a bfloat16 cache (XLA's attention widens it before reading)."""
    cfg = ModelConfig(arch="llama", d_model=48, n_heads=4, n_layers=2)
    model = init_model(dataclasses.replace(cfg, dtype="bfloat16"), 4)
    dec = D.Decoder(model)
    assert all(p["q"].w_PKC.dtype == jnp.bfloat16 for p in dec.step_layers)
    assert dec.params["backbone"]["q"][...].dtype == jnp.float32  # the NAR's weights: not rounded
    rounded = init_model(cfg, 4)
    for name in type(rounded.backbone).STEP_MATMULS:
        if hasattr(rounded.backbone, name):
            p = getattr(rounded.backbone, name)
            p[...] = p[...].astype(jnp.bfloat16).astype(jnp.float32)
    inputs = inputs_of(5)
    assert dec.kv_dtype == "bfloat16"
    xla = D.Decoder(rounded, cpu_kernels=False, kv_dtype="bfloat16")
    (tk, lk), (tx, lx) = logits_and_tokens(dec, inputs), logits_and_tokens(xla, inputs)
    np.testing.assert_array_equal(tk, tx)
    np.testing.assert_allclose(lk, lx, atol=1e-5)
    # the NAR: the float32 weights (not rounded), attention through the kernel, over the bf16 cache
    assert dec.nar_layers is None
    ar = dec.ar(inputs, GREEDY)
    args, static = dec.nar_arguments(inputs, ar, GREEDY)
    hlo = dec._nar.lower(*args, **static).as_text()
    assert "valle_block_attention" in hlo and "valle_rows_linear" not in hlo
    assert not re.search(r"tensor<\d+x\d+xbf16>", hlo)  # no weight matrix in bfloat16
    float32_xla = D.Decoder(init_model(cfg, 4), cpu_kernels=False, kv_dtype="bfloat16")
    np.testing.assert_array_equal(dec.nar(inputs, ar, GREEDY), float32_xla.nar(inputs, ar, GREEDY))


@needs_kernels
def test_step_layers_follow_replaced_params():
    """Training replaces a decoder's params to sample from new weights: the steps must read those."""
    cfg = ModelConfig(arch="llama", d_model=48, n_heads=4, n_layers=2)
    dec, other = D.Decoder(init_model(cfg, 6)), init_model(cfg, 7)
    inputs = inputs_of(6)
    before = logits_and_tokens(dec, inputs)[1]
    dec.params = nnx.split(other)[1]
    np.testing.assert_array_equal(dec.step_layers[1]["down"].dense(), other.backbone.down[...][1])
    assert not np.allclose(before, logits_and_tokens(dec, inputs)[1])


def test_failed_build_leaves_nothing_behind(tmp_path):
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'error: no compiler here' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "lib" / "k.so"
    with pytest.raises(kernels.KernelUnavailable, match="no compiler here"):
        kernels.build(str(fake), out)
    assert list(out.parent.iterdir()) == []


def test_turned_off_kernels_fall_back_to_xla(tmp_path):
    """VALLE_JAX_CPU_KERNELS=0: unavailable with the reason logged, and a decoder uses XLA's dot."""
    code = (
        "import logging; logging.basicConfig()\n"
        "from valle_jax import kernels, decoding as D\n"
        "from valle_jax.config import ModelConfig\nfrom valle_jax.models import init_model\n"
        "assert not kernels.available()\n"
        "d = D.Decoder(init_model(ModelConfig(arch='llama', d_model=48, n_heads=4, n_layers=2), 0))\n"
        "assert d.step_layers is None\n"
    )
    env = dict(os.environ, VALLE_JAX_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels unavailable, using XLA's dot instead: VALLE_JAX_CPU_KERNELS=0" in done.stderr


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("s,r", [(1, 1), (1, 2), (2, 2)])
def test_cache_attention_equals_xla_over_the_filled_slots(s, r, kv_dtype, isa, monkeypatch):
    """Queries per kv head (grouped-query r), one or two new positions, slots from `live` on
    holding garbage that must not be read, a masked gap inside the filled part (padding, a rolling
    window), and a batch row with nothing visible (XLA: uniform over every slot); a bfloat16 cache
    read as it is, in every build (head size 40: a 16-wide register and a tail)."""

    monkeypatch.setenv("VALLE_JAX_CPU_KERNELS", isa)
    rng = np.random.default_rng(s * 10 + r)
    b, g, dh, c, live = 3, 2, 40, 40, 29
    q = jnp.asarray(rng.standard_normal((b, s, g * r, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b * g, c, dh)), kv_dtype)
    v = jnp.asarray(rng.standard_normal((b * g, dh, c)), kv_dtype)
    mask = rng.random((b, 1, s, c)) < 0.7
    mask[..., live:] = False
    mask[2] = False
    garbage_k, garbage_v = k.at[:, live:].set(1e30), v.at[:, :, live:].set(jnp.nan)
    want = backend.attend_cache(q, k, v, jnp.asarray(mask), jnp.int32(c), XLA_LAYOUT)
    got = jax.jit(kernel_attend)(q, garbage_k, garbage_v, jnp.asarray(mask), jnp.int32(live))
    assert kernels.isa() == isa
    np.testing.assert_allclose(np.asarray(got)[:2], np.asarray(want)[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel_attend(q, k, v, jnp.asarray(mask), jnp.int32(live))[2], want[2], atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("s,r,dh", [(37, 1, 40), (20, 2, 64), (9, 4, 16)])
def test_block_attention_equals_xla_over_the_filled_slots(s, r, dh, kv_dtype, isa, monkeypatch):
    """Many queries at once (a NAR level, a prefill): causal rows (each eight-query group stops at
    its last visible slot), a random mask inside that, query counts and slot counts that are not
    whole groups or vectors, grouped-query r, slots from `live` on holding garbage that must not be
    read, and a query with nothing visible (XLA: uniform over every slot); a bfloat16 cache read as
    it is, in every build."""

    monkeypatch.setenv("VALLE_JAX_CPU_KERNELS", isa)
    rng = np.random.default_rng(s + r)
    b, g, c = 2, 2, s + 43
    live = c - 5
    q = jnp.asarray(rng.standard_normal((b, s, g * r, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b * g, c, dh)), kv_dtype)
    v = jnp.asarray(rng.standard_normal((b * g, dh, c)), kv_dtype)
    causal = np.arange(c)[None, :] < (live - s + 1 + np.arange(s))[:, None]
    mask = (rng.random((b, 1, s, c)) < 0.8) & causal[None, None]
    mask[1, 0, 3] = False
    want = np.asarray(backend.attend_cache(q, k, v, jnp.asarray(mask), jnp.int32(c), XLA_LAYOUT))
    garbage_k, garbage_v = k.at[:, live:].set(1e30), v.at[:, :, live:].set(jnp.nan)
    attend = jax.jit(kernel_attend)  # more than backend.STEP_POSITIONS queries: block_attention
    got = np.asarray(attend(q, garbage_k, garbage_v, jnp.asarray(mask), jnp.int32(live)))
    assert kernels.isa() == isa
    seen = np.ones(got.shape[:2], bool)
    seen[1, 3] = False
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-5, atol=2e-6)
    unseen = np.asarray(attend(q, k, v, jnp.asarray(mask), jnp.int32(live)))[1, 3]
    np.testing.assert_allclose(unseen, want[1, 3], atol=1e-6)


@needs_kernels
def test_block_attention_rejects_mismatched_operands():
    n, q, d, c = 2, 5, 8, 11
    with pytest.raises(ValueError, match="block_attention"):
        kernels.block_attention(
            jnp.zeros((n, q, d)), jnp.zeros((n, c, d)), jnp.zeros((n, d, c)), jnp.zeros((1, q, c), bool), 3
        )


def test_isa_follows_the_environment(monkeypatch):
    """The widest build this CPU runs by default; VALLE_JAX_CPU_KERNELS=avx2 picks AVX2; a build the
    CPU cannot run is refused with the reason."""
    monkeypatch.delenv("VALLE_JAX_CPU_KERNELS", raising=False)
    assert kernels.isa() == (kernels.isas()[0] if kernels.isas() else None)
    monkeypatch.setenv("VALLE_JAX_CPU_KERNELS", "avx2")
    assert kernels.isa() == "avx2"
    missing = [isa for isa in kernels.ISAS if isa not in kernels.isas()]
    if missing:
        monkeypatch.setenv("VALLE_JAX_CPU_KERNELS", missing[0])
        assert not kernels.available()
        assert f"cannot run the {missing[0]} build" in kernels._load()
    assert kernels.library_path("avx2") != kernels.library_path("avx512")


@needs_kernels
def test_bfloat16_cache_is_written_in_place():
    """A bfloat16 KV cache on the CPU is held as its bits (uint16) and written as such: XLA rewrote
    the step's write into a bfloat16 buffer as a float32 write of the whole buffer, converted there
    and back at every step."""
    cfg = ModelConfig(arch="llama", d_model=48, n_heads=4, n_layers=2, dtype="bfloat16")
    dec = D.Decoder(init_model(cfg, 8))
    inputs = inputs_of(8)
    ar = dec.ar(inputs, GREEDY)
    cache = ar.state[0]
    assert cache["k"][0].dtype == jnp.uint16 and cache["v"][0].dtype == jnp.uint16
    n_slots = dec.n_slots(GREEDY.max_ar_steps)
    hlo = (
        jax.jit(dec.ar_call(GREEDY, n_slots))
        .lower(dec.params, inputs, D.Knobs.of(GREEDY, 2), jax.random.key(0))
        .compile()
        .as_text()
    )
    for buf in (cache["k"][0], cache["v"][0]):
        shape = ",".join(map(str, buf.shape))
        assert re.search(rf"u16\[{shape}\]\S* dynamic-update-slice\(", hlo)
        assert not re.search(rf"f32\[{shape}\]\S* dynamic-update-slice\(", hlo)
