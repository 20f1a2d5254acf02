"""The two backbones, each a stack of identical layers stored with a leading "layers" axis and run
with `lax.scan` (the KV cache carries a layer axis too). `model.scan_unroll` sets how many layers
one loop iteration holds: fully unrolled by default (faster and leaner on CPU, compile time grows
with depth), 1 for one compiled layer body whatever the depth.

transformer (SPEC §3.1): pre-LayerNorm, fused qkv without bias, exact GELU FFN with biases, outputs
multiplied by the validity mask after every sub-layer, no final norm. Positions are added to the
embeddings by the caller (sinusoidal).
llama (SPEC §3.3): RMSNorm, q/k/v/o without biases, rotate-half RoPE, gated GELU FFN, final RMSNorm;
grouped-query attention when n_kv_heads < n_heads.

`__call__(x, positions, valid, causal, cache=None, dropout_key=None)`: `cache=None` is teacher
forcing over the given sequence; with a cache (see `init_cache`) the new positions are written at
slot `cache["index"]` and attend to everything cached so far.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from valle_jax.config import ModelConfig
from valle_jax.models import layers as L
from valle_jax.models.attention import flash_attend

Array = jax.Array
normal = jax.nn.initializers.normal
ones, zeros = jax.nn.initializers.ones, jax.nn.initializers.zeros


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots: k, v (one [B, G, K, Dh] buffer per layer: the layout
    the attention contractions read without transposing), key positions, validity, and the slot
    the next positions are written at."""
    k_shape = (batch, cfg.kv_heads, cfg.head_dim, length)
    v_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    return {"k": tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
            "v": tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
            "pos": jnp.zeros((batch, length), jnp.int32), "valid": jnp.zeros((batch, length), bool),
            "index": jnp.zeros((), jnp.int32)}


