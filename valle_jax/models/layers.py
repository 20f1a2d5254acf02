"""Pure-jnp building blocks shared by the backbones: norms, positions, attention with a KV cache.

Shapes: B batch, S sequence (query) positions, K key positions, H heads, G kv heads, Dh head width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

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
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * scale


def sinusoidal(positions_BS: Array, d: int) -> Array:
    """The transformer backbone's absolute encoding: all sines, then all cosines (not interleaved)."""
    half = d // 2
    omega = jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions_BS.astype(jnp.float32)[..., None] * omega
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)


def rope_tables(positions_BS: Array, dh: int, theta: float) -> tuple[Array, Array]:
    """cos and sin [B, S, 1, Dh] of the rotary angles, for every layer and head."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    ang = positions_BS.astype(jnp.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if jax.default_backend() == "cpu":
        # XLA's CPU compiler fuses elementwise producers into every consumer, so each fusion that
        # read a rotated query or key evaluated cos and sin again, per head (half preset training
        # step: ~2 of ~11 s of kernel time). A product with the identity matrix (exact: one term
        # per sum) is a matmul, which it does not fuse: the tables are then computed once.
        eye = jnp.eye(dh, dtype=jnp.float32)
        cos, sin = (jnp.einsum("bshd,de->bshe", t, eye, precision="highest") for t in (cos, sin))
    return cos, sin


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
    """einsum with `dtype` operands (float32 or bfloat16 compute) and float32 accumulation; `y` may
    be a StepWeight (decoding on the CPU)."""
    if isinstance(y, StepWeight):
        return y.apply(spec, x, dtype)
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


@jax.tree_util.register_pytree_node_class
class StepWeight:
    """A weight `w` [*contracted, *out] laid out for decoding on the CPU, as w [K, N] (K = the
    contracted axes flattened, N = the output axes flattened) packed in panels of 32 columns
    (`w_PKC`, kernels.pack: the layout valle_jax.kernels.rows_linear streams) and/or as it is
    (`w_KN`). Products with few rows (a decoding step: one per batch row) run the kernel over the
    packed copy; others (a prefill, a NAR level) run XLA's dot over `w_KN`, unpacked from the
    packed copy where there is no other (`unpacked()` does it once for a loop of such products), so
    a decoding loop needs one copy of the weights."""

    def __init__(self, w_PKC: Array | None, w_KN: Array | None, contracted: int, out_shape: tuple[int, ...]):
        # no check that one is given: JAX rebuilds pytrees with placeholder leaves (None among them)
        self.w_PKC, self.w_KN, self.contracted, self.out_shape = w_PKC, w_KN, contracted, tuple(out_shape)

    @classmethod
    def of(cls, w: Array, contracted: int, packed: bool = True) -> StepWeight:
        """`w` packed for the kernel (`packed`), else as it is (for products with many rows only)."""
        from valle_jax import kernels  # not at import time: the model does not need it

        w_KN = w.reshape(math.prod(w.shape[:contracted]), -1)
        return cls(kernels.pack(w_KN) if packed else None, None if packed else w_KN, contracted, w.shape[contracted:])

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)

    def dense(self) -> Array:
        """w [K, N]."""
        from valle_jax import kernels

        return self.w_KN if self.w_KN is not None else kernels.unpack(self.w_PKC, self.n)

    def unpacked(self) -> StepWeight:
        """This weight as it is, for products with many rows alone (a NAR's levels: unpacked once,
        outside their loop)."""
        return StepWeight(None, self.dense(), self.contracted, self.out_shape)

    def tree_flatten(self):
        return (self.w_PKC, self.w_KN), (self.contracted, self.out_shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def apply(self, spec: str, x: Array, dtype) -> Array:
        """What `matmul(spec, x, w, dtype)` computes, for a spec that contracts x's trailing axes
        with w's leading ones and keeps the rest in order ("bshk,hkd->bsd")."""
        from valle_jax import kernels

        lhs, rhs = spec.split("->")[0].split(",")
        c = self.contracted
        if lhs[-c:] != rhs[:c] or len(rhs) != c + len(self.out_shape):
            raise ValueError(f"StepWeight contracting {c} axes cannot compute {spec!r}")
        lead = x.shape[: x.ndim - c]
        x_MK = x.reshape(-1, math.prod(x.shape[x.ndim - c :]))
        if (
            self.w_PKC is not None
            and x_MK.shape[0] <= kernels.MAX_ROWS
            and self.w_PKC.size >= kernels.MIN_WEIGHT_ELEMENTS
            and kernels.available()
        ):
            y_MN = kernels.rows_linear(x_MK, self.w_PKC, self.n)
        else:
            y_MN = jnp.einsum(
                "mk,kn->mn", x_MK.astype(dtype), self.dense().astype(dtype), preferred_element_type=jnp.float32
            )
        return y_MN.reshape(*lead, *self.out_shape)


