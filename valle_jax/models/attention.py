"""Memory-light exact attention for teacher forcing (training, prefill, scoring).

The plain formulation materialises float32 scores and probabilities of shape [B, H, S, K] several
times over (mask, softmax, dropout, and the residuals autodiff keeps for the backward pass); on CPU
those passes through memory, not the matmuls, were most of a training step. Here queries are
processed in blocks inside a `lax.scan`, so only [B, H, block, K] lives at a time, and a custom VJP
recomputes each block's probabilities from the saved log-sum-exp in the backward pass instead of
storing them (the FlashAttention recipe; keys are not tiled, a whole row fits in cache). The
sequence axis is never sharded by the mesh rules, so scanning over it keeps batch and head
sharding intact.

The mask is rebuilt per block from positions and validity (key valid, and causal rows see keys at
positions <= the query's). A query with no allowed key attends uniformly, as the plain softmax over
all -max_float scores does. Dropout on probabilities uses the index-hash mask of layers.keep_mask,
regenerated identically in the backward pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from valle_jax.models.layers import NEG_INF, attention_mask, grouped, kept, ungrouped

Array = jax.Array


def _block_mask(q_pos_BC, k_pos_BK, k_valid_BK, causal_B, window):
    return attention_mask(q_pos_BC, k_pos_BK, k_valid_BK, causal_B, window)[:, :, None]  # [B, 1, 1, C, K]


def _keep(seed, shape_BGRCK, q_start, s_total, keep_prob):
    """Dropout keep-mask of one query block: hash of the element's index in the full [B,G,R,S,K]."""
    b, g, r, c, k = shape_BGRCK
    row = jax.lax.broadcasted_iota(jnp.uint32, shape_BGRCK, 0) * jnp.uint32(g * r)
    row = row + jax.lax.broadcasted_iota(jnp.uint32, shape_BGRCK, 1) * jnp.uint32(r)
    row = row + jax.lax.broadcasted_iota(jnp.uint32, shape_BGRCK, 2)
    q = jax.lax.broadcasted_iota(jnp.uint32, shape_BGRCK, 3) + q_start.astype(jnp.uint32)
    idx = (row * jnp.uint32(s_total) + q) * jnp.uint32(k) + jax.lax.broadcasted_iota(jnp.uint32, shape_BGRCK, 4)
    return kept(idx, seed, keep_prob)


def _scores(q_BGRCD, k_BGKD, scale):
    return jnp.einsum("bgrcd,bgkd->bgrck", q_BGRCD, k_BGKD, preferred_element_type=jnp.float32) * scale


