"""The backbones, each a stack of identical layers stored with a leading "layers" axis.

transformer (reference.md §3.1): pre-LayerNorm, fused qkv without bias, exact GELU FFN with biases, outputs
multiplied by the validity mask after every sub-layer, no final norm. Positions are added to the
embeddings by the caller (sinusoidal).
llama (reference.md §3.3): RMSNorm, q/k/v/o without biases, rotate-half RoPE, gated GELU FFN, final RMSNorm;
grouped-query attention when n_kv_heads < n_heads. mistral: the same with a sliding window.
mixtral (llama-family archs with experts > 1): the same attention, a sliding window, and a sparse
mixture of gated GELU experts in place of the FFN (valle_jax.models.moe).
retnet (reference.md §3.2): multi-scale retention (valle_jax.models.retention) in the reference fork's or
upstream torchscale's layout; its "cache" is a recurrent state per layer, not keys and values. With
experts > 1, torchscale's XMoE layer in place of every feed-forward (valle_jax.models.xmoe).

A layer is a function `layer(p, x, features, valid, mix, key, state) -> (x, state)`: `mix(q, k, v,
rate, key, state) -> (out, state)` mixes positions (attention or retention) and returns what it
changed of the layer's `state` (its KV buffers or recurrent state; None in teacher forcing).
Teacher forcing calls `layer_with_stats`, the layer plus what the training loss needs of it beyond x
(an MoE layer's router statistics; None elsewhere), and returns the auxiliary loss they give.

`__call__(x, positions, valid, causal, cache=None, dropout_key=None, layers=None, routing=None) -> (x, cache,
aux loss)` (`routing`: an xmoe.Mode, torchscale's train/eval mode for XMoE layers; others ignore it):
`cache=None` is teacher forcing over the given sequence, the layers run by `lax.scan` over the stacked parameters
(`model.scan_unroll` layers per iteration: fully unrolled by default, faster and leaner on CPU,
compile time grows with depth; 1 for one compiled layer body whatever the depth). With a cache (see
`init_cache`) the new positions are written at slot `cache["index"]` and attend to everything
cached so far (retnet: continue the state); the layers then run one after another over per-layer
parameters and per-layer buffers (`continue_cache` says why). What decoding needs of a cache beyond
that is a small protocol on the backbone: `init_cache`, `mark_prefix`, `nar_cache`, `reorder_cache`
(beams), `forget` (rolling context, where `has_window`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from valle_jax import backend, ternary
from valle_jax.config import ModelConfig
from valle_jax.models import layers as L
from valle_jax.models import moe, xmoe
from valle_jax.models import retention as R
from valle_jax.models.attention import flash_attend
from valle_jax.models.dense_attention import dense_attend
from valle_jax.models.feed_forward import feed_forward
from valle_jax.models.lora import LoraWeight

Array = jax.Array
normal = jax.nn.initializers.normal
ones, zeros = jax.nn.initializers.ones, jax.nn.initializers.zeros
HF_INIT = normal(0.02)  # HF's initializer_range (Llama, Mistral and Mixtral)


class KV(NamedTuple):
    """One layer's KV cache: keys [B*G, K, Dh] and values [B*G, Dh, K] (row b*G + g: batch row b,
    kv head g; why this layout: backend.attend_cache)."""

    k: Array
    v: Array


def init_cache(
    cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, layout: backend.CacheLayout | None = None
) -> dict:
    """An empty KV cache of `length` slots: per layer a KV in `dtype` (a storage dtype:
    backend.cache_storage), key positions and validity [B, K], the slot the next positions are
    written at, and the `layout` (which backend attends over it)."""
    k_shape = (batch * cfg.kv_heads, length, cfg.head_dim)
    v_shape = (batch * cfg.kv_heads, cfg.head_dim, length)
    return {
        "k": tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
        "v": tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
        "pos": jnp.zeros((batch, length), jnp.int32),
        "valid": jnp.zeros((batch, length), bool),
        "index": jnp.zeros((), jnp.int32),
        "layout": layout or backend.CacheLayout(),
    }


def _mm(x: Array, w: Array, spec: str, dtype) -> Array:
    return L.matmul(spec, x, w, dtype)


class Backbone(nnx.Module):
    """Shared scan/cache plumbing; subclasses define `layer`, their stacked parameters and
    `LAYER_PARAMS`, the names of those (each with a leading layers axis)."""

    has_window = True  # the cache holds every position, so a rolling context can mask old ones
    LAYER_PARAMS: tuple[str, ...] = ()
    STEP_MATMULS: dict[str, int] = {}  # the layer's matmul weights: name -> how many leading axes are contracted

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def final(self, x: Array) -> Array:
        return x

    def position_features(self, positions_BS: Array):
        """What each layer receives as `positions`: computed once per call, not once per layer."""
        return positions_BS

    def enter(self, x: Array, key: Array | None) -> Array:
        """What the backbone does to its input before the first layer."""
        return x

    def teacher_mixer(self, positions_BS: Array, valid_BS: Array, causal_B: Array):
        """`mix` over the whole given sequence (no cache: the state stays None)."""
        if self.cfg.attention == "blocked":

            def attend(q, k, v, rate, key, state=None):
                out = flash_attend(
                    q, k, v, positions_BS, positions_BS, valid_BS, causal_B, rate, key, window=self.cfg.window
                )
                return out, state

            return attend
        mask = L.attention_mask(positions_BS, positions_BS, valid_BS, causal_B, self.cfg.window)
        return lambda q, k, v, rate, key, state=None: (dense_attend(q, k, v, mask, rate, key), state)

    def __call__(
        self,
        x_BSD: Array,
        positions_BS: Array,
        valid_BS: Array,
        causal_B: Array,
        cache: dict | None = None,
        dropout_key: Array | None = None,
        layers: list[dict] | None = None,
        routing: xmoe.Mode | None = None,
    ):
        cfg = self.cfg
        n = cfg.n_layers
        keys = jax.random.split(dropout_key, n + 1) if dropout_key is not None else None
        x = self.enter(x_BSD.astype(jnp.float32), None if keys is None else keys[n])
        if cache is not None:
            x, cache = self.continue_cache(x, positions_BS, valid_BS, causal_B, cache, keys, layers or self.unstack())
            return x, cache, None
        # unrolled, XLA schedules and frees each layer's buffers on its own: on CPU the half preset's
        # training step ran 13% faster and its peak memory halved against a rolled loop
        unroll = n if cfg.scan_unroll == 0 else min(cfg.scan_unroll, n)
        mix = self.teacher_mixer(positions_BS, valid_BS, causal_B)
        features = self.teacher_features(positions_BS, valid_BS, routing)

        def step(x, xs):
            p, key = xs
            x, _, stats = self.layer_with_stats(p, x, features, valid_BS, mix, key)
            return x, stats

        if cfg.remat:
            step = jax.checkpoint(step)
        x, stats = jax.lax.scan(step, x, (self.stacked(), None if keys is None else keys[:n]), length=n, unroll=unroll)
        return self.final(x), None, self.aux_loss(stats, valid_BS)

    def teacher_features(self, positions_BS: Array, valid_BS: Array, routing: xmoe.Mode | None):
        """What each teacher-forced layer receives as `features` (XMoE adds how it routes)."""
        return self.position_features(positions_BS)

    def layer_with_stats(self, p, x, features, valid, mix, key, state=None):
        """`layer`, plus what the training loss needs of it beyond x (None: nothing)."""
        return (*self.layer(p, x, features, valid, mix, key, state), None)

    def aux_loss(self, stats, valid_BS: Array) -> Array:
        """The auxiliary training loss from every layer's stats (stacked by the layer scan)."""
        return jnp.zeros((), jnp.float32)

    def through_layers(self, x, features, valid_BS, mix, keys, layers, states) -> tuple[Array, list]:
        """The layers one after another over new positions, each continuing its own state: (x, the
        states they return).

        A Python loop over per-layer parameters and per-layer buffers, so that inside a decoding
        loop no array is sliced or rebuilt: a stacked [layers, ...] cache made XLA copy all of it at
        every step, and slicing stacked weights copied them (quarter preset, batch 1: 13 -> 7.7 ms
        per step). `layers` (from `unstack`, or the decoder's step layers) is made once outside the loop."""
        new_states = []
        for i, (p, state) in enumerate(zip(layers, states, strict=True)):
            x, state = self.layer(p, x, features, valid_BS, mix, None if keys is None else keys[i], state)
            new_states.append(state)
        return x, new_states

    def continue_cache(self, x, positions_BS, valid_BS, causal_B, cache, keys, layers):
        """The layers over new positions that attend to the cache: each writes its new keys and
        values into its buffers (in place), then attends to them; (output, the new cache)."""
        idx, filled = cache["index"], cache["index"] + x.shape[1]
        k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BS.astype(jnp.int32), idx, axis=1)
        k_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BS, idx, axis=1)
        mask = L.attention_mask(positions_BS, k_pos, k_valid, causal_B, self.cfg.window)
        layout = cache["layout"]

        def attend(q, k, v, rate, key, kv: KV):
            kv = KV(*backend.write_cache(kv.k, kv.v, k, v, idx))
            return backend.attend_cache(q, kv.k, kv.v, mask, filled, layout), kv

        kvs = [KV(k, v) for k, v in zip(cache["k"], cache["v"], strict=True)]
        x, kvs = self.through_layers(x, self.position_features(positions_BS), valid_BS, attend, keys, layers, kvs)
        new_cache = dict(
            cache,
            k=tuple(kv.k for kv in kvs),
            v=tuple(kv.v for kv in kvs),
            pos=k_pos,
            valid=k_valid,
            index=filled,
        )
        return self.final(x), new_cache

    # ---- the decoding cache: what decoding.py asks of it -------------------------------------
    def init_cache(self, batch: int, length: int, dtype=jnp.float32, layout: backend.CacheLayout | None = None):
        return init_cache(self.cfg, batch, length, dtype, layout)

    def mark_prefix(self, cache: dict) -> dict:
        """Called once the cache holds exactly the prefix: keep what the NAR passes will need."""
        return cache  # the prefix stays in slots [0, prefix) untouched by later steps

    def nar_cache(self, cache: dict, prefix: int, frames: int) -> dict:
        """The prefix's cache, ready for a NAR pass over `frames` response positions."""
        return dict(
            cache,
            k=tuple(k[:, : prefix + frames] for k in cache["k"]),
            v=tuple(v[..., : prefix + frames] for v in cache["v"]),
            pos=cache["pos"][:, : prefix + frames],
            valid=cache["valid"][:, : prefix + frames] & (jnp.arange(prefix + frames) < prefix)[None, :],
            index=jnp.asarray(prefix, jnp.int32),
        )

    def reorder_cache(self, cache: dict, rows: Array) -> dict:
        """Batch row i of the result is row `rows[i]` of `cache` (beams taking over other beams)."""
        g = self.cfg.kv_heads
        kv_rows = (rows[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)
        return dict(
            cache,
            k=tuple(k[kv_rows] for k in cache["k"]),
            v=tuple(v[kv_rows] for v in cache["v"]),
            pos=cache["pos"][rows],
            valid=cache["valid"][rows],
        )

    def forget(self, cache: dict, slot_B: Array) -> dict:
        """Masks cache slot `slot_B[b]` of each row from here on (rolling context); a slot past the
        end is a no-op."""
        b = slot_B.shape[0]
        return dict(cache, valid=cache["valid"].at[jnp.arange(b), slot_B].set(False, mode="drop"))

    def stacked(self) -> dict:
        """The layer parameters (`layer_params`), each with a leading layers axis; with BitLinear
        (`cfg.bitlinear`) the matmul weights as ternary.TernaryWeights (one scale per layer's matrix)."""
        params = {name: getattr(self, name)[...] for name in self.layer_params}
        if not self.cfg.bitlinear:
            return params
        # a LoRA adapter merges before quantising: ternary(W + AB) is not ternary(W) + AB (models.lora)
        params = {k: a.merged() if isinstance(a, LoraWeight) else a for k, a in params.items()}
        return {
            k: ternary.TernaryWeight.of(a, self.STEP_MATMULS[k], stacked=True) if k in self.STEP_MATMULS else a
            for k, a in params.items()
        }

    @property
    def layer_params(self) -> tuple[str, ...]:
        """The names of the parameters with a leading layers axis."""
        return self.LAYER_PARAMS

    def unstack(self) -> list[dict]:
        """The stacked layer parameters as one dict per layer (for decoding loops)."""
        stacked = self.stacked()
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.n_layers)]