def unpacked(layer: dict) -> dict:
    """A layer's parameters with each StepWeight `unpacked()`."""
    return {k: a.unpacked() if isinstance(a, StepWeight) else a for k, a in layer.items()}


def after_gradient(x: Array, g: Array) -> Array:
    """x, made to depend on the incoming gradient g (x + 0 * g's first column; XLA does not fold
    float y * 0, NaN * 0 being NaN), for what a hand-written backward pass recomputes from forward
    values: without the dependence, XLA's CPU scheduler computes it during the forward pass, for
    every layer at once, and keeps it until the backward pass."""
    return x + g[..., :1] * 0.0


def cpu_safe(*arrays: Array) -> tuple[Array, ...]:
    """bfloat16 operands of the attention's batched contractions as float32 on CPU: XLA's CPU
    runtime has no batched bf16 x bf16 -> f32 dot ("Unsupported element type for DotThunk") once the
    batch has more than one row. Other backends keep bfloat16."""
    if jax.default_backend() != "cpu":
        return arrays
    return tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in arrays)


def grouped(q_BSHD: Array, k_BKGD: Array, v_BKGD: Array) -> tuple[Array, Array, Array]:
    """Attention operands by kv head: queries [B, G, R, S, Dh] (R = H / G query heads per kv head),
    keys and values [B, G, K, Dh]; float32 on CPU where bfloat16 (cpu_safe)."""
    q_BSHD, k_BKGD, v_BKGD = cpu_safe(q_BSHD, k_BKGD, v_BKGD)
    b, s, h, d = q_BSHD.shape
    g = k_BKGD.shape[2]
    q = q_BSHD.reshape(b, s, g, h // g, d).transpose(0, 2, 3, 1, 4)
    return q, k_BKGD.transpose(0, 2, 1, 3), v_BKGD.transpose(0, 2, 1, 3)


def ungrouped(out_BGRSD: Array) -> Array:
    """The inverse of `grouped` for the queries: [B, S, H, Dh]."""
    b, g, r, s, d = out_BGRSD.shape
    return out_BGRSD.transpose(0, 3, 1, 2, 4).reshape(b, s, g * r, d)


def attention_mask(q_pos_BS: Array, k_pos_BK: Array, k_valid_BK: Array, causal_B: Array) -> Array:
    """bool[B, 1, S, K]: key valid, and (for causal rows) key position <= query position."""
    causal = k_pos_BK[:, None, :] <= q_pos_BS[:, :, None]
    allowed = k_valid_BK[:, None, :] & (causal | ~causal_B[:, None, None])
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
    q_BSHD, k_BKGD, v_BKGD = cpu_safe(q_BSHD, k_BKGD, v_BKGD)
    b, s, h, dh = q_BSHD.shape
    g = k_BKGD.shape[2]
    q = q_BSHD.reshape(b, s, g, h // g, dh)
    scores = jnp.einsum("bsgrd,bkgd->bgrsk", q, k_BKGD, preferred_element_type=jnp.float32) / math.sqrt(dh)
    scores = jnp.where(mask_B1SK[:, :, None], scores, NEG_INF)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    out = jnp.einsum("bgrsk,bkgd->bsgrd", probs.astype(v_BKGD.dtype), v_BKGD, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, dh)


def attend_cache(
    q_BSHD: Array, ck_NKD: Array, cv_NDK: Array, mask_B1SK: Array, live: Array | None = None, many: bool = False
) -> Array:
    """`attend` over one layer's cache: keys [B*G, K, Dh], values [B*G, Dh, K] (row b*G + g).

    Why this layout: at a decoding step each (row, kv head) is a matrix-vector product, which XLA's
    CPU dot takes with the contracted axis last and one batch axis. With [B, G, Dh, K] / [B, G, K, Dh]
    buffers it transposed every layer's whole cache at every step; with a [B, G, ...] layout in that
    order, batch 1 needed a reshape between the in-place write and the dot, and XLA then fed the two
    from separate copies of the buffer (half preset, batch 1: ~5 of 17 ms per step went to copies).

    `live` (the slots filled so far; every later slot masked): computed by the CPU kernel, which
    reads only those slots (valle_jax.kernels.cache_attention), a bfloat16 cache as it is (also when
    held as its bits: `cache_storage`). With `many` (many new positions: a NAR level, a prefill),
    by valle_jax.kernels.block_attention over the keys transposed."""
    b, s, h, dh = q_BSHD.shape
    g = ck_NKD.shape[0] // b
    r = h // g
    if live is not None:
        from valle_jax import kernels

        q = q_BSHD.reshape(b, s, g, r, dh).transpose(0, 2, 1, 3, 4).reshape(b * g, s * r, dh)
        if many:
            out = kernels.block_attention(q, jnp.swapaxes(ck_NKD, 1, 2), cv_NDK, mask_B1SK[:, 0], live)
        else:
            out = kernels.cache_attention(q, ck_NKD, cv_NDK, mask_B1SK[:, 0], live)
        return out.reshape(b, g, s, r, dh).transpose(0, 2, 1, 3, 4).reshape(b, s, h, dh)
    q_BSHD, ck_NKD, cv_NDK = cpu_safe(q_BSHD, cache_values(ck_NKD), cache_values(cv_NDK))
    q = q_BSHD.reshape(b, s, g, r, dh).transpose(0, 2, 1, 3, 4).reshape(b * g, s * r, dh)
    scores = jnp.einsum("nqd,nkd->nqk", q, ck_NKD.astype(q.dtype), preferred_element_type=jnp.float32) / math.sqrt(dh)
    scores = scores.reshape(b, g, s, r, -1)
    probs = jax.nn.softmax(jnp.where(mask_B1SK[:, :, :, None], scores, NEG_INF), axis=-1).reshape(b * g, s * r, -1)
    out = jnp.einsum("nqk,ndk->nqd", probs.astype(cv_NDK.dtype), cv_NDK, preferred_element_type=jnp.float32)
    return out.reshape(b, g, s, r, dh).transpose(0, 2, 1, 3, 4).reshape(b, s, h, dh)


def update_cache(cache_k: Array, cache_v: Array, k_BSGD: Array, v_BSGD: Array, index: Array) -> tuple[Array, Array]:
    """Writes new keys/values at slot `index` (a scalar) of one layer's cache (keys [B*G, K, Dh],
    values [B*G, Dh, K]): an in-place update when the cache is a loop carry or donated."""
    b, s, g, dh = k_BSGD.shape
    k_NSD = k_BSGD.transpose(0, 2, 1, 3).reshape(b * g, s, dh)
    v_NDS = v_BSGD.transpose(0, 2, 3, 1).reshape(b * g, dh, s)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, as_stored(k_NSD, cache_k.dtype), index, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, as_stored(v_NDS, cache_v.dtype), index, axis=2)
    return cache_k, cache_v


def cache_storage(dtype) -> jnp.dtype:
    """The dtype a KV cache of `dtype` is held in: a bfloat16 cache on the CPU as its bits (uint16).
    XLA's CPU compiler turns the in-place write into a bfloat16 buffer into a float32 write of the
    whole buffer, converted there and back at every step (half preset, batch 8: 56 of 85 ms per
    step); an integer buffer is written in place."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else dtype


def as_stored(x: Array, storage) -> Array:
    """x as a cache held in `storage` holds it."""
    if storage == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def cache_values(c: Array) -> Array:
    """A cache buffer's values (bfloat16 for one held as bits)."""
    return jax.lax.bitcast_convert_type(c, jnp.bfloat16) if c.dtype == jnp.uint16 else c
