"""RetNet with torchscale's XMoE layers: golden parity, conversion both ways, the gate and its
capacity against a numpy transcription of torchscale's top2gating (and against torchscale itself
where it is installed), the second-expert policies, the auxiliary loss in the training step,
decoding (recurrent == parallel where the capacity allows it), parameter counts, the synthesis CLI."""

import dataclasses
import functools
import importlib.util
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN_DIR, assert_parity
from flax import nnx

from tools import parity
from valle_jax.checkpointing import params_of
from valle_jax.config import SIZES, ConfigError, ModelConfig
from valle_jax.models import init_model, jit_method, model_from_params, xmoe
from valle_jax.models.convert import from_reference, infer_config, reference_layout, to_reference, unused_layout
from valle_jax.models.valle import abstract_model, parameter_counts
from valle_jax.training.step import batch_loss

needs_golden = pytest.mark.skipif(
    not (GOLDEN_DIR / "retnet_moe_weights.npz").exists(),
    reason=f"golden retnet_moe files not found at {GOLDEN_DIR} (set VALLE_JAX_GOLDEN)",
)


def tiny(**kw):
    return ModelConfig(**{"arch": "retnet", "d_model": 48, "n_heads": 4, "n_layers": 2, "experts": 4, **kw})


def random_params(cfg, seed=0) -> dict:
    """Parameters of VALLE(cfg) drawn in numpy (no initializer compiled): N(0, 0.2^2), norms near 1."""
    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))

    def draw(path, s):
        x = rng.standard_normal(s.shape).astype(np.float32) * 0.2
        name = str(path[-1].key)
        return x + 1 if name.endswith("norm") or name == "expert_norm" else x

    return jax.tree_util.tree_map_with_path(draw, shapes)


@needs_golden
def test_golden_retnet_moe_parity():
    results = parity.check(GOLDEN_DIR, "retnet_moe")
    # the golden aux_loss is loss - ce in float32: known to one ulp of a loss near 7 (4.8e-7)
    assert_parity(results, ["ar_l0", "nar_l1", "nar_l7"], aux_err=1e-6)


@needs_golden
def test_golden_converts_and_exports_back():
    with np.load(GOLDEN_DIR / "retnet_moe_weights.npz") as z:
        state = {k: z[k] for k in z.files}
    cfg = infer_config(state)
    assert (cfg.arch, cfg.retnet_variant, cfg.n_experts, cfg.xmoe, cfg.eps, cfg.rope_base) == (
        "retnet",
        "torchscale",
        4,
        True,
        1e-6,
        1e4,
    )
    back = to_reference(from_reference(state, cfg), cfg, with_unused=True)
    assert set(back) == set(state)
    for k, v in back.items():
        if k not in unused_layout(cfg):
            np.testing.assert_allclose(v, state[k], rtol=1e-6, atol=1e-7, err_msg=k)
    shapes = [math.prod(v.shape) for k, v in state.items() if not k.startswith("model.retnet_rel_pos")]
    total, active = parameter_counts(cfg)
    assert total == sum(shapes) - 8 * 48  # less tasks_emb
    assert total - active == 2 * (4 - 2) * (2 * 48 * 192 + 3 * 192 + 48)  # two idle experts per layer


def test_fork_variant_round_trip_and_config():
    cfg = tiny(d_model=32, n_tokens=64, experts=3)
    assert cfg.retnet_variant == "fork" and cfg.xmoe and (cfg.eps, cfg.rope_base, cfg.window) == (1e-6, 1e4, 0)
    params = random_params(cfg)
    state = to_reference(params, cfg)
    assert {k: v.shape for k, v in state.items() if "rel_pos" not in k} == reference_layout(cfg)
    assert (
        "model.layers.1.moe_layer.experts.2.ffn_layernorm.bias" in state
        and "model.layers.0.ffn.fc1.weight" not in state
    )
    assert infer_config(state, heads=4) == cfg
    jax.tree.map(np.testing.assert_array_equal, from_reference(state, cfg), params)
    wg = np.asarray(xmoe.orthogonal_rows(0.32)(jax.random.key(0), (2, 3, 16), jnp.float32))  # torchscale's wg init
    np.testing.assert_allclose(wg[1] @ wg[1].T, 0.32**2 * np.eye(3), atol=1e-6)
    with pytest.raises(ConfigError, match="2 experts per token"):
        tiny(experts_per_token=1)
    with pytest.raises(ConfigError, match="moe_second_policy"):
        tiny(moe_second_policy="sampling")
    with pytest.raises(ConfigError, match="experts > 1 is a llama"):
        ModelConfig(arch="transformer", experts=4)


