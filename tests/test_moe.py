"""The Mixtral-style MoE backbone and the sliding window: golden parity, conversion round trip,
routing and load-balancing maths against HF's, dropless == capacity, the window in every attention
path, the auxiliary loss in the training step, decoding, parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN_DIR, assert_parity
from flax import nnx

from tools import parity
from valle_jax import decoding as D
from valle_jax.checkpointing import model_with_params, params_of
from valle_jax.config import SIZES, ConfigError, ModelConfig
from valle_jax.data.batch import pad_batch
from valle_jax.models import init_model, jit_method, loss_and_metrics, moe, targets
from valle_jax.models.convert import (
    ConversionError,
    from_reference,
    infer_config,
    reference_layout,
    to_reference,
    unused_layout,
)
from valle_jax.models.layers import attention_mask
from valle_jax.models.valle import parameter_counts
from valle_jax.training.step import batch_loss

needs_golden = pytest.mark.skipif(
    not (GOLDEN_DIR / "mixtral_weights.npz").exists(),
    reason=f"golden mixtral files not found at {GOLDEN_DIR} (set VALLE_JAX_GOLDEN)",
)


def tiny(**kw):
    kw = {"arch": "mixtral", "d_model": 32, "n_heads": 4, "n_layers": 2, "n_tokens": 64, "experts": 4, **kw}
    return ModelConfig(**kw)


def random_batch(rng, lengths, n_tokens=64):
    texts = [rng.integers(1, n_tokens, t) for t, _, _ in lengths]
    prompts = [rng.integers(0, n_tokens, (p, 8)) for _, p, _ in lengths]
    resps = [rng.integers(0, n_tokens, (r, 8)) for _, _, r in lengths]
    return {k: jnp.asarray(v) for k, v in pad_batch(texts, [0] * len(lengths), prompts, resps).items()}


@needs_golden
def test_golden_mixtral_parity():
    results = parity.check(GOLDEN_DIR, "mixtral")
    # the golden aux_loss is loss - ce in float32: known to one ulp of a loss near 7 (4.8e-7)
    assert_parity(results, ["ar_l0", "nar_l1", "nar_l7"], aux_err=1e-6)


def golden_batch2():
    """A two-sample, mixed-level batch like the withheld `inputs_batch2.npz` (its b1 text, a 50-frame
    prompt, a 60-frame response at level 3; 74 of b1's 200 positions are padding), from the shipped
    single-sample inputs: (texts, prompts, responses, levels)."""
    inp = np.load(GOLDEN_DIR / "inputs.npz")
    b1_text = np.array([1, 52, 23, 13, 3, 58, 62, 14, 25, 21, 29, 2], np.uint8)
    prompts, resps = [inp["prompt"], inp["prompt"][:50]], [inp["response"], inp["response"][20:80]]
    return [inp["text"], b1_text], prompts, resps, [0, 3]


# HF transformers 4.40.2 MixtralModel on the golden mixtral weights with every router scaled by 60 (so
# that routing is far from uniform and the padding's share of it shows), for golden_batch2(): the
# reference's loss and its 0.001 * load-balancing term over all 400 positions, padding included.
# tests/test_reference_baseline.py::test_reference_mixtral_padded_batch recomputes them with HF.
SHARP_ROUTER = 60.0
HF_SHARP_BATCH2 = {"loss": 7.1370062828063965, "aux": 0.002018572762608528}


def sharp_golden_model():
    model, cfg = parity.load_golden_model(GOLDEN_DIR, "mixtral")
    params = params_of(model)
    params["backbone"]["router"] = params["backbone"]["router"] * SHARP_ROUTER
    return model_with_params(cfg, params), cfg


@needs_golden
def test_parity_runs_a_padded_batch_as_the_reference_does():
    """The reference's load-balancing term counts the padded positions (zero inputs, no attention
    mask); training counts the valid ones (docs/deviations.md). The parity tool reproduces the
    reference's, where the training forward would miss it by ~1e-5."""
    model, cfg = sharp_golden_model()
    texts, prompts, resps, levels = golden_batch2()
    batch = {k: jnp.asarray(v) for k, v in pad_batch(texts, [0, 0], prompts, resps).items()}
    lv = jnp.asarray(levels)
    both = lambda m, b, lv: (parity.reference_padded_forward(m, b, lv), m.forward(b, lv)[2])  # noqa: E731
    with jax.default_matmul_precision("highest"):
        (logits, valid, aux), trained_aux = jit_method(model, both)(batch, lv)
    t, _ = targets(batch, lv, cfg.stop_token)
    ce, _ = loss_and_metrics(logits, t, lv, cfg.n_resp_levels)
    assert np.asarray(valid).sum(1).tolist() == [200, 126]
    assert abs(float(aux) - HF_SHARP_BATCH2["aux"]) < 1e-8
    assert abs(float(ce + aux) - HF_SHARP_BATCH2["loss"]) < 2e-6
    assert abs(float(trained_aux) - HF_SHARP_BATCH2["aux"]) > 5e-6