def _mm(x: Array, w: Array, spec: str, dtype) -> Array:
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class Backbone(nnx.Module):
    """Shared scan/cache plumbing; subclasses define `layer` and their stacked parameters."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def final(self, x: Array) -> Array:
        return x

    def __call__(self, x_BSD: Array, positions_BS: Array, valid_BS: Array, causal_B: Array,
                 cache: dict | None = None, dropout_key: Array | None = None, layers: list[dict] | None = None):
        cfg = self.cfg
        n = cfg.n_layers
        keys = jax.random.split(dropout_key, n) if dropout_key is not None else None
        # unrolled, XLA schedules and frees each layer's buffers on its own: on CPU the half preset's
        # training step ran 13% faster and its peak memory halved against a rolled loop
        unroll = n if cfg.scan_unroll == 0 else min(cfg.scan_unroll, n)
        x = x_BSD.astype(jnp.float32)
        if cache is None:
            if cfg.attention == "blocked":
                def attend(q, k, v, rate, key):
                    return flash_attend(q, k, v, positions_BS, positions_BS, valid_BS, causal_B, rate, key)
            else:
                mask = L.attention_mask(positions_BS, positions_BS, valid_BS, causal_B)

                def attend(q, k, v, rate, key):
                    return L.attend(q, k, v, mask, rate, key)

            def step(x, xs):
                p, key = xs
                return self.layer(p, x, positions_BS, valid_BS, attend, key), None

            if cfg.remat:
                step = jax.checkpoint(step)
            x, _ = jax.lax.scan(step, x, (self.stacked(), keys), length=n, unroll=unroll)
            return self.final(x), None

        # With a cache (decoding), the layers run as a Python loop over per-layer parameters and
        # per-layer cache buffers, so that inside a decoding loop no array is sliced or rebuilt: a
        # stacked [layers, ...] cache made XLA copy all of it at every step, and slicing stacked
        # weights copied them (quarter preset, batch 1: 13 -> 7.7 ms per step). Pass `layers` (from
        # `unstack`, computed once outside the loop) to keep that slicing out of the loop too. Each
        # layer writes its new keys/values into its buffer in place, then attends to the buffer.
        layers = layers if layers is not None else self.unstack()
        idx = cache["index"]
        k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BS.astype(jnp.int32), idx, axis=1)
        k_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BS, idx, axis=1)
        mask = L.attention_mask(positions_BS, k_pos, k_valid, causal_B)
        ks, vs = list(cache["k"]), list(cache["v"])
        for i, p in enumerate(layers):
            def cached_attend(q, k, v, rate, key, i=i):
                ks[i], vs[i] = L.update_cache(ks[i], vs[i], k, v, idx)
                return L.attend_cache(q, ks[i], vs[i], mask)

            x = self.layer(p, x, positions_BS, valid_BS, cached_attend, None if keys is None else keys[i])
        new_cache = {"k": tuple(ks), "v": tuple(vs), "pos": k_pos, "valid": k_valid, "index": idx + x_BSD.shape[1]}
        return self.final(x), new_cache

    def stacked(self) -> dict:
        """The layer parameters, each with a leading layers axis."""
        return {name: v[...] for name, v in vars(self).items()
                if isinstance(v, nnx.Param) and v.logical_axes[0] == "layers"}

    def unstack(self) -> list[dict]:
        """The stacked layer parameters as one dict per layer (for decoding loops)."""
        stacked = self.stacked()
        return [{k: a[i] for k, a in stacked.items()} for i in range(self.cfg.n_layers)]


class TransformerBackbone(Backbone):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg)
        n, d, h, dh, f = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.ffn_mult * cfg.d_model
        lin = L.torch_linear_init
        self.attn_norm_scale = L.param(rngs, ones, (n, d), ("layers", "embed"))
        self.attn_norm_bias = L.param(rngs, zeros, (n, d), ("layers", "embed"))
        self.qkv = L.param(rngs, lin(d), (n, d, 3, h, dh), ("layers", "embed", None, "heads", "head_dim"))
        self.out = L.param(rngs, lin(d), (n, h, dh, d), ("layers", "heads", "head_dim", "embed"))
        self.out_bias = L.param(rngs, lin(d), (n, d), ("layers", "embed"))
        self.ffn_norm_scale = L.param(rngs, ones, (n, d), ("layers", "embed"))
        self.ffn_norm_bias = L.param(rngs, zeros, (n, d), ("layers", "embed"))
        self.ffn_in = L.param(rngs, lin(d), (n, d, f), ("layers", "embed", "mlp"))
        self.ffn_in_bias = L.param(rngs, lin(d), (n, f), ("layers", "mlp"))
        self.ffn_out = L.param(rngs, lin(f), (n, f, d), ("layers", "mlp", "embed"))
        self.ffn_out_bias = L.param(rngs, lin(f), (n, d), ("layers", "embed"))

    def layer(self, p, x, positions, valid, attend, key):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        m = valid[..., None].astype(jnp.float32)
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        h = L.layer_norm(x, p["attn_norm_scale"], p["attn_norm_bias"], cfg.eps) * m
        qkv = _mm(h, p["qkv"], "bsd,dthk->bsthk", dt)
        k, v = qkv[:, :, 1].astype(dt), qkv[:, :, 2].astype(dt)
        o = attend(qkv[:, :, 0].astype(dt), k, v, 0.0, None)  # no dropout on probabilities (SPEC §3.1)
        o = (_mm(o, p["out"], "bshk,hkd->bsd", dt) + p["out_bias"]) * m
        x = (x + L.dropout(o, cfg.dropout, keys[0])) * m
        h = L.layer_norm(x, p["ffn_norm_scale"], p["ffn_norm_bias"], cfg.eps) * m
        f = jax.nn.gelu(_mm(h, p["ffn_in"], "bsd,df->bsf", dt) + p["ffn_in_bias"], approximate=False)
        f = _mm(L.dropout(f, cfg.dropout, keys[1]), p["ffn_out"], "bsf,fd->bsd", dt) + p["ffn_out_bias"]
        return (x + L.dropout(f, cfg.dropout, keys[2])) * m


class LlamaBackbone(Backbone):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg)
        n, d, h, g, dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        f = cfg.ffn_mult * d
        init = normal(0.02)  # HF Llama's initializer_range
        self.attn_norm = L.param(rngs, ones, (n, d), ("layers", "embed"))
        self.q = L.param(rngs, init, (n, d, h, dh), ("layers", "embed", "heads", "head_dim"))
        self.k = L.param(rngs, init, (n, d, g, dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = L.param(rngs, init, (n, d, g, dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = L.param(rngs, init, (n, h, dh, d), ("layers", "heads", "head_dim", "embed"))
        self.mlp_norm = L.param(rngs, ones, (n, d), ("layers", "embed"))
        self.gate = L.param(rngs, init, (n, d, f), ("layers", "embed", "mlp"))
        self.up = L.param(rngs, init, (n, d, f), ("layers", "embed", "mlp"))
        self.down = L.param(rngs, init, (n, f, d), ("layers", "mlp", "embed"))
        self.final_norm = L.param(rngs, ones, (d,), ("embed",))

    def layer(self, p, x, positions, valid, attend, key):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        h = L.rms_norm(x, p["attn_norm"], cfg.eps)
        q = L.rope(_mm(h, p["q"], "bsd,dhk->bshk", dt), positions, cfg.rope_theta)
        k = L.rope(_mm(h, p["k"], "bsd,dgk->bsgk", dt), positions, cfg.rope_theta)
        v = _mm(h, p["v"], "bsd,dgk->bsgk", dt)
        k, v = k.astype(dt), v.astype(dt)
        o = attend(q.astype(dt), k, v, cfg.dropout, key)  # HF applies attention_dropout to probs
        x = x + _mm(o, p["o"], "bshk,hkd->bsd", dt)
        h = L.rms_norm(x, p["mlp_norm"], cfg.eps)
        ff = jax.nn.gelu(_mm(h, p["gate"], "bsd,df->bsf", dt), approximate=False) * _mm(h, p["up"], "bsd,df->bsf", dt)
        return x + _mm(ff, p["down"], "bsf,fd->bsd", dt)

    def final(self, x):
        return L.rms_norm(x, self.final_norm[...], self.cfg.eps)


def make_backbone(cfg: ModelConfig, rngs: nnx.Rngs) -> Backbone:
    return {"transformer": TransformerBackbone, "llama": LlamaBackbone}[cfg.arch](cfg, rngs)