# ---- the layer against torchscale's top2gating, transcribed in numpy ----------------------------


def reference_layer(h, p, capacity, keep_second):
    """torchscale 0.3.0 Top2Gate(use_xmoe) + MOELayer over tokens h [N, D], float64: first choices
    take slots in token order, then second choices; `keep_second` is the policy's mask."""
    e = p["gate_wg"].shape[0]
    wg = p["gate_wg"] / np.linalg.norm(p["gate_wg"], axis=1, keepdims=True)
    logits = (h @ p["gate_reduce"]) @ wg.T
    gates = np.exp(logits - logits.max(1, keepdims=True))
    gates /= gates.sum(1, keepdims=True)
    first = gates.argmax(1)
    second = np.where(np.eye(e, dtype=bool)[first], -np.inf, logits).argmax(1)
    mask1, mask2 = np.eye(e)[first], np.eye(e)[second] * keep_second[:, None]
    g1, g2 = gates[np.arange(len(h)), first], gates[np.arange(len(h)), second]
    g1, g2 = g1 / (g1 + g2), g2 / (g1 + g2)
    loc1 = np.cumsum(mask1, 0) - 1
    loc2 = np.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdims=True)
    kept1, kept2 = (mask1 * (loc1 < capacity)).sum(1), (mask2 * (loc2 < capacity)).sum(1)
    l_aux = np.mean(gates.mean(0) * mask1.mean(0)) * e * e

    def expert(j, x):
        a = x @ p["expert_fc1"][j] + p["expert_fc1_bias"][j]
        a = 0.5 * a * (1 + np.vectorize(math.erf)(a / np.sqrt(2)))
        a = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
        return (a * p["expert_norm"][j] + p["expert_norm_bias"][j]) @ p["expert_fc2"][j] + p["expert_fc2_bias"][j]

    out = np.stack(
        [g1[n] * kept1[n] * expert(first[n], h[n]) + g2[n] * kept2[n] * expert(second[n], h[n]) for n in range(len(h))]
    )
    return out, l_aux, kept1 * 1 + kept2 * 2


def layer_params(cfg, seed):
    bb = random_params(cfg, seed)["backbone"]
    return {k: np.asarray(bb[k][0], np.float64) for k in xmoe.PARAMS}