@needs_golden
def test_golden_mixtral_converts_and_exports_back():
    with np.load(GOLDEN_DIR / "mixtral_weights.npz") as z:
        state = {k: z[k] for k in z.files}
    cfg = infer_config(state, heads=4)
    assert (cfg.arch, cfg.n_experts, cfg.top_k, cfg.window, cfg.eps, cfg.rope_base) == ("mixtral", 4, 2, 900, 1e-5, 1e6)
    back = to_reference(from_reference(state, cfg), cfg, with_unused=True)
    assert set(back) == set(state)
    for k, v in back.items():
        if k not in unused_layout(cfg):
            np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_export_round_trip_of_a_fresh_model():
    cfg = tiny(n_kv_heads=2)
    params = jax.tree.map(np.asarray, params_of(init_model(cfg, 0)))
    state = to_reference(params, cfg)
    assert {k: v.shape for k, v in state.items()} == reference_layout(cfg)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in state
    assert infer_config(state, heads=4) == cfg
    jax.tree.map(np.testing.assert_array_equal, from_reference(state, cfg), params)


def hf_moe(h, router, w1, w3, w2, k):
    """MixtralSparseMoeBlock.forward written out in numpy, expert by expert (float64)."""
    logits = h @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, top, -1)
    w /= w.sum(-1, keepdims=True)
    gelu = lambda a: 0.5 * a * (1 + np.vectorize(math.erf)(a / np.sqrt(2)))  # noqa: E731
    out = np.zeros_like(h)
    for e in range(router.shape[1]):
        rows, slot = np.nonzero(top == e)
        out[rows] += (gelu(h[rows] @ w1[e]) * (h[rows] @ w3[e])) @ w2[e] * w[rows, slot, None]
    return out, logits, top


def hf_balance_loss(logits_list, e, k):
    """transformers 4.40 load_balancing_loss_func without an attention mask, in numpy."""
    logits = np.concatenate(logits_list)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    tokens_per_expert = np.eye(e)[top].mean(0)  # [k, E]
    return np.sum(tokens_per_expert * p.mean(0)[None]) * e


def expert_weights(seed, n=40, d=16, f=24, e=4):
    rng = np.random.default_rng(seed)
    shapes = ((n, d), (d, e), (e, d, f), (e, d, f), (e, f, d))
    return [(rng.normal(size=s) / np.sqrt(s[-2] if i > 1 else 1)).astype(np.float32) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_moe_ffn_matches_hf_and_the_balance_loss(dispatch):
    h, router, w1, w3, w2 = expert_weights(0)
    cfg = tiny(d_model=16, moe_dispatch=dispatch, capacity_factor=2.0)  # 2 = experts / k: nothing drops
    out, stats = jax.jit(lambda *a: moe.moe_ffn(a[0][None], *a[1:], jnp.ones((1, 40), bool), cfg))(
        h, router, w1, w3, w2
    )
    want, logits, _ = hf_moe(h.astype(np.float64), router, w1, w3, w2, 2)
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=1e-4, rtol=1e-4)
    h2 = expert_weights(1)[0]
    _, stats2 = moe.moe_ffn(jnp.asarray(h2)[None], router, w1, w3, w2, jnp.ones((1, 40), bool), cfg)
    got = moe.balance_loss(jnp.stack([stats, stats2]), jnp.asarray(40))
    assert float(got) == pytest.approx(hf_balance_loss([logits, h2 @ router], 4, 2), rel=1e-5)


