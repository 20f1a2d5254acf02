"""BitNet b1.58 (valle_jax.ternary, arch "bitnet", model.bitnet): ternary weights and 8-bit
activations, the straight-through gradients, the packed 2-bit layout (the kernel, XLA, the
decoder), training on the mesh, export round trip, synthesis (CLI and API) from an exported model,
parameter counts."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_training import make_trainer, run_steps, test_config

from valle_jax import backend, kernels, ternary
from valle_jax import decoding as D
from valle_jax.checkpointing import load_model, params_of
from valle_jax.config import SIZES, ConfigError, ModelConfig
from valle_jax.data.batch import pad_batch
from valle_jax.export import export
from valle_jax.models import init_model
from valle_jax.models.valle import parameter_counts
from valle_jax.training.step import batch_loss


def tiny(**kw):
    return ModelConfig(**{"arch": "bitnet", "d_model": 48, "n_heads": 4, "n_layers": 2, "n_tokens": 64, **kw})


def test_quantised_weights_are_ternary_times_the_mean_scale():
    w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * jnp.arange(1.0, 4.0)[:, None, None]
    q = ternary.TernaryWeight.of(w, 1, stacked=True)
    scale = np.abs(np.asarray(w)).mean((1, 2))  # one scale per layer's matrix
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    assert set(np.unique(np.asarray(q.values))) == {-1.0, 0.0, 1.0}
    s = np.asarray(q.scale)[:, None, None]
    t = np.round(np.clip(np.asarray(w) / s, -1, 1))
    np.testing.assert_array_equal(np.asarray(q.values), t)
    np.testing.assert_array_equal(np.asarray(q.dequantized()), t * s)  # exactly {-1, 0, 1} x the scale
    # activations: per token, absmax to 127, integers in [-128, 127]
    x = jax.random.normal(jax.random.key(1), (5, 2, 8)) * 3.0
    xq, s = ternary.quantize_activations(x, 2)
    assert s.shape == (5,) and np.all(np.asarray(xq) == np.round(np.asarray(xq)))
    np.testing.assert_array_equal(np.abs(np.asarray(xq)).max((1, 2)), 127.0)
    np.testing.assert_allclose(np.asarray(xq) / np.asarray(s)[:, None, None], np.asarray(x), atol=3 * 3.0 / 127)


def test_gradients_pass_straight_through():
    w = jax.random.normal(jax.random.key(2), (16, 8))
    x = jax.random.normal(jax.random.key(3), (4, 16))
    g = jax.random.normal(jax.random.key(4), (4, 8))

    def bit(x, w):
        return (backend.linear("mk,kn->mn", x, ternary.TernaryWeight.of(w, 1), jnp.float32) * g).sum()

    dx, dw = jax.grad(bit, argnums=(0, 1))(x, w)
    wq = ternary.TernaryWeight.of(w, 1).dequantized()
    xq, s = ternary.quantize_activations(x)
    xq = xq / s[:, None]
    # y = xq @ wq, and the rounding is the identity to the gradient: dx = g wq^T, dw = xq^T g
    np.testing.assert_allclose(np.asarray(dx), np.asarray(g @ wq.T), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(xq.T @ g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(arch="transformer"), dict(arch="retnet", retnet_variant="torchscale")])
def test_bitnet_flag_makes_every_backbone_matmul_bitlinear(kw):
    cfg = tiny(bitnet=True, dropout=0.0, n_layers=1, d_model=32, **kw)
    model = init_model(cfg, 0)
    names = [k for k in model.backbone.layer_params if k in model.backbone.STEP_MATMULS]
    assert all(isinstance(model.backbone.stacked()[k], ternary.TernaryWeight) for k in names)
    rng = np.random.default_rng(0)
    texts, prompts, resps = [rng.integers(1, 60, 9)], [rng.integers(0, 64, (10, 8))], [rng.integers(0, 64, (12, 8))]
    batch = {k: jnp.asarray(v) for k, v in pad_batch(texts, [0], prompts, resps).items()}
    batch["row_valid"] = jnp.ones((1,), bool)
    graph, params = nnx.split(model)[0], params_of(model)
    (loss, _), grads = jax.jit(
        lambda p: jax.value_and_grad(batch_loss, argnums=1, has_aux=True)(
            graph, p, batch, jax.random.key(0), cfg, (), True
        )
    )(params)
    assert np.isfinite(float(loss))
    for k in names:  # every BitLinear weight learns (through the straight-through estimator)
        assert float(jnp.abs(grads["backbone"][k]).sum()) > 0, k


def test_packed_layout_and_kernel_are_exact():
    rng = np.random.default_rng(0)
    t = rng.integers(-1, 2, (70, 45)).astype(np.float32)  # 45 columns: a part panel
    bits = ternary.pack(jnp.asarray(t))
    assert bits.shape == (2, 70, 2) and bits.dtype == jnp.uint32
    assert bits.nbytes == ternary.packed_bytes(70, 45) and bits.nbytes * 16 >= t.nbytes
    np.testing.assert_array_equal(np.asarray(ternary.unpack(bits, 45)), t)
    x = rng.integers(-128, 128, (3, 70)).astype(np.float32)
    for isa in kernels.isas() if kernels.available() else []:  # every build this CPU runs
        y = kernels.rows_linear(jnp.asarray(x), bits, 45, isa=isa)
        np.testing.assert_array_equal(np.asarray(y), x @ t)
    # a StepWeight over the packed bits computes what the teacher-forced BitLinear does
    w = jax.random.normal(jax.random.key(5), (256, 4, 64))
    tw = ternary.TernaryWeight.of(w, 1)
    xs = jax.random.normal(jax.random.key(6), (2, 1, 256))
    ref = backend.linear("bsd,dhk->bshk", xs, tw, jnp.float32)
    for kernel in (True, False):
        sw = backend.StepWeight.of_ternary(tw.values, tw.scale, 1, kernel)
        np.testing.assert_array_equal(np.asarray(backend.linear("bsd,dhk->bshk", xs, sw, jnp.float32)), np.asarray(ref))
        unpacked = backend.linear("bsd,dhk->bshk", xs, sw.unpacked(), jnp.float32)
        np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(ref))


GREEDY = D.Settings(max_ar_steps=8, ar_temp=0.0, nar_temp=0.0)


def test_packed_decoding_equals_unpacked_logits():
    # wide enough that the step products run the kernel (kernels.MIN_WEIGHT_ELEMENTS)
    model = init_model(tiny(d_model=128, n_kv_heads=2, n_layers=1), 1)
    dec = D.Decoder(model)
    w = dec.step_layers[0]["ffn_in"]
    assert w.is_ternary and w.w_PKC.dtype == jnp.uint32 and w.elements >= kernels.MIN_WEIGHT_ELEMENTS
    rng = np.random.default_rng(1)
    inputs = D.make_inputs([list(rng.integers(1, 60, 10))], [rng.integers(0, 64, (30, 8))], [0], 8)
    packed = dec.ar(inputs, GREEDY, keep_logits=True)  # steps over the packed bits
    latent = dec.ar(inputs, GREEDY, cached=False, keep_logits=True)  # every step recomputed from the latents
    np.testing.assert_array_equal(np.asarray(packed.tokens), np.asarray(latent.tokens))
    n = GREEDY.max_ar_steps
    np.testing.assert_allclose(np.asarray(packed.logits)[:, :n], np.asarray(latent.logits)[:, :n], atol=1e-4)


@pytest.mark.needs_espeak
def test_tiny_bitnet_trains_on_the_mesh(store_path, tmp_path):
    cfg = test_config(store_path, **{"model.arch": "bitnet", "optim.learning_rate": 3e-3})
    cfg.mesh.shape = (2, 2, 2)
    trainer = make_trainer(cfg, tmp_path / "run")
    _, losses = run_steps(trainer, 8)
    trainer.checkpoints.close()
    assert np.all(np.isfinite(losses)) and np.mean(losses[-2:]) < losses[0] - 0.3, losses


def test_export_keeps_the_weights_packed(tmp_path):
    cfg = tiny(n_kv_heads=2, n_layers=1)
    model = init_model(cfg, 3)
    out = export(params_of(model), cfg, {"a": 1}, {}, tmp_path / "model")
    loaded, cfg2, _ = load_model(out)
    assert cfg2 == cfg
    a, b = model.backbone.stacked(), loaded.backbone.stacked()
    for k in model.backbone.STEP_MATMULS:
        np.testing.assert_array_equal(np.asarray(a[k].values), np.asarray(b[k].values))
        np.testing.assert_allclose(np.asarray(a[k].scale), np.asarray(b[k].scale), rtol=2e-5)
    # on disk: 2 bits a BitLinear weight where its float32 latent took 32
    params = params_of(model)
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bit_bytes = sum(params["backbone"][k].nbytes for k in model.backbone.STEP_MATMULS)
    on_disk = sum(f.stat().st_size for f in (Path(out) / "params").rglob("*") if f.is_file())
    assert on_disk < float_bytes - bit_bytes * 15 / 16 + 64 * 1024, (on_disk, float_bytes, bit_bytes)
    with pytest.raises(ValueError, match="no reference layout"):
        export(params_of(model), cfg, {"a": 1}, {}, tmp_path / "ref.pth")


BITNET_COUNTS = {"quarter": 14_164_225, "half": 47_201_793, "full": 169_900_033}


@pytest.mark.parametrize("size", sorted(BITNET_COUNTS))
def test_parameter_counts(size):
    d, h, n = SIZES[size]
    llama = parameter_counts(ModelConfig(arch="llama", d_model=d, n_heads=h, n_layers=n))
    bit = parameter_counts(ModelConfig(arch="bitnet", d_model=d, n_heads=h, n_layers=n))
    assert bit == (BITNET_COUNTS[size],) * 2
    assert llama[0] - bit[0] == n * 4 * d * d  # BitFeedForward is ungated: one 4d matrix fewer a layer
    assert parameter_counts(ModelConfig(arch="llama", d_model=d, n_heads=h, n_layers=n, bitnet=True)) == llama
    assert ModelConfig(arch="bitnet").bitlinear and not ModelConfig(arch="llama").bitlinear
    with pytest.raises(ConfigError, match="dense backbones"):
        ModelConfig(arch="mixtral", bitnet=True)


@pytest.mark.needs_espeak
def test_synthesis_cli_and_api_read_an_exported_bitnet(codec_dir, corpus, tmp_path):
    """A BitNet exported as a model directory (its BitLinear weights packed, 2 bits each) synthesises
    through the CLI and the API, and the API's greedy codes from the packed directory are those of the
    same model's decoder over its float latents: packing loses nothing end to end."""
    import soundfile as sf

    from valle_jax import synthesize
    from valle_jax.audio import HOP_LENGTH
    from valle_jax.data.text import reference_symmap
    from valle_jax.tts import TTS

    voice = str(sorted(corpus.rglob("*.wav"))[0])
    greedy = dict(max_ar_steps=12, ar_temp=0.0, nar_temp=0.0)
    cfg = tiny(n_kv_heads=2, n_tokens=1024)
    model = init_model(cfg, 0)
    out = export(params_of(model), cfg, reference_symmap(), {}, tmp_path / "model")
    args = ["Hello world.", voice, "--checkpoint", str(out), "--codec-dir", str(codec_dir)]
    args += ["--max-ar-steps", "12", "--ar-temp", "0", "--nar-temp", "0", "--out", str(tmp_path / "out.wav")]
    assert synthesize.main(args) == 0
    assert len(sf.read(tmp_path / "out.wav")[0]) == 12 * HOP_LENGTH
    tts = TTS.load(out, codec_dir=codec_dir)
    packed = tts.generate_codes(["Hello world."], [voice], **greedy)[0]
    assert packed.shape == (12, cfg.n_resp_levels) and len(np.unique(packed)) > 12  # not a degenerate decode
    # the same decoder (its compiled steps reused) over the exported model's own float latents
    tts.decoder.params = nnx.split(model)[1]
    own = tts.generate_codes(["Hello world."], [voice], **greedy)[0]
    np.testing.assert_array_equal(packed, own)