class TransformerBackbone(Backbone):
    LAYER_PARAMS = (
        "attn_norm_scale",
        "attn_norm_bias",
        "qkv",
        "out",
        "out_bias",
        "ffn_norm_scale",
        "ffn_norm_bias",
        "ffn_in",
        "ffn_in_bias",
        "ffn_out",
        "ffn_out_bias",
    )
    STEP_MATMULS = {"qkv": 1, "out": 2, "ffn_in": 1, "ffn_out": 1}

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

    def layer(self, p, x, positions, valid, attend, key, state=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        m = valid[..., None].astype(jnp.float32)
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        h = L.layer_norm(x, p["attn_norm_scale"], p["attn_norm_bias"], cfg.eps) * m
        qkv = _mm(h, p["qkv"], "bsd,dthk->bsthk", dt)
        k, v = qkv[:, :, 1].astype(dt), qkv[:, :, 2].astype(dt)
        o, state = attend(qkv[:, :, 0].astype(dt), k, v, 0.0, None, state)  # no probability dropout (reference.md §3.1)
        o = L.add_bias(_mm(o, p["out"], "bshk,hkd->bsd", dt), p["out_bias"]) * m
        x = (x + L.dropout(o, cfg.dropout, keys[0])) * m
        h = L.layer_norm(x, p["ffn_norm_scale"], p["ffn_norm_bias"], cfg.eps) * m
        f = L.add_bias(
            feed_forward(h, p["ffn_in"], p["ffn_in_bias"], None, p["ffn_out"], dt, cfg.dropout, keys[1]),
            p["ffn_out_bias"],
        )
        return (x + L.dropout(f, cfg.dropout, keys[2])) * m, state


class LlamaBackbone(Backbone):
    LAYER_PARAMS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
    STEP_MATMULS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg)
        self.init_attention(cfg, rngs)
        n, d, f, init = cfg.n_layers, cfg.d_model, cfg.ffn_mult * cfg.d_model, HF_INIT
        self.gate = L.param(rngs, init, (n, d, f), ("layers", "embed", "mlp"))
        self.up = L.param(rngs, init, (n, d, f), ("layers", "embed", "mlp"))
        self.down = L.param(rngs, init, (n, f, d), ("layers", "mlp", "embed"))
        self.final_norm = L.param(rngs, ones, (d,), ("embed",))

    def init_attention(self, cfg: ModelConfig, rngs: nnx.Rngs, init=HF_INIT) -> None:
        """The parameters every llama-family layer has before its feed-forward (in this order, which
        fixes what each draws from `rngs`): the attention's norm and projections, the feed-forward's norm.
        `init` draws the projections (HF's for llama/mixtral, BitLinear's for bitnet)."""
        n, d, h, g, dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.attn_norm = L.param(rngs, ones, (n, d), ("layers", "embed"))
        self.q = L.param(rngs, init, (n, d, h, dh), ("layers", "embed", "heads", "head_dim"))
        self.k = L.param(rngs, init, (n, d, g, dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = L.param(rngs, init, (n, d, g, dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = L.param(rngs, init, (n, h, dh, d), ("layers", "heads", "head_dim", "embed"))
        self.mlp_norm = L.param(rngs, ones, (n, d), ("layers", "embed"))

    def position_features(self, positions_BS):
        return L.rope_tables(positions_BS, self.cfg.head_dim, self.cfg.rope_base)

    def attention_block(self, p, x, rope, attend, key, state):
        """x plus the attention sub-layer's output, and the attention's state."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        h = L.rms_norm(x, p["attn_norm"], cfg.eps)
        q = L.rope_with(_mm(h, p["q"], "bsd,dhk->bshk", dt), rope)
        k = L.rope_with(_mm(h, p["k"], "bsd,dgk->bsgk", dt), rope)
        v = _mm(h, p["v"], "bsd,dgk->bsgk", dt)
        k, v = k.astype(dt), v.astype(dt)
        o, state = attend(q.astype(dt), k, v, cfg.dropout, key, state)  # HF applies attention_dropout to probs
        return x + _mm(o, p["o"], "bshk,hkd->bsd", dt), state

    def layer(self, p, x, rope, valid, attend, key, state=None):
        x, state = self.attention_block(p, x, rope, attend, key, state)
        h = L.rms_norm(x, p["mlp_norm"], self.cfg.eps)
        return x + feed_forward(h, p["gate"], None, p["up"], p["down"], jnp.dtype(self.cfg.dtype)), state

    def final(self, x):
        return L.rms_norm(x, self.final_norm[...], self.cfg.eps)


class RetNetBackbone(Backbone):
    """RetNet (reference.md §3.2) in two variants: "torchscale" (upstream torchscale 0.3.0, what the golden
    files were made with: RMSNorm, no biases, GLU feed-forward, RMS group norm) and "fork" (the
    reference's own torchscale fork, what its published retnet checkpoints use: LayerNorm, biases
    on every projection, a plain GELU feed-forward with a LayerNorm inside, LayerNorm group norm).
    Both: pre-norm, value width 2d, swish gate, interleaved rotation, per-head decay, final norm.

    The cache is a recurrent state per layer (valle_jax.models.retention.State): its size does not
    depend on how many positions it has absorbed. Teacher forcing uses the parallel form, or the
    chunkwise form when `model.retention_chunk` > 0 (also for prefills and NAR passes longer than a
    chunk); decoding steps are the recurrent form. All three give the same numbers."""

    LAYER_PARAMS = ("attn_norm", "q", "k", "v", "g", "o", "mlp_norm")  # retention and the norms
    FORK_LAYER_PARAMS = ("attn_norm_bias", "q_bias", "k_bias", "v_bias", "g_bias", "o_bias", "mlp_norm_bias")
    FFN_PARAMS = {
        "fork": ("fc1", "fc1_bias", "ffn_norm", "ffn_norm_bias", "fc2", "fc2_bias"),
        "torchscale": ("fc1", "gate", "fc2"),
    }
    STEP_MATMULS = {"q": 1, "k": 1, "v": 1, "g": 1, "o": 2, "fc1": 1, "fc2": 1, "gate": 1}

    @property
    def layer_params(self) -> tuple[str, ...]:
        return self.LAYER_PARAMS + (self.FORK_LAYER_PARAMS if self.fork else ()) + self.ffn_params

    @property
    def ffn_params(self) -> tuple[str, ...]:
        return self.FFN_PARAMS[self.cfg.retnet_variant]

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg)
        n, d, h, dk = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim
        dv, f = 2 * dk, cfg.ffn_mult * d
        self.fork = cfg.retnet_variant == "fork"
        lin, xavier = L.torch_linear_init, R.xavier_uniform
        small = 2**-2.5  # torchscale's gain for q, k, v and g
        self.attn_norm = L.param(rngs, ones, (n, d), ("layers", "embed"))
        self.q = L.param(rngs, xavier(small, d, d), (n, d, h, dk), ("layers", "embed", "heads", "head_dim"))
        self.k = L.param(rngs, xavier(small, d, d), (n, d, h, dk), ("layers", "embed", "heads", "head_dim"))
        self.v = L.param(rngs, xavier(small, d, 2 * d), (n, d, h, dv), ("layers", "embed", "heads", "head_dim"))
        self.g = L.param(rngs, xavier(small, d, 2 * d), (n, d, h, dv), ("layers", "embed", "heads", "head_dim"))
        self.o = L.param(rngs, xavier(1.0, 2 * d, d), (n, h, dv, d), ("layers", "heads", "head_dim", "embed"))
        self.mlp_norm = L.param(rngs, ones, (n, d), ("layers", "embed"))
        dense = not cfg.moe  # with experts, XMoERetNetBackbone adds its own feed-forward parameters
        if dense:
            self.fc1 = L.param(rngs, lin(d), (n, d, f), ("layers", "embed", "mlp"))
            self.fc2 = L.param(rngs, lin(f), (n, f, d), ("layers", "mlp", "embed"))
        self.final_norm = L.param(rngs, ones, (d,), ("embed",))
        if self.fork:
            self.attn_norm_bias = L.param(rngs, zeros, (n, d), ("layers", "embed"))
            self.q_bias = L.param(rngs, lin(d), (n, h, dk), ("layers", "heads", "head_dim"))
            self.k_bias = L.param(rngs, lin(d), (n, h, dk), ("layers", "heads", "head_dim"))
            self.v_bias = L.param(rngs, lin(d), (n, h, dv), ("layers", "heads", "head_dim"))
            self.g_bias = L.param(rngs, lin(d), (n, h, dv), ("layers", "heads", "head_dim"))
            self.o_bias = L.param(rngs, lin(2 * d), (n, d), ("layers", "embed"))
            self.mlp_norm_bias = L.param(rngs, zeros, (n, d), ("layers", "embed"))
            if dense:
                self.fc1_bias = L.param(rngs, lin(d), (n, f), ("layers", "mlp"))
                self.ffn_norm = L.param(rngs, ones, (n, f), ("layers", "mlp"))
                self.ffn_norm_bias = L.param(rngs, zeros, (n, f), ("layers", "mlp"))
                self.fc2_bias = L.param(rngs, lin(f), (n, d), ("layers", "embed"))
            self.final_norm_bias = L.param(rngs, zeros, (d,), ("embed",))
        elif dense:
            self.gate = L.param(rngs, lin(d), (n, d, f), ("layers", "embed", "mlp"))

    # buffers of the reference, recomputed (the converter checks a checkpoint's against these)
    @property
    def decay(self) -> Array:
        return R.decay_rates(self.cfg.n_heads)

    @property
    def angle(self) -> Array:
        return R.angles(self.cfg.head_dim, self.cfg.rope_base)

    def _norm(self, x, p, name):
        if self.fork:
            return L.layer_norm(x, p[name], p[name + "_bias"], self.cfg.eps)
        return L.rms_norm(x, p[name], self.cfg.eps)

    def _group_norm(self, o_BSHE):
        """Per head over its value width, without parameters."""
        if self.fork:
            return L.layer_norm(o_BSHE, 1.0, 0.0, self.cfg.eps)
        return L.rms_norm(o_BSHE, 1.0, self.cfg.eps)

    def enter(self, x, key):
        return L.dropout(x, self.cfg.dropout, key)  # torchscale drops out the input embeddings

    def retention_block(self, p, x, positions, mix, key, state):
        """x plus the retention sub-layer's output, and the retention's state."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        bias = (lambda name: p[name]) if self.fork else (lambda name: 0.0)
        h = self._norm(x, p, "attn_norm")
        q = L.add_bias(_mm(h, p["q"], "bsd,dhk->bshk", dt), bias("q_bias"))
        k = L.add_bias(_mm(h, p["k"], "bsd,dhk->bshk", dt), bias("k_bias")) * cfg.head_dim**-0.5
        v = L.add_bias(_mm(h, p["v"], "bsd,dhe->bshe", dt), bias("v_bias"))
        g = L.add_bias(_mm(h, p["g"], "bsd,dhe->bshe", dt), bias("g_bias"))
        angle = self.angle
        o, state = mix(R.rotate(q, positions, angle), R.rotate(k, positions, angle), v, 0.0, None, state)
        o = jax.nn.silu(g) * self._group_norm(o)
        o = L.add_bias(_mm(o, p["o"], "bshe,hed->bsd", dt), bias("o_bias"))
        return x + L.dropout(o, cfg.dropout, key), state

    def layer(self, p, x, positions, valid, mix, key, state=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        keys = jax.random.split(key, 2) if key is not None else (None, None)
        x, state = self.retention_block(p, x, positions, mix, keys[0], state)
        h = self._norm(x, p, "mlp_norm")
        if self.fork:  # fc2(LayerNorm(gelu(fc1 h))): torchscale's sub-LN feed-forward
            f = jax.nn.gelu(L.add_bias(_mm(h, p["fc1"], "bsd,df->bsf", dt), p["fc1_bias"]), approximate=False)
            f = L.add_bias(
                _mm(L.layer_norm(f, p["ffn_norm"], p["ffn_norm_bias"], cfg.eps), p["fc2"], "bsf,fd->bsd", dt),
                p["fc2_bias"],
            )
        else:  # GLU: fc2(gelu(fc1 h) * gate h)
            f = feed_forward(h, p["fc1"], None, p["gate"], p["fc2"], dt)
        return x + L.dropout(f, cfg.dropout, keys[1]), state

    def final(self, x):
        if self.fork:
            return L.layer_norm(x, self.final_norm[...], self.final_norm_bias[...], self.cfg.eps)
        return L.rms_norm(x, self.final_norm[...], self.cfg.eps)

    def _mixer(self, positions_BS, valid_BS, count_B: Array | None):
        """`mix(q, k, v, rate, key, state) -> (out, state after the positions)` continuing `state`
        (None: from empty, and no state is computed) over the given positions, whose earlier
        positions number `count_B` (None: none): one chunk, or a scan of `model.retention_chunk`-sized
        chunks when the sequence is longer."""
        lam, chunk, s = self.decay, self.cfg.retention_chunk, positions_BS.shape[1]
        if chunk and s > chunk:

            def mix_chunks(q, k, v, rate, key, state=None):
                start = state if state is not None else R.empty_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
                out, end = R.chunked(R.retain_chunk, q, k, v, positions_BS, valid_BS, start, lam, chunk)
                return out, (end if state is not None else None)

            return mix_chunks
        count = count_B if count_B is not None else jnp.zeros(positions_BS.shape[:1], jnp.int32)
        plan = R.plan(positions_BS, valid_BS, count, lam)  # computed once, shared by every layer

        def mix(q, k, v, rate, key, state=None):
            return R.retain_chunk(q, k, v, plan, state, want_state=state is not None)

        return mix

    def teacher_mixer(self, positions_BS, valid_BS, causal_B):
        return self._mixer(positions_BS, valid_BS, None)  # retention is causal at every level

    def decoding_features(self, positions_BS: Array):
        """What each layer receives as `features` when it continues the cache."""
        return positions_BS

    def continue_cache(self, x, positions_BS, valid_BS, causal_B, cache, keys, layers):
        count = cache["count"]
        states = [R.State(kv, k_sum, count) for kv, k_sum in zip(cache["kv"], cache["k_sum"], strict=True)]
        mix = self._mixer(positions_BS, valid_BS, count)
        features = self.decoding_features(positions_BS)
        x, states = self.through_layers(x, features, valid_BS, mix, keys, layers, states)
        new_cache = dict(
            cache, kv=tuple(s.kv for s in states), k_sum=tuple(s.k_sum for s in states), count=states[-1].count
        )
        return self.final(x), new_cache

    def init_cache(self, batch, length, dtype=jnp.float32, layout=None):
        """Per layer, an empty recurrent state (float32 whatever the compute dtype; `length` and
        `layout` are not needed: the state does not grow, and no backend attends over it)."""
        cfg = self.cfg
        st = R.empty_state(batch, cfg.n_heads, cfg.head_dim, 2 * cfg.head_dim)
        return {"kv": (st.kv,) * cfg.n_layers, "k_sum": (st.k_sum,) * cfg.n_layers, "count": st.count, "prefix": None}

    def mark_prefix(self, cache):
        return dict(cache, prefix={k: cache[k] for k in ("kv", "k_sum", "count")})

    def nar_cache(self, cache, prefix, frames):
        return dict(cache["prefix"], prefix=None)

    def reorder_cache(self, cache, rows):
        return jax.tree.map(lambda a: a[rows] if a.ndim else a, cache)  # every state is batch-first

    has_window = False  # a recurrent state cannot drop one past position (its past decays instead)


class XMoERetNetBackbone(RetNetBackbone):
    """RetNet (either variant) with torchscale's XMoE layer in place of every feed-forward
    (`moe_freq=1`; valle_jax.models.xmoe): a 16-dim reduced top-2 gate over `cfg.n_experts` sub-LN
    GELU experts with biases. Teacher forcing routes every position of the batch, padding included,
    with torchscale's training or eval capacity (`routing`, an xmoe.Mode; eval without one); its
    right padding runs through retention like the reference's, whose padded positions take expert
    slots too. Decoding continues the recurrent state and routes without a capacity
    (xmoe.decoding_call says why). The experts stay out of STEP_MATMULS, as Mixtral's."""

    STEP_MATMULS = {"q": 1, "k": 1, "v": 1, "g": 1, "o": 2}

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        n, d, e, f, r = cfg.n_layers, cfg.d_model, cfg.n_experts, cfg.ffn_mult * cfg.d_model, xmoe.GATE_DIM
        lin = L.torch_linear_init
        ex = ("layers", "experts")
        self.gate_reduce = L.param(rngs, lin(d), (n, d, r), ("layers", "embed", None))
        self.gate_wg = L.param(rngs, xmoe.orthogonal_rows(0.32), (n, e, r), ex + (None,))  # torchscale's gain
        self.expert_fc1 = L.param(rngs, lin(d), (n, e, d, f), ex + ("embed", "mlp"))
        self.expert_fc1_bias = L.param(rngs, lin(d), (n, e, f), ex + ("mlp",))
        self.expert_norm = L.param(rngs, ones, (n, e, f), ex + ("mlp",))
        self.expert_norm_bias = L.param(rngs, zeros, (n, e, f), ex + ("mlp",))
        self.expert_fc2 = L.param(rngs, lin(f), (n, e, f, d), ex + ("mlp", "embed"))
        self.expert_fc2_bias = L.param(rngs, lin(f), (n, e, d), ex + ("embed",))

    @property
    def ffn_params(self) -> tuple[str, ...]:
        return xmoe.PARAMS

    def stacked(self) -> dict:
        # each layer's index rides with its parameters: it keys the random policy's draws
        return dict(super().stacked(), layer_index=jnp.arange(self.cfg.n_layers, dtype=jnp.int32))

    def teacher_features(self, positions_BS, valid_BS, routing):
        return xmoe.teacher_call(self.cfg, positions_BS, valid_BS, routing)

    def decoding_features(self, positions_BS):
        return xmoe.decoding_call(positions_BS)

    def teacher_mixer(self, positions_BS, valid_BS, causal_B):
        """Retention over the right padding too, as the reference's (which passes no mask): valid
        positions never see it (retention is causal), but the padding's own values, which route
        and take expert slots, are then the reference's."""
        trailing = jnp.cumsum(valid_BS[:, ::-1], axis=1)[:, ::-1] == 0  # no valid position from here on
        return super().teacher_mixer(positions_BS, valid_BS | trailing, causal_B)

    def layer_with_stats(self, p, x, call, valid, mix, key, state=None):
        keys = jax.random.split(key, 2) if key is not None else (None, None)
        x, state = self.retention_block(p, x, call.positions, mix, keys[0], state)
        f, l_aux = xmoe.xmoe_ffn(self._norm(x, p, "mlp_norm"), p, call, self.cfg)
        return x + L.dropout(f, self.cfg.dropout, keys[1]), state, l_aux

    def layer(self, p, x, call, valid, mix, key, state=None):
        return self.layer_with_stats(p, x, call, valid, mix, key, state)[:2]

    def aux_loss(self, l_aux_L, valid_BS):
        """0.001 (router_aux_loss_coef) times the sum of every layer's l_aux (reference.md §2.9)."""
        return self.cfg.router_aux_loss_coef * l_aux_L.sum()


class MixtralBackbone(LlamaBackbone):
    """HF Mixtral (reference.md §3.3): Llama's attention (with its sliding window: `cfg.window`) and a sparse
    mixture of `cfg.n_experts` gated GELU experts, `cfg.top_k` per token, in place of the FFN
    (valle_jax.models.moe). The experts stay out of STEP_MATMULS: they run as grouped matmuls over
    whichever tokens chose them (XLA's ragged_dot), so decoding on the CPU kernels packs the
    attention's matrices alone and reads the experts as they are."""

    LAYER_PARAMS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "router", "w1", "w3", "w2")
    STEP_MATMULS = {"q": 1, "k": 1, "v": 1, "o": 2}

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        Backbone.__init__(self, cfg)
        self.init_attention(cfg, rngs)
        n, d, e, f, init = cfg.n_layers, cfg.d_model, cfg.n_experts, cfg.ffn_mult * cfg.d_model, HF_INIT
        self.router = L.param(rngs, init, (n, d, e), ("layers", "embed", "experts"))
        self.w1 = L.param(rngs, init, (n, e, d, f), ("layers", "experts", "embed", "mlp"))  # gate
        self.w3 = L.param(rngs, init, (n, e, d, f), ("layers", "experts", "embed", "mlp"))  # up
        self.w2 = L.param(rngs, init, (n, e, f, d), ("layers", "experts", "mlp", "embed"))  # down
        self.final_norm = L.param(rngs, ones, (d,), ("embed",))

    def layer_with_stats(self, p, x, rope, valid, attend, key, state=None):
        x, state = self.attention_block(p, x, rope, attend, key, state)
        h = L.rms_norm(x, p["mlp_norm"], self.cfg.eps)
        f, stats = moe.moe_ffn(h, p["router"], p["w1"], p["w3"], p["w2"], valid, self.cfg)
        return x + f, state, stats

    def layer(self, p, x, rope, valid, attend, key, state=None):
        return self.layer_with_stats(p, x, rope, valid, attend, key, state)[:2]

    def aux_loss(self, stats_L2E, valid_BS):
        """router_aux_loss_coef * HF's load-balancing loss over every layer (reference.md §2.9)."""
        return self.cfg.router_aux_loss_coef * moe.balance_loss(stats_L2E, valid_BS.sum())


class BitNetBackbone(LlamaBackbone):
    """arch "bitnet" (reference.md §3.4): the `bitnet` package's transformer as a llama-style stack
    whose every matmul is a BitLinear (`cfg.bitlinear`): RMSNorm pre-norm, rotary attention
    (grouped-query where n_kv_heads < n_heads), BitFeedForward (ungated: gelu(h W_in) W_out, 4d),
    final RMSNorm. docs/model.md says what was chosen where the unpinned package changed."""

    LAYER_PARAMS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "ffn_in", "ffn_out")
    STEP_MATMULS = {"q": 1, "k": 1, "v": 1, "o": 2, "ffn_in": 1, "ffn_out": 1}

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        Backbone.__init__(self, cfg)
        n, d, f, init = cfg.n_layers, cfg.d_model, cfg.ffn_mult * cfg.d_model, normal(0.02)
        self.init_attention(cfg, rngs, init)
        self.ffn_in = L.param(rngs, init, (n, d, f), ("layers", "embed", "mlp"))
        self.ffn_out = L.param(rngs, init, (n, f, d), ("layers", "mlp", "embed"))
        self.final_norm = L.param(rngs, ones, (d,), ("embed",))

    def layer(self, p, x, rope, valid, attend, key, state=None):
        x, state = self.attention_block(p, x, rope, attend, key, state)
        h = L.rms_norm(x, p["mlp_norm"], self.cfg.eps)
        return x + feed_forward(h, p["ffn_in"], None, None, p["ffn_out"], jnp.dtype(self.cfg.dtype)), state


def make_backbone(cfg: ModelConfig, rngs: nnx.Rngs) -> Backbone:
    if cfg.xmoe:
        return XMoERetNetBackbone(cfg, rngs)
    if cfg.moe:
        return MixtralBackbone(cfg, rngs)
    llama = LlamaBackbone  # mistral is llama with a window (cfg.window); a dense "mixtral" is refused by the config
    return {
        "transformer": TransformerBackbone,
        "llama": llama,
        "mistral": llama,
        "retnet": RetNetBackbone,
        "bitnet": BitNetBackbone,
    }[cfg.arch](cfg, rngs)