def test_dropless_equals_capacity_until_tokens_drop():
    h, router, w1, w3, w2 = (jnp.asarray(a) for a in expert_weights(2, n=64))
    r = moe.route(h, router, 2, jnp.float32)
    valid = jnp.ones((64,), bool)
    free = moe.dropless(h, w1, w3, w2, r, jnp.float32)
    roomy = moe.capacity(h, w1, w3, w2, r, valid, 2.0, jnp.float32)  # C = 64: no expert can overflow
    np.testing.assert_allclose(np.asarray(roomy), np.asarray(free), atol=1e-5)
    tight = moe.capacity(h, w1, w3, w2, r, valid, 0.5, jnp.float32)  # C = 16 slots for ~32 each
    differs = np.abs(np.asarray(tight) - np.asarray(free)).max(-1) > 1e-6
    assert 0 < differs.sum() < 64
    # padding takes no slot: marking half the tokens invalid leaves the others' slots as if alone
    half = moe.capacity(h, w1, w3, w2, r, jnp.arange(64) < 32, 0.5, jnp.float32)
    alone = moe.capacity(h[:32], w1, w3, w2, moe.route(h[:32], router, 2, jnp.float32), valid[:32], 1.0, jnp.float32)
    np.testing.assert_allclose(np.asarray(half[:32]), np.asarray(alone), atol=1e-5)


def test_window_mask_is_hf_sdpa_sliding_window():
    """transformers 4.40 `_make_causal_mask` with a sliding window W and past length P masks key j
    of query i when j <= i + P - W - 1: a query sees itself and W earlier positions."""
    w, past, s = 3, 4, 5
    q = jnp.arange(past, past + s)[None]
    k = jnp.arange(past + s)[None]
    got = np.asarray(attention_mask(q, k, jnp.ones_like(k, bool), jnp.ones((1,), bool), w))[0, 0]
    i, j = np.arange(s)[:, None], np.arange(past + s)[None, :]
    hf = (j <= i + past) & ~(j <= i + past - w - 1)
    np.testing.assert_array_equal(got, hf)


@pytest.mark.parametrize("arch,attention", [("mixtral", "dense"), ("mixtral", "blocked"), ("mistral", "dense")])
def test_window_limits_what_a_position_sees(arch, attention):
    cfg = tiny(arch=arch, experts=4 if arch == "mixtral" else 0, sliding_window=3, n_layers=1, attention=attention)
    model = init_model(cfg, 1)
    s, i = 24, 15
    x = jax.random.normal(jax.random.key(0), (1, s, cfg.d_model))
    pos, valid, lv = jnp.arange(s)[None], jnp.ones((1, s), bool), jnp.array([0])
    grad = jit_method(model, lambda m, x: jax.grad(lambda x: m.run(x, pos, valid, lv)[0][:, i].sum())(x))(x)
    seen = np.abs(np.asarray(grad[0])).sum(-1) > 0
    np.testing.assert_array_equal(np.flatnonzero(seen), np.arange(i - 3, i + 1))


