"""RetNet: parallel == chunkwise == recurrent retention, recurrent decoding == teacher forcing,
constant decoding memory, and a checkpoint in the reference fork's layout converting and running
(its numerics checked against a float64 numpy transcription of reference.md §3.2). Golden parity for the
upstream-torchscale variant runs with the other backbones in test_model.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from tools.convert_reference import convert
from valle_jax import decoding as D
from valle_jax.checkpointing import load_model
from valle_jax.config import ConfigError, ModelConfig
from valle_jax.models import init_model, jit_forward, jit_method
from valle_jax.models import retention as R
from valle_jax.models.convert import from_reference, infer_config, to_reference

GREEDY = D.Settings(max_ar_steps=40, ar_temp=0.0, nar_temp=0.0)


def tiny(**kw):
    return ModelConfig(arch="retnet", d_model=48, n_heads=4, n_layers=2, **kw)


def utterances(seed=0, sizes=((12, 40), (20, 70), (7, 25)), vocab=1024):
    rng = np.random.default_rng(seed)
    texts = [list(rng.integers(1, min(200, vocab), t)) for t, _ in sizes]
    prompts = [rng.integers(0, vocab, (p, 8)) for _, p in sizes]
    return D.make_inputs(texts, prompts, [0] * len(texts), 8)


def qkv(b=2, s=37, h=4, dk=12, seed=0):
    """Rotated queries and keys (keys scaled by dk^-0.5, as the model does), values 2 dk wide."""
    ks = jax.random.split(jax.random.key(seed), 3)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    angle = R.angles(dk, 1e4)
    q = R.rotate(jax.random.normal(ks[0], (b, s, h, dk)), pos, angle)
    k = R.rotate(jax.random.normal(ks[1], (b, s, h, dk)) * dk**-0.5, pos, angle)
    return q, k, jax.random.normal(ks[2], (b, s, h, 2 * dk)), pos


def test_parallel_chunkwise_and_recurrent_forms_agree():
    q, k, v, pos = qkv()
    valid = jnp.arange(37)[None, :] < jnp.array([[37], [29]])  # the second row is right-padded
    lam = R.decay_rates(4)
    empty = R.empty_state(2, 4, 12, 24)
    parallel, final = R.retain_chunk(q, k, v, R.plan(pos, valid, empty.count, lam), None)
    keep = np.asarray(valid)[:, :, None, None]
    # the reference's parallel form, in float64 numpy: row-normalised decay, |row-sum| normaliser
    for row, n in enumerate((37, 29)):
        i = np.arange(n)
        lam64 = np.log1p(-(2.0 ** (-5.0 - np.arange(4))))
        dec = np.where(i[:, None] >= i[None, :], np.exp((i[:, None] - i[None, :])[None] * lam64[:, None, None]), 0.0)
        dec /= np.sqrt(dec.sum(-1, keepdims=True))
        a = np.einsum("ihd,jhd->hij", *(np.asarray(x[row, :n], np.float64) for x in (q, k))) * dec
        a /= np.maximum(np.abs(a.sum(-1, keepdims=True)), 1.0)
        want = np.einsum("hij,jhe->ihe", a, np.asarray(v[row, :n], np.float64))
        np.testing.assert_allclose(np.asarray(parallel[row, :n]), want, atol=1e-5)
    chunked = jax.jit(R.chunked, static_argnums=(0, 8))
    for chunk in (1, 8, 36, 37):  # 1 is the recurrent form; 8 and 36 do not divide 37
        out, state = chunked(R.retain_chunk, q, k, v, pos, valid, empty, lam, chunk)
        np.testing.assert_allclose(np.where(keep, out, 0), np.where(keep, parallel, 0), atol=1e-5, err_msg=str(chunk))
        np.testing.assert_allclose(state.kv, final.kv, atol=1e-5, err_msg=str(chunk))
        np.testing.assert_allclose(state.k_sum, final.k_sum, atol=1e-5, err_msg=str(chunk))
        np.testing.assert_array_equal(state.count, [37, 29])
    # a state carried across calls (prefill, then steps) continues exactly
    head, st = chunked(R.retain_chunk, q[:, :20], k[:, :20], v[:, :20], pos[:, :20], valid[:, :20], empty, lam, 8)
    tail, st = chunked(R.retain_chunk, q[:, 20:], k[:, 20:], v[:, 20:], pos[:, 20:], valid[:, 20:], st, lam, 1)
    np.testing.assert_allclose(
        np.where(keep, jnp.concatenate([head, tail], 1), 0), np.where(keep, parallel, 0), atol=1e-5
    )
    np.testing.assert_allclose(st.kv, final.kv, atol=1e-5)


def test_chunkwise_gradients_equal_parallel():
    """Training with `retention_chunk` > 0 differentiates the chunk scan: same gradients."""
    q, k, v, pos = qkv(s=29)
    valid = jnp.arange(29)[None, :] < jnp.array([[29], [20]])
    lam, empty, w = R.decay_rates(4), R.empty_state(2, 4, 12, 24), jnp.where(valid[..., None, None], 1.0, 0.0)

    def parallel(q, k, v):
        return (R.retain_chunk(q, k, v, R.plan(pos, valid, empty.count, lam), None, False)[0] * w).sum()

    def chunked(q, k, v):
        return (R.chunked(R.retain_chunk, q, k, v, pos, valid, empty, lam, 8)[0] * w).sum()

    want, got = jax.jit(jax.grad(parallel, (0, 1, 2)))(q, k, v), jax.jit(jax.grad(chunked, (0, 1, 2)))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_normaliser_is_detached():
    """No gradient flows through the |row-sum| normaliser: the gradient equals that of the output
    with the normaliser held constant."""
    q, k, v, pos = qkv(b=1, s=9)
    lam, valid = R.decay_rates(4), jnp.ones((1, 9), bool)
    p = R.plan(pos, valid, jnp.zeros((1,), jnp.int32), lam)
    g = jax.grad(lambda q: R.retain_chunk(q, k, v, p, None, want_state=False)[0].sum())(q)
    scores = jnp.einsum("bihd,bjhd->bhij", q, k) * p.decay_BHCC
    denom = jnp.maximum(jnp.abs(scores.sum(-1) * p.inv_norm_BHC), 1.0)

    def held(q):
        s = jnp.einsum("bihd,bjhd->bhij", q, k) * p.decay_BHCC
        return (jnp.einsum("bhij,bjhe->bhie", s, v) * (p.inv_norm_BHC / denom)[..., None]).sum()

    np.testing.assert_allclose(g, jax.grad(held)(q), atol=1e-5)


@pytest.mark.parametrize("variant", ["fork", "torchscale"])
def test_chunkwise_teacher_forcing_equals_parallel(variant):
    from test_model import random_batch

    parallel = init_model(
        ModelConfig(arch="retnet", d_model=32, n_heads=4, n_layers=2, n_tokens=64, retnet_variant=variant), 0
    )
    batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(0), [(7, 9, 30), (12, 5, 21)]).items()}
    levels = jnp.array([0, 3])
    want, valid = jit_forward(parallel)(batch, levels)
    for chunk in (5, 16):
        chunked = init_model(dataclasses.replace(parallel.cfg, retention_chunk=chunk), 0)
        got, _ = jit_forward(chunked)(batch, levels)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=str(chunk))


@pytest.mark.parametrize("variant,chunk", [("fork", 0), ("torchscale", 16)])
def test_recurrent_decoding_equals_teacher_forced_parallel(variant, chunk):
    """Greedy decoding from the recurrent state gives the tokens and logits of full parallel
    recomputation at every step, and each step's logits are the teacher-forced logits."""
    model = init_model(tiny(retnet_variant=variant, retention_chunk=chunk), 1)
    dec = D.Decoder(model)
    inputs = utterances(1)
    settings = dataclasses.replace(GREEDY, ar_temp=1.0, seed=2)
    rec = dec.ar(inputs, settings, keep_logits=True)
    full = dec.ar(inputs, settings, cached=False, keep_logits=True)
    np.testing.assert_array_equal(np.asarray(rec.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(rec.logits)[:, :40], np.asarray(full.logits)[:, :40], atol=1e-5)
    length = np.asarray(rec.length)
    batch = {
        "text": inputs.text,
        "text_len": inputs.text_len,
        "lang": inputs.lang,
        "prompt": inputs.prompt,
        "prompt_len": inputs.prompt_len,
        "resp": np.asarray(rec.tokens)[:, :40, None],
        "resp_len": length,
    }
    logits, _ = jit_forward(model)({k: jnp.asarray(v) for k, v in batch.items()}, jnp.zeros((3,), jnp.int32))
    plen = np.asarray(inputs.text_len) + np.asarray(inputs.prompt_len) + 4
    for i in range(3):
        tf = np.asarray(logits)[i, plen[i] - 1 : plen[i] - 1 + length[i]]
        np.testing.assert_allclose(np.asarray(rec.logits)[i, : length[i]], tf, atol=2e-5)


def test_nar_continues_the_prefix_state_and_beams_reorder_it():
    dec = D.Decoder(init_model(tiny(), 2))
    inputs = utterances(3)
    ar = dec.ar(inputs, GREEDY)
    knobs = D.Knobs.of(GREEDY, 3, ar=False)
    r = int(np.asarray(ar.length).max())
    start = D.NarStart(ar.state[0], ar.tokens[:, :r], ar.length, jnp.asarray(7))
    plan, key = D.NarPlan(sign_aware=True), jax.random.key(0)
    from_state = dec._nar(dec.params, inputs, start, knobs, key, plan=plan)
    recomputed = dec._nar(dec.params, inputs, start._replace(cache=None), knobs, key, plan=plan)
    np.testing.assert_array_equal(np.asarray(from_state), np.asarray(recomputed))
    beams = dec.ar(inputs, dataclasses.replace(GREEDY, beam_width=3))  # beams gather states by row
    assert np.asarray(beams.length).tolist() == [40, 40, 40]
    with pytest.raises(D.DecodeError, match="recurrent state"):
        dec.ar(inputs, dataclasses.replace(GREEDY, max_ar_context=10))


def state_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_decoding_memory_does_not_grow_with_length():
    """The state a retnet decode carries is the same size for 75 and 900 frames (a KV cache grows)."""
    inputs = utterances(4, sizes=((10, 30),))
    knobs = D.Knobs.of(GREEDY, 1)
    sizes = {}
    for arch in ("retnet", "llama"):
        dec = D.Decoder(init_model(ModelConfig(arch=arch, d_model=48, n_heads=4, n_layers=2), 0))
        for steps in (75, 900):  # the shapes of what the jitted AR returns (traced, not compiled)
            run = dec.ar_call(GREEDY, dec.n_slots(steps))
            sizes[arch, steps] = state_bytes(jax.eval_shape(run, dec.params, inputs, knobs, jax.random.key(0)).state[0])
    assert sizes["retnet", 75] == sizes["retnet", 900]
    assert sizes["llama", 900] > 5 * sizes["llama", 75]


def test_bfloat16_retnet_decodes():
    dec = D.Decoder(init_model(tiny(dtype="bfloat16"), 0))
    out = dec.generate(utterances(5), dataclasses.replace(GREEDY, max_ar_steps=10))
    assert [c.shape for c in out.codes] == [(10, 8)] * 3


def test_config_rejects_what_retnet_cannot_do():
    with pytest.raises(ConfigError, match="causal at every level"):
        tiny(bidirectional_nar=True)
    with pytest.raises(ConfigError, match="retnet_variant"):
        tiny(retnet_variant="torchscale-0.2")


# ---- the reference fork's checkpoint layout (reference.md §3.2, §8.4) ----------------------------------


def fork_state_dict(rng, d=32, h=4, n=2, v=64, prefix="model."):
    """A random AR+NAR state dict with the fork's key names and shapes, its buffers included."""
    f, s = 4 * d, {}
    w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    s.update(
        {
            "sep": w(d),
            "text_emb.weight": w(v, d),
            "langs_emb.weight": w(1, d),
            "tasks_emb.weight": w(8, d),
            "classifier.weight": w(v + 1, d),
            "classifier.bias": w(v + 1),
            "resps_emb.embeddings.0.weight": w(v + 1, d),
        }
    )
    s.update({f"proms_emb.embeddings.{k}.weight": w(v, d) for k in range(8)})
    s.update({f"resps_emb.embeddings.{k}.weight": w(v, d) for k in range(1, 8)})
    for i in range(n):
        b = f"{prefix}layers.{i}."
        for name, rows in (("q", d), ("k", d), ("v", 2 * d), ("g", 2 * d)):
            s[b + f"retention.{name}_proj.weight"], s[b + f"retention.{name}_proj.bias"] = w(rows, d), w(rows)
        s[b + "retention.out_proj.weight"], s[b + "retention.out_proj.bias"] = w(d, 2 * d), w(d)
        for norm, width in (("retention_layer_norm", d), ("final_layer_norm", d), ("ffn.ffn_layernorm", f)):
            s[b + norm + ".weight"], s[b + norm + ".bias"] = 1 + w(width), w(width)
        s[b + "ffn.fc1.weight"], s[b + "ffn.fc1.bias"] = w(f, d), w(f)
        s[b + "ffn.fc2.weight"], s[b + "ffn.fc2.bias"] = w(d, f), w(d)
    s[prefix + "layer_norm.weight"], s[prefix + "layer_norm.bias"] = 1 + w(d), w(d)
    s[prefix + "retnet_rel_pos.angle"] = np.repeat(1.0 / 1e4 ** np.linspace(0, 1, d // h // 2), 2).astype(np.float32)
    s[prefix + "retnet_rel_pos.decay"] = np.log(1 - 2.0 ** (-5 - np.arange(h))).astype(np.float32)
    return s


def fork_backbone_numpy(s, x, h):
    """The fork's decoder on embedded inputs x [S, d], float64, transcribed from reference.md §3.2."""
    ln = lambda x, w, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w + b  # noqa
    gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))  # noqa: E731
    g = lambda k: np.asarray(s["model." + k], np.float64)  # noqa: E731
    t, d = x.shape
    dk = d // h
    n_pos = np.arange(t)
    angle, decay = g("retnet_rel_pos.angle"), g("retnet_rel_pos.decay")
    sin, cos = np.sin(n_pos[:, None] * angle), np.cos(n_pos[:, None] * angle)
    mask = np.where(
        n_pos[:, None] >= n_pos[None, :], np.exp((n_pos[:, None] - n_pos[None, :])[None] * decay[:, None, None]), 0
    )
    mask /= np.sqrt(mask.sum(-1, keepdims=True))

    def rot(u):  # [T, H, dk]; pairs (x1, x2) -> (-x2, x1)
        r = np.stack([-u[..., 1::2], u[..., ::2]], -1).reshape(u.shape)
        return u * cos[:, None] + r * sin[:, None]

    layer = 0
    while f"model.layers.{layer}.ffn.fc1.weight" in s:
        p = lambda k: g(f"layers.{layer}." + k)  # noqa: E731
        lin = lambda u, name: u @ p(name + ".weight").T + p(name + ".bias")  # noqa: E731
        hdn = ln(x, p("retention_layer_norm.weight"), p("retention_layer_norm.bias"))
        q = rot(lin(hdn, "retention.q_proj").reshape(t, h, dk))
        k = rot((lin(hdn, "retention.k_proj") * dk**-0.5).reshape(t, h, dk))
        v = lin(hdn, "retention.v_proj").reshape(t, h, 2 * dk)
        a = np.einsum("ihd,jhd->hij", q, k) * mask
        a /= np.maximum(np.abs(a.sum(-1, keepdims=True)), 1)
        o = np.einsum("hij,jhe->ihe", a, v)
        o = ln(o, 1.0, 0.0).reshape(t, 2 * d)  # the group norm: per head, no parameters
        gate = lin(hdn, "retention.g_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * o, "retention.out_proj")
        hdn = ln(x, p("final_layer_norm.weight"), p("final_layer_norm.bias"))
        f = ln(gelu(lin(hdn, "ffn.fc1")), p("ffn.ffn_layernorm.weight"), p("ffn.ffn_layernorm.bias"))
        x = x + lin(f, "ffn.fc2")
        layer += 1
    return ln(x, g("layer_norm.weight"), g("layer_norm.bias"))


def test_fork_checkpoint_converts_and_runs(tmp_path):
    import torch

    state = fork_state_dict(np.random.default_rng(0))
    legacy = {
        ("retnet." + k[len("model.") :] if k.startswith("model.") else k): torch.from_numpy(v) for k, v in state.items()
    }  # old checkpoints named the backbone `retnet.`
    torch.save({"module": legacy}, tmp_path / "fp32.pth")
    convert(tmp_path / "fp32.pth", tmp_path / "m", arch="retnet")  # tools.convert_reference's work
    model, cfg, _ = load_model(tmp_path / "m")
    assert (cfg.arch, cfg.retnet_variant, cfg.n_heads, cfg.d_model, cfg.n_layers) == ("retnet", "fork", 4, 32, 2)
    x = np.random.default_rng(1).standard_normal((1, 23, 32)).astype(np.float32)
    pos, valid = jnp.arange(23)[None], jnp.ones((1, 23), bool)
    ours = jit_method(model, lambda m, x: m.backbone(x, pos, valid, jnp.ones((1,), bool))[0])(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours[0]), fork_backbone_numpy(state, x[0].astype(np.float64), 4), atol=1e-4)
    back = to_reference(from_reference(state, cfg), cfg)
    assert set(back) == set(state) - {"tasks_emb.weight"}
    for k, v in back.items():
        np.testing.assert_allclose(v, state[k], rtol=1e-6, err_msg=k)
    out = D.Decoder(model).generate(
        utterances(6, sizes=((9, 20),), vocab=64), dataclasses.replace(GREEDY, max_ar_steps=12)
    )
    assert out.codes[0].shape == (12, 8) and out.codes[0].max() < 64


def test_converter_checks_the_buffers():
    state = fork_state_dict(np.random.default_rng(0))
    cfg = infer_config(state)
    assert (cfg.arch, cfg.retnet_variant, cfg.n_heads) == ("retnet", "fork", 4)  # heads from the decay buffer
    state["model.retnet_rel_pos.decay"] = state["model.retnet_rel_pos.decay"] * 2
    with pytest.raises(ValueError, match="retnet_rel_pos.decay differs"):
        from_reference(state, cfg)


def test_sharded_training_step_equals_single_device():
    """A retnet train step on a (data 2, fsdp 2, tensor 2) mesh of 8 fake devices equals the step on
    one device (parameters sharded by the logical-axis rules, the batch over data and fsdp)."""
    import optax
    from flax import nnx
    from test_model import random_batch

    from configs import base
    from valle_jax.config import mesh_config
    from valle_jax.training.sharding import batch_sharding, make_mesh, param_shardings
    from valle_jax.training.step import abstract_model, init_params, make_train_step

    cfg = ModelConfig(arch="retnet", d_model=32, n_heads=4, n_layers=2, n_tokens=64, dropout=0.1)
    abstract = abstract_model(cfg)
    tx = optax.sgd(0.5)  # the update is the gradient itself (Adam's first step is ~lr * sign(g): noise-sensitive)
    params = init_params(cfg, 0)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(1)),
    }
    batch = random_batch(np.random.default_rng(2), [(7, 9, 30), (12, 5, 21), (5, 8, 12), (9, 9, 9)])
    batch = {k: jnp.asarray(v) for k, v in batch.items()} | {"row_valid": jnp.ones((4,), bool)}
    step = jax.jit(make_train_step(nnx.graphdef(abstract), cfg, tx))
    single, m1 = step(state, batch, jnp.float32(1.0))
    mcfg = dataclasses.replace(mesh_config(base.get_config()), shape=(2, 2, 2))
    mesh = make_mesh(mcfg)
    p_sh = param_shardings(abstract, mesh, mcfg)
    assert p_sh["backbone"]["v"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    sharded_state = dict(state, params=jax.device_put(params, p_sh), opt_state=tx.init(jax.device_put(params, p_sh)))
    sharded, m8 = step(sharded_state, jax.device_put(batch, batch_sharding(mesh, mcfg)), jnp.float32(1.0))
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    assert len(sharded["params"]["backbone"]["v"].addressable_shards) == 8
    moved = 0.0
    for a, b, p in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(p)).max()))
    assert moved > 1e-3  # the step did change the parameters


def test_remat_rolled_scan_and_dropout():
    """Remat and a rolled layer scan give the same gradients; dropout keys change the output."""
    from test_model import loss_grads, random_batch

    b = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(2), [(6, 8, 10)]).items()}
    lv = jnp.array([0])
    base = ModelConfig(arch="retnet", d_model=32, n_heads=4, n_layers=2, n_tokens=64, retention_chunk=8)

    g1, g2 = loss_grads(base, b, lv), loss_grads(dataclasses.replace(base, remat=True, scan_unroll=1), b, lv)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6), g1, g2)
    drop = jit_method(init_model(base, 4), lambda m, key: m(b, lv, dropout_key=key)[0])
    d1, d2 = drop(jax.random.key(0)), drop(jax.random.key(1))
    assert not np.allclose(np.asarray(d1), np.asarray(d2))
