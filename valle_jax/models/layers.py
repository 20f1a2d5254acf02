"""Pure-jnp building blocks shared by the backbones: norms, positions, masks, dropout, attention.
Attention over a KV cache, and whatever depends on the platform, is valle_jax.backend's.

Shapes: B batch, S sequence (query) positions, K key positions, H heads, G kv heads, Dh head width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from valle_jax import backend

Array = jax.Array
NEG_INF = float(jnp.finfo(jnp.float32).min)  # the reference fills masked scores with -max_float


def param(rngs: nnx.Rngs, init, shape, axes: tuple[str | None, ...]) -> nnx.Param:
    """A float32 parameter carrying logical axis names (the training issue maps them to a mesh)."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


def torch_linear_init(fan_in: int):
    """PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * _features(scale, x) + _features(bias, x)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * _features(scale, x)


def _features(v: Array, x: Array) -> Array:
    """A per-feature parameter given x's rank (leading axes of size 1): the tests run with JAX's implicit
    rank promotion turned into an error, so every broadcast against a lower-rank array is written out."""
    return jax.lax.broadcast_to_rank(v, x.ndim)


def add_bias(y: Array, bias: Array) -> Array:
    """y + bias, the bias's axes being y's trailing ones."""
    return y + _features(bias, y)


def sinusoidal(positions_BS: Array, d: int) -> Array:
    """The transformer backbone's absolute encoding: all sines, then all cosines (not interleaved)."""
    half = d // 2
    omega = jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions_BS.astype(jnp.float32)[..., None] * jax.lax.broadcast_to_rank(omega, positions_BS.ndim + 1)
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)


def rope_tables(positions_BS: Array, dh: int, theta: float) -> tuple[Array, Array]:
    """cos and sin [B, S, 1, Dh] of the rotary angles, for every layer and head."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    ang = positions_BS.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, S, Dh/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    return backend.computed_once(jnp.cos(ang), jnp.sin(ang))


def rope_with(x_BSHD: Array, tables: tuple[Array, Array]) -> Array:
    """HF Llama rotary embedding, rotate-half convention, with `rope_tables`' cos and sin."""
    cos, sin = tables
    dh = x_BSHD.shape[-1]
    x = x_BSHD.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    return (x * cos + rotated * sin).astype(x_BSHD.dtype)


def keep_mask(key: Array, shape: tuple[int, ...], keep_prob: float) -> Array:
    """bool mask with P(True) = keep_prob, from a counter-based integer hash of each element's
    index and a seed drawn from `key`. jax.random's threefry costs ~200 ms per 14M elements on
    CPU, which made dropout on attention probabilities most of a training step; this costs ~10 ms.
    The bits are as random as dropout needs (a well-mixed 32-bit hash), not cryptographic."""
    seed = jax.random.bits(key, (), jnp.uint32)
    idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return kept(idx, seed, keep_prob)


def kept(idx: Array, seed: Array, keep_prob: float) -> Array:
    """Whether dropout keeps each element of uint32 indices `idx` (P = keep_prob), by `seed`."""
    return hash_bits(idx, seed) < jnp.uint32(min(int(keep_prob * 2.0**32), 2**32 - 1))


def hash_bits(idx: Array, seed: Array) -> Array:
    """32 well-mixed bits per uint32 index (multiply-xorshift finaliser), varied by `seed`."""
    x = idx * jnp.uint32(0x9E3779B9) ^ seed
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate == 0.0:
        return x
    return jnp.where(keep_mask(key, x.shape, 1.0 - rate), x / (1.0 - rate), 0.0).astype(x.dtype)


def matmul(spec: str, x: Array, y, dtype) -> Array:
    """einsum with `dtype` operands (float32 or bfloat16 compute) and float32 accumulation; `y` is
    whatever the decoder gives as a layer weight (backend.linear)."""
    return backend.linear(spec, x, y, dtype)


def after_gradient(x: Array, g: Array) -> Array:
    """x, made to depend on the incoming gradient g (x + 0 * g's first column; XLA does not fold
    float y * 0, NaN * 0 being NaN), for what a hand-written backward pass recomputes from forward
    values: without the dependence, XLA's CPU scheduler computes it during the forward pass, for
    every layer at once, and keeps it until the backward pass."""
    return x + g[..., :1] * 0.0


def grouped(q_BSHD: Array, k_BKGD: Array, v_BKGD: Array) -> tuple[Array, Array, Array]:
    """Attention operands by kv head: queries [B, G, R, S, Dh] (R = H / G query heads per kv head),
    keys and values [B, G, K, Dh]; float32 on the CPU where bfloat16 (backend.batched_dot_operands)."""
    q_BSHD, k_BKGD, v_BKGD = backend.batched_dot_operands(q_BSHD, k_BKGD, v_BKGD)
    b, s, h, d = q_BSHD.shape
    g = k_BKGD.shape[2]
    q = q_BSHD.reshape(b, s, g, h // g, d).transpose(0, 2, 3, 1, 4)
    return q, k_BKGD.transpose(0, 2, 1, 3), v_BKGD.transpose(0, 2, 1, 3)


def ungrouped(out_BGRSD: Array) -> Array:
    """The inverse of `grouped` for the queries: [B, S, H, Dh]."""
    b, g, r, s, d = out_BGRSD.shape
    return out_BGRSD.transpose(0, 3, 1, 2, 4).reshape(b, s, g * r, d)


def attention_mask(q_pos_BS: Array, k_pos_BK: Array, k_valid_BK: Array, causal_B: Array, window: int = 0) -> Array:
    """bool[B, 1, S, K]: key valid, (for causal rows) key position <= query position, and with a
    `window` (static; 0: none) the key at most `window` positions away: HF's sliding window (sdpa
    mask of transformers 4.40), under which a query sees itself and `window` earlier positions.
    Every attention path (teacher forcing, blocked, the KV cache on either backend) takes this mask,
    so the window is decided here alone."""
    causal = k_pos_BK[:, None, :] <= q_pos_BS[:, :, None]
    allowed = k_valid_BK[:, None, :] & (causal | ~causal_B[:, None, None])
    if window:
        allowed &= jnp.abs(q_pos_BS[:, :, None] - k_pos_BK[:, None, :]) <= window
    return allowed[:, None]


def attend(
    q_BSHD: Array,
    k_BKGD: Array,
    v_BKGD: Array,
    mask_B1SK: Array,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> Array:
    """Softmax attention (float32 softmax); grouped-query when G < H. Returns [B, S, H, Dh].
    The plain expression: the model uses dense_attention.dense_attend, which computes the same
    values with a backward pass of its own (tests compare the two)."""
    q_BSHD, k_BKGD, v_BKGD = backend.batched_dot_operands(q_BSHD, k_BKGD, v_BKGD)
    b, s, h, dh = q_BSHD.shape
    g = k_BKGD.shape[2]
    q = q_BSHD.reshape(b, s, g, h // g, dh)
    scores = jnp.einsum("bsgrd,bkgd->bgrsk", q, k_BKGD, preferred_element_type=jnp.float32) / math.sqrt(dh)
    scores = jnp.where(mask_B1SK[:, :, None], scores, NEG_INF)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    out = jnp.einsum("bgrsk,bkgd->bsgrd", probs.astype(v_BKGD.dtype), v_BKGD, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, dh)