def test_kv_cache_with_a_window_matches_teacher_forcing():
    cfg = tiny(sliding_window=5)
    model = init_model(cfg, 3)
    b = random_batch(np.random.default_rng(1), [(6, 8, 10), (9, 5, 7)])
    levels = jnp.array([0, 0])
    x, valid = jit_method(model, lambda m, b: m.embed(b, levels))(b)
    s = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(s), valid.shape)
    full = jit_method(model, lambda m, x: m.run(x, pos, valid, levels)[0])(x)
    step = jit_method(model, lambda m, x, p, v, c: m.run(x, p, v, levels, cache=c))
    out, _, cache = step(x[:, :12], pos[:, :12], valid[:, :12], model.init_cache(2, s))
    outs = [out]
    for t in range(12, s):
        o, _, cache = step(x[:, t : t + 1], pos[:, t : t + 1], valid[:, t : t + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5)


def test_training_loss_adds_the_weighted_balance_loss():
    cfg = tiny()
    model = init_model(cfg, 4)
    b = random_batch(np.random.default_rng(2), [(6, 8, 10), (9, 5, 7)])
    b["row_valid"] = jnp.ones((2,), bool)
    graph, params = nnx.split(model)[0], params_of(model)
    (loss, m), grads = jax.jit(
        lambda p: jax.value_and_grad(batch_loss, argnums=1, has_aux=True)(graph, p, b, jax.random.key(0), cfg, (), True)
    )(params)
    assert float(m["router_aux"]) > 0 and float(loss) == pytest.approx(float(m["ce"] + m["router_aux"]), abs=1e-6)
    # a balanced router (as a fresh one nearly is) gives E * sum_e (k / E) * (1 / E) = k
    assert 0.001 * 1.9 < float(m["router_aux"]) < 0.001 * 2.5
    assert float(jnp.abs(grads["backbone"]["router"]).sum()) > 0


def test_console_line_shows_the_router_aux_term():
    from valle_jax.training.monitor import console_line

    m = {"train/loss": 7.1, "train/acc_top10": 0.1, "train/lr": 1e-4, "train/grad_norm": 1.0}
    m.update({"perf/tokens_per_s": 1e3, "perf/step_time_s": 0.5})
    assert "router aux" not in console_line(1, 10, m)
    assert "| router aux 0.00201 |" in console_line(1, 10, {**m, "train/router_aux": 0.0020123})


def test_config_defaults_follow_the_hf_class():
    assert (tiny().eps, tiny().rope_base, tiny().window, tiny().top_k) == (1e-5, 1e6, 900, 2)
    llama_moe = ModelConfig(arch="llama", experts=4)  # the reference builds Mixtral for any llama arch
    assert (llama_moe.moe, llama_moe.window, llama_moe.rope_base) == (True, 900, 1e6)
    mistral = ModelConfig(arch="mistral")
    assert (mistral.moe, mistral.window, mistral.eps, mistral.rope_base) == (False, 4096, 1e-6, 1e4)
    assert ModelConfig(arch="llama").window == 0 and ModelConfig(arch="mixtral").n_experts == 8
    assert ModelConfig(arch="mixtral", experts=1 + 1, experts_per_token=1).top_k == 1
    with pytest.raises(ConfigError, match="experts > 1 is a llama"):
        ModelConfig(arch="transformer", experts=4)
    with pytest.raises(ConfigError, match="moe_dispatch"):
        tiny(moe_dispatch="dense")


# (total, active) parameters of the mixtral presets (8 experts, 2 per token), the unused tables of
# the reference (tasks_emb, embed_tokens) excluded; docs/model.md lists them
MIXTRAL_COUNTS = {
    "quarter": (83_394_817, 26_771_713),
    "half": (324_075_009, 97_582_593),
    "full": (1_277_294_593, 371_324_929),
    "double": (2_535_708_673, 723_769_345),
}


@pytest.mark.parametrize("size", sorted(MIXTRAL_COUNTS))
def test_mixtral_preset_parameter_counts(size):
    d, h, n = SIZES[size]
    assert parameter_counts(ModelConfig(arch="mixtral", d_model=d, n_heads=h, n_layers=n)) == MIXTRAL_COUNTS[size]
    dense = parameter_counts(ModelConfig(arch="llama", d_model=d, n_heads=h, n_layers=n))
    assert dense[0] == dense[1]


@needs_golden
def test_golden_tiny_count():
    import json

    shapes = json.loads((GOLDEN_DIR / "mixtral_config.json").read_text())["parameters"].values()
    total, active = parameter_counts(ModelConfig(arch="mixtral", d_model=48, n_heads=4, n_layers=2, experts=4))
    assert total == sum(math.prod(s) for s in shapes) - 8 * 48 - 1025 * 48  # less tasks_emb, embed_tokens
    assert total - active == 2 * (4 - 2) * 3 * 48 * 192  # two idle experts per layer


GREEDY = D.Settings(max_ar_steps=20, ar_temp=0.0, nar_temp=0.0)


def utterances(seed, sizes=((12, 40), (7, 25))):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 60, t)) for t, _ in sizes], [rng.integers(0, 64, (p, 8)) for _, p in sizes]