def test_layer_matches_torchscale_top2gating():
    """Policy "all" with the eval capacity ceil(0.25 N), the training capacity 2 ceil(N / E) and none,
    over N = 50 tokens (the last 10 rows are no token: our bucket padding past the longest row);
    policy "random" with the eval capacity."""
    h = np.random.default_rng(2).standard_normal((2, 30, 16))
    h32 = jnp.asarray(h, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(30), (2, 30))
    tokens = jnp.arange(60).reshape(2, 30) < 50
    for policy in ("all", "random"):
        cfg = tiny(d_model=16, n_heads=2, experts=4, n_tokens=8, moe_second_policy=policy)
        p = layer_params(cfg, 1)
        jp = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()} | {"layer_index": jnp.asarray(1)}
        g = xmoe.gate(h32.reshape(60, 16), jp["gate_reduce"], jp["gate_wg"], tokens.reshape(-1), None, jnp.float32)

        @functools.partial(jax.jit, static_argnames=("train", "slots"))
        def run(key, train, slots, jp=jp, cfg=cfg):
            call = xmoe.Call(pos, tokens if slots else None, slots or None, train, key)
            return xmoe.xmoe_ffn(h32, jp, call, cfg)

        def check(call, capacity, jp=jp, p=p, g=g, run=run, policy=policy):
            keep = np.ones(60, bool)
            if policy == "random":  # the layer's own draws
                keep = 2 * np.asarray(g.w_second) > np.asarray(xmoe.draws(call, jp["layer_index"]))
                assert 0 < keep[:50].sum() < 50
            out, l_aux = run(call.key, call.train, call.slots or 0)
            want, want_aux, kept = reference_layer(h.reshape(60, 16)[:50], p, capacity, keep[:50])
            np.testing.assert_allclose(np.asarray(out).reshape(60, 16)[:50], want, atol=2e-5, err_msg=str(capacity))
            if call.tokens is not None:  # decoding counts every row (for an l_aux it never uses)
                assert float(l_aux) == pytest.approx(want_aux, rel=1e-5)
            return kept

        kept = check(xmoe.Call(pos, tokens, 60, False, None), 13)
        assert (kept % 2 == 0).any() and (kept // 2 == 0).any()  # first and second choices dropped
        if policy == "random":
            break
        check(xmoe.Call(pos, tokens, 60, True, None), 26)
        check(xmoe.decoding_call(pos), 100)  # no capacity: as if every expert had room for all
        # the grouped-matmul dispatch (accelerators) computes the same
        sorted_out = xmoe.dropless(h32.reshape(60, 16), jp, g, cfg.eps, jnp.float32)
        want = reference_layer(h.reshape(60, 16), p, 100, np.ones(60, bool))[0]
        np.testing.assert_allclose(np.asarray(sorted_out), want, atol=2e-5)


def test_random_policy_draws():
    """Keeps the second expert with probability 2 p2: fixed by (layer, position) outside training,
    fresh per step (key) and per token in training."""
    pos = jnp.broadcast_to(jnp.arange(2000), (2, 2000))
    draws = jax.jit(xmoe.draws)
    u0 = np.asarray(draws(xmoe.decoding_call(pos), jnp.asarray(0))).reshape(2, 2000)
    assert (u0[0] == u0[1]).all() and 0.47 < u0.mean() < 0.53 and (0 <= u0).all() and (u0 < 1).all()
    u1 = np.asarray(xmoe.draws(xmoe.decoding_call(pos[:, 10:11]), jnp.asarray(0)))
    assert (u1 == u0[:, 10]).all()  # a position's draw does not depend on what else the call holds
    assert (np.asarray(draws(xmoe.decoding_call(pos), jnp.asarray(1))).reshape(2, 2000) != u0).mean() > 0.99
    train = lambda k: np.asarray(draws(xmoe.Call(pos, None, None, True, jax.random.key(k)), jnp.asarray(0)))  # noqa: E731
    t0 = train(0).reshape(2, 2000)
    assert (t0[0] != t0[1]).mean() > 0.99 and (train(1).reshape(2, 2000) != t0).mean() > 0.99
    h, reduce, wg = (jax.random.normal(jax.random.key(k), s) for k, s in ((3, (4000, 16)), (4, (16, 16)), (5, (4, 16))))
    gate = jax.jit(xmoe.gate, static_argnums=5)
    p2 = np.asarray(gate(h, reduce, wg, jnp.ones(4000, bool), None, jnp.float32).w_second)  # policy "all"
    drawn = gate(h, reduce, wg, jnp.ones(4000, bool), jnp.asarray(u0.reshape(-1)), jnp.float32)
    keep = np.asarray(drawn.keep_second)
    np.testing.assert_array_equal(keep, 2 * p2 > u0.reshape(-1))
    np.testing.assert_array_equal(np.asarray(drawn.w_second), np.where(keep, p2, 0.0))
    assert keep.mean() == pytest.approx(np.mean(2 * p2), abs=0.03) and 0.2 < keep.mean() < 0.95


# ---- against torchscale itself -------------------------------------------------------------------


def _shim(name: str, **attrs):
    """An importable stand-in for a module torchscale imports but this test never calls into
    (fairscale's activation checkpointing and FSDP wrap, timm's drop_path: both off here)."""
    top = name.split(".")[0]
    if name in sys.modules or (top not in sys.modules and importlib.util.find_spec(top) is not None):
        return  # already imported, or the real package is installed
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


@pytest.fixture(scope="module")
def torchscale_retnet(tmp_path_factory):
    if importlib.util.find_spec("torchscale") is None:
        pytest.skip("torchscale is not installed: pip install --no-deps torchscale==0.3.0")
    torch = pytest.importorskip("torch")

    def never(*a, **k):
        raise AssertionError("not used with these settings")

    _shim("fairscale")
    _shim("fairscale.nn", checkpoint_wrapper=never, wrap=never)
    _shim("timm")
    _shim("timm.models")
    _shim("timm.models.layers", drop_path=never)
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetDecoder

    if not torch.distributed.is_initialized():  # MOELayer asks for its process groups
        init = f"file://{tmp_path_factory.mktemp('dist') / 'store'}"
        torch.distributed.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    histc = torch.histc  # the gate's logging histograms pass integer indices, which this torch refuses
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "histc", lambda x, *a, **k: histc(x.float(), *a, **k))
        yield torch, RetNetConfig, RetNetDecoder
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("train", [False, True])
def test_equals_torchscale_on_a_padded_batch(torchscale_retnet, train):
    """torchscale's RetNetDecoder with use_xmoe (policy "all") on a right-padded batch, in eval mode
    (capacity 0.25 N) and in training mode (2 ceil(N / E)): the same hidden states and l_aux, loaded
    from our export (strictly: the key layout is torchscale's). Extra padding columns, as our
    buckets add, change nothing."""
    torch, RetNetConfig, RetNetDecoder = torchscale_retnet
    cfg = tiny(d_model=32, n_tokens=64, retnet_variant="torchscale", moe_second_policy="all", dropout=0.0)
    model = init_model(cfg, 3)
    state = to_reference(jax.tree.map(np.asarray, params_of(model)), cfg)
    ts = RetNetDecoder(
        RetNetConfig(
            decoder_embed_dim=32,
            decoder_value_embed_dim=64,
            decoder_retention_heads=4,
            decoder_ffn_embed_dim=128,
            decoder_layers=2,
            dropout=0.0,
            activation_fn="gelu",
            no_output_layer=True,
            use_xmoe=True,
            moe_freq=1,
            moe_expert_count=4,
            moe_gating_use_fp32=False,
        )
    )
    for layer in ts.layers:
        layer.moe_layer.gate.second_expert_policy = "all"
    ts.load_state_dict(
        {k[len("model.") :]: torch.from_numpy(v.copy()) for k, v in state.items() if k.startswith("model.")}
    )
    ts.train(train)
    lengths, s = np.array([24, 17, 9]), 24
    valid = np.arange(s)[None, :] < lengths[:, None]
    x = np.random.default_rng(4).standard_normal((3, s, 32)).astype(np.float32) * valid[..., None]
    with torch.no_grad():
        want, extra = ts(torch.zeros(3, s, dtype=torch.long), token_embeddings=torch.from_numpy(x), features_only=True)
    want_aux = 0.001 * sum(float(a) for a in extra["l_aux"])
    mode = xmoe.Mode(train, jax.random.key(0) if train else None)
    run = jit_method(
        model,
        lambda m, x, v: m.backbone(
            x, jnp.broadcast_to(jnp.arange(x.shape[1]), v.shape), v, jnp.ones(3, bool), routing=mode
        ),
    )
    for extra_cols in (0, 7):
        xp = np.pad(x, ((0, 0), (0, extra_cols), (0, 0)))
        vp = np.pad(valid, ((0, 0), (0, extra_cols)))
        hidden, _, aux = run(jnp.asarray(xp), jnp.asarray(vp))
        np.testing.assert_allclose(
            np.asarray(hidden)[:, :s][valid], want.numpy()[valid], atol=2e-5, err_msg=str(extra_cols)
        )
        assert float(aux) == pytest.approx(want_aux, rel=1e-5)