def _blocks(x, n_blocks, block, axis):
    """Splits `axis` (padded to n_blocks * block) into blocks, the block index leading."""
    shape = x.shape[:axis] + (n_blocks, block) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, s, axis):
    """Inverse of _blocks for a stacked scan output, cut back to length s."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, s, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _flash(
    q_BGRSD, k_BGKD, v_BGKD, q_pos_BS, k_pos_BK, k_valid_BK, causal_B, seed, rate: float, block: int, window: int = 0
):
    return _forward(q_BGRSD, k_BGKD, v_BGKD, q_pos_BS, k_pos_BK, k_valid_BK, causal_B, seed, rate, block, window)[0]


def _pad_to(x, n, axis):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _forward(q, k, v, q_pos, k_pos, k_valid, causal, seed, rate, block, window=0):
    s, d = q.shape[3], q.shape[4]
    n = -(-s // block)
    scale = 1.0 / math.sqrt(d)
    qb = _blocks(_pad_to(q, n * block, 3), n, block, 3)  # [n, B, G, R, C, D]
    pb = _blocks(_pad_to(q_pos, n * block, 1), n, block, 1)  # [n, B, C]

    def body(_, xs):
        i, q_c, pos_c = xs
        sc = jnp.where(_block_mask(pos_c, k_pos, k_valid, causal, window), _scores(q_c, k, scale), NEG_INF)
        m = sc.max(-1, keepdims=True)
        p = jnp.exp(sc - m)
        l_sum = p.sum(-1, keepdims=True)
        p = p / l_sum
        if rate > 0.0:
            p = jnp.where(_keep(seed, p.shape, i * block, n * block, 1.0 - rate), p / (1.0 - rate), 0.0)
        o = jnp.einsum("bgrck,bgkd->bgrcd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return None, (o, (m + jnp.log(l_sum))[..., 0])

    _, (ob, lse) = jax.lax.scan(body, None, (jnp.arange(n), qb, pb))
    out = _unblocks(ob, s, 3)  # float32 [B, G, R, S, D]
    return out, (q, k, v, q_pos, k_pos, k_valid, causal, seed, out, lse)


def _flash_fwd(q, k, v, q_pos, k_pos, k_valid, causal, seed, rate, block, window=0):
    return _forward(q, k, v, q_pos, k_pos, k_valid, causal, seed, rate, block, window)


def _flash_bwd(rate, block, window, res, g_out):
    q, k, v, q_pos, k_pos, k_valid, causal, seed, out, lse = res
    s, d = q.shape[3], q.shape[4]
    n = -(-s // block)
    scale = 1.0 / math.sqrt(d)
    g_out = g_out.astype(jnp.float32)
    delta = (g_out * out).sum(-1)  # [B, G, R, S]: rowsum(dP * P) of the softmax backward
    qb = _blocks(_pad_to(q, n * block, 3), n, block, 3)
    pb = _blocks(_pad_to(q_pos, n * block, 1), n, block, 1)
    gb = _blocks(_pad_to(g_out, n * block, 3), n, block, 3)
    db = _blocks(_pad_to(delta, n * block, 3), n, block, 3)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)

    def body(carry, xs):
        dk, dv = carry
        i, q_c, pos_c, g_c, lse_c, delta_c = xs
        sc = jnp.where(_block_mask(pos_c, k_pos, k_valid, causal, window), _scores(q_c, k, scale), NEG_INF)
        p = jnp.exp(sc - lse_c[..., None])  # [B, G, R, C, K]
        dp = jnp.einsum("bgrcd,bgkd->bgrck", g_c, v32)
        if rate > 0.0:
            keep = _keep(seed, p.shape, i * block, n * block, 1.0 - rate)
            p_used = jnp.where(keep, p / (1.0 - rate), 0.0)
            dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
        else:
            p_used = p
        dv = dv + jnp.einsum("bgrck,bgrcd->bgkd", p_used, g_c)
        ds = p * (dp - delta_c[..., None]) * scale
        dk = dk + jnp.einsum("bgrck,bgrcd->bgkd", ds, q_c.astype(jnp.float32))
        return (dk, dv), jnp.einsum("bgrck,bgkd->bgrcd", ds, k32)

    zeros = jnp.zeros(k.shape, jnp.float32)
    # lse is [n, B, G, R, C], as the forward scan stacked it
    (dk, dv), dqb = jax.lax.scan(body, (zeros, zeros), (jnp.arange(n), qb, pb, gb, lse, db))
    dq = _unblocks(dqb, s, 3)
    none = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        none(q_pos),
        none(k_pos),
        none(k_valid),
        none(causal),
        none(seed),
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attend(
    q_BSHD: Array,
    k_BKGD: Array,
    v_BKGD: Array,
    q_pos_BS: Array,
    k_pos_BK: Array,
    k_valid_BK: Array,
    causal_B: Array,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    block: int = 64,
    window: int = 0,
) -> Array:
    """Exact softmax attention ([B, S, H, Dh] float32 out), grouped-query when G < H; `window`:
    layers.attention_mask's sliding window."""
    q, k, v = grouped(q_BSHD, k_BKGD, v_BKGD)
    rate = float(dropout_rate) if dropout_key is not None else 0.0
    seed = jax.random.bits(dropout_key, (), jnp.uint32) if rate > 0.0 else jnp.zeros((), jnp.uint32)
    block = min(block, q.shape[3])
    return ungrouped(_flash(q, k, v, q_pos_BS, k_pos_BK, k_valid_BK, causal_B, seed, rate, block, window))