@pytest.fixture(scope="module")
def decoder():
    # a window shorter than the prompts, so the cached steps must apply it too
    return D.Decoder(init_model(tiny(d_model=48, sliding_window=24, n_kv_heads=2), 5))


def test_mixtral_cached_decoding_equals_recomputation(decoder):
    inputs = D.make_inputs(*utterances(1), [0] * 2, 8)
    cached = decoder.ar(inputs, GREEDY, keep_logits=True)
    full = decoder.ar(inputs, GREEDY, cached=False, keep_logits=True)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
    steps = GREEDY.max_ar_steps
    np.testing.assert_allclose(np.asarray(cached.logits)[:, :steps], np.asarray(full.logits)[:, :steps], atol=1e-5)


def test_mixtral_batched_decoding_equals_one_by_one(decoder):
    texts, prompts = utterances(2)
    together = decoder.generate(D.make_inputs(texts, prompts, [0] * 2, 8), GREEDY)
    for i in range(2):
        alone = decoder.generate(D.make_inputs([texts[i]], [prompts[i]], [0], 8), GREEDY)
        np.testing.assert_array_equal(alone.codes[0], together.codes[i])


def test_convert_arch_flag_accepts_what_the_keys_cannot_tell():
    from tools.convert_reference import _with_arch

    dense = ModelConfig(arch="llama", d_model=32, n_heads=4, n_layers=2)
    assert _with_arch(dense, "mistral").arch == "mistral"  # same keys, Mistral's window
    assert _with_arch(tiny(), "llama").arch == "mixtral"  # the reference's llama with experts > 1
    with pytest.raises(ConversionError, match="keys are those of a llama"):
        _with_arch(dense, "mixtral")


@pytest.mark.needs_espeak
def test_synthesis_cli_reads_an_exported_mixtral(codec_dir, corpus, tmp_path):
    """The export to the reference's fp32.pth layout (block_sparse_moe keys) reads back in the
    synthesis CLI, which decodes with the MoE layers (greedy, so the same as the model's own decoder)."""
    import soundfile as sf

    from valle_jax import synthesize
    from valle_jax.audio import HOP_LENGTH
    from valle_jax.data.text import reference_symmap
    from valle_jax.export import export

    cfg = tiny(d_model=48, n_tokens=1024)
    export(params_of(init_model(cfg, 0)), cfg, reference_symmap(), {}, tmp_path / "fp32.pth")
    voice = sorted(corpus.rglob("*.wav"))[0]
    args = ["Hello world.", str(voice), "--checkpoint", str(tmp_path / "fp32.pth"), "--heads", "4"]
    args += ["--codec-dir", str(codec_dir), "--max-ar-steps", "12", "--ar-temp", "0", "--nar-temp", "0"]
    assert synthesize.main(args + ["--out", str(tmp_path / "out.wav")]) == 0
    assert len(sf.read(tmp_path / "out.wav")[0]) == 12 * HOP_LENGTH