# ---- training --------------------------------------------------------------------------------------


def random_batch(rng, lengths, n_tokens=64):
    from valle_jax.data.batch import pad_batch

    texts = [rng.integers(1, n_tokens, t) for t, _, _ in lengths]
    prompts = [rng.integers(0, n_tokens, (p, 8)) for _, p, _ in lengths]
    resps = [rng.integers(0, n_tokens, (r, 8)) for _, _, r in lengths]
    batch = pad_batch(texts, [0] * len(lengths), prompts, resps)
    return {k: jnp.asarray(v) for k, v in batch.items()} | {"row_valid": jnp.ones((len(lengths),), bool)}


def test_training_loss_adds_the_weighted_l_aux_and_trains_the_gate():
    cfg = tiny(d_model=16, n_heads=2, n_tokens=64, dropout=0.0)
    model = model_from_params(cfg, random_params(cfg, 4))
    b = random_batch(np.random.default_rng(2), [(6, 8, 10), (9, 5, 7)])
    graph, params = nnx.split(model)[0], params_of(model)
    step = jax.value_and_grad(batch_loss, argnums=1, has_aux=True)
    (total, m), grads = jax.jit(lambda p: step(graph, p, b, jax.random.key(0), cfg, (), True))(params)
    assert float(total) == pytest.approx(float(m["ce"] + m["router_aux"]), abs=1e-6)
    # l_aux = E^2 mean_e(gate share * first-choice share): 1 for a balanced gate, E for a collapsed one
    assert 0.001 * 2 * 1.0 < float(m["router_aux"]) < 0.001 * 2 * 4
    for name in ("gate_reduce", "gate_wg", "expert_fc1", "expert_norm_bias"):
        assert float(jnp.abs(grads["backbone"][name]).sum()) > 0, name


