"""Softmax attention over whole sequences (teacher forcing) with a hand-written backward pass.

The same values as layers.attend (float32 scores and softmax, masked scores at -max_float,
dropout on the probabilities), but autodiff's backward pass of that expression let XLA's CPU
compiler feed its batched matmuls from transposed [S, K] copies of the probabilities and their
gradients, each made by a transposing elementwise loop (the one regenerating the dropout mask
alone took ~0.25 s per layer for the half preset at batch 8, more than the layer's matmuls).
Here every contraction over the query axis is written as (small operand)^T (large operand), as
"bgrsd,bgrsk->bgdk", so that only [S, Dh]-sized operands and results are ever transposed.

The backward pass keeps the probabilities (before dropout) from the forward pass, as autodiff
did; model.attention=blocked keeps none (valle_jax/models/attention.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from valle_jax.models.layers import NEG_INF, grouped, keep_mask, ungrouped

Array = jax.Array


def dense_attend(q_BSHD: Array, k_BKGD: Array, v_BKGD: Array, mask_B1SK: Array, dropout_rate: float = 0.0,
                 dropout_key: Array | None = None) -> Array:
    """layers.attend's result ([B, S, H, Dh] float32), grouped-query when G < H."""
    q, k, v = grouped(q_BSHD, k_BKGD, v_BKGD)
    rate = float(dropout_rate) if dropout_key is not None else 0.0
    return ungrouped(_attend(q, k, v, mask_B1SK[:, :, None], dropout_key if rate > 0.0 else None, rate))


def _mm(spec: str, x: Array, y: Array) -> Array:
    return jnp.einsum(spec, x, y.astype(x.dtype), preferred_element_type=jnp.float32)


def _dropped(p: Array, rate: float, key: Array | None) -> Array:
    if rate == 0.0:
        return p
    return jnp.where(keep_mask(key, p.shape, 1.0 - rate), p / (1.0 - rate), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q_BGRSD, k_BGKD, v_BGKD, mask_B11SK, key, rate):
    return _attend_fwd(q_BGRSD, k_BGKD, v_BGKD, mask_B11SK, key, rate)[0]


def _attend_fwd(q, k, v, mask, key, rate):
    scores = _mm("bgrsd,bgkd->bgrsk", q, k) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    out = _mm("bgrsk,bgkd->bgrsd", _dropped(probs, rate, key).astype(v.dtype), v)
    return out, (q, k, v, mask, key, probs)


def _attend_bwd(rate, res, g_BGRSD):
    q, k, v, mask, key, probs = res
    # a data dependence on the incoming gradient (0 * one of its columns): without one, XLA's CPU
    # compiler merges the dropout regenerated here with the forward pass's, or schedules it there,
    # and keeps a second [S, K] buffer per layer until the backward pass
    probs = probs + g_BGRSD[..., :1] * 0.0
    g = g_BGRSD.astype(v.dtype)
    dv = _mm("bgrsd,bgrsk->bgdk", g, _dropped(probs, rate, key).astype(v.dtype)).swapaxes(-1, -2)
    d_probs = _dropped(_mm("bgrsd,bgkd->bgrsk", g, v), rate, key)
    # softmax backward; masked scores were constants (a fully masked row's uniform probabilities too)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    d_scores = jnp.where(mask, d_scores, 0.0) / math.sqrt(q.shape[-1])
    dq = _mm("bgrsk,bgkd->bgrsd", d_scores.astype(q.dtype), k)
    dk = _mm("bgrsd,bgrsk->bgdk", q, d_scores.astype(q.dtype)).swapaxes(-1, -2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