# ---- decoding ----------------------------------------------------------------------------------------


def test_recurrent_equals_parallel_where_no_capacity_applies():
    """Decoding (one position at a time on the recurrent state; random policy) routes without a
    capacity, so it equals the teacher-forced parallel form with moe_eval_capacity=0, row by row.
    With the eval capacity (0.25) the parallel form depends on the batch: row 0's outputs change
    with what row 1 holds (the reference's quirk, kept; docs/deviations.md)."""
    cfg = tiny(d_model=32, n_tokens=64, moe_eval_capacity=0.0)
    params = random_params(cfg, 5)
    free = model_from_params(cfg, params)
    capped = model_from_params(dataclasses.replace(cfg, moe_eval_capacity=0.25), params)
    s, levels = 24, jnp.array([0, 3])
    valid = jnp.arange(s)[None, :] < jnp.array([[24], [15]])
    x = jax.random.normal(jax.random.key(1), (2, s, 32)) * valid[..., None]
    pos = jnp.broadcast_to(jnp.arange(s), valid.shape)
    full = jit_method(free, lambda m, x: m.run(x, pos, valid, levels)[0])(x)
    step = jit_method(capped, lambda m, x, p, v, c: m.run(x, p, v, levels, cache=c))  # decoding ignores the capacity
    cache, outs = capped.init_cache(2, s), []
    for t in range(s):
        o, _, cache = step(x[:, t : t + 1], pos[:, t : t + 1], valid[:, t : t + 1], cache)
        outs.append(o)
    got = jnp.concatenate(outs, 1)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(full)[np.asarray(valid)], atol=2e-5)

    forward = jit_method(capped, lambda m, x: m.run(x, pos, valid, levels)[0])
    other = x.at[1].set(jax.random.normal(jax.random.key(2), (s, 32)) * valid[1][:, None])
    assert np.abs(np.asarray(forward(x)[0] - forward(other)[0])).max() > 1e-3


@pytest.mark.needs_espeak
def test_cli_synthesises_with_a_retnet_moe_model(codec_dir, corpus, tmp_path):
    import soundfile as sf

    from valle_jax import synthesize
    from valle_jax.audio import HOP_LENGTH, SAMPLE_RATE
    from valle_jax.checkpointing import save_model
    from valle_jax.data.text import reference_symmap

    cfg = tiny(retention_chunk=32)
    save_model(tmp_path / "moe", cfg, params_of(init_model(cfg, 0)), reference_symmap())
    voice = sorted(corpus.rglob("*.wav"))[0]
    args = ["Hello world.", str(voice), "--checkpoint", str(tmp_path / "moe"), "--codec-dir", str(codec_dir)]
    assert synthesize.main(args + ["--max-ar-steps", "8", "--out", str(tmp_path / "out.wav")]) == 0
    wav, sr = sf.read(tmp_path / "out.wav")
    assert sr == SAMPLE_RATE and len(wav) == 8 * HOP_LENGTH


# (total, active) parameters of the retnet presets (fork layout) with 8 XMoE experts, the unused
# tasks_emb excluded; docs/model.md lists them
# (a dense fork retnet's count plus, per layer, 7 more sub-LN FFNs and the gate: 16 d + 16 E)
XMOE_COUNTS = {
    "quarter": (61_748_225, 23_759_873),
    "half": (236_740_097, 85_265_921),
    "full": (926_462_465, 321_524_225),
    "double": (1_834_043_393, 624_166_913),
}


def test_preset_parameter_counts():
    for size, counts in XMOE_COUNTS.items():
        d, h, n = SIZES[size]
        assert parameter_counts(ModelConfig(arch="retnet", d_model=d, n_heads=h, n_layers=n, experts=8)) == counts
