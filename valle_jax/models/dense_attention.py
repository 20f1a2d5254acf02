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

from valle_jax.models.layers import NEG_INF, after_gradient, dropout, grouped, matmul, ungrouped

Array = jax.Array


def dense_attend(
    q_BSHD: Array,
    k_BKGD: Array,
    v_BKGD: Array,
    mask_B1SK: Array,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> Array:
    """layers.attend's result ([B, S, H, Dh] float32), grouped-query when G < H."""
    q, k, v = grouped(q_BSHD, k_BKGD, v_BKGD)
    rate = float(dropout_rate) if dropout_key is not None else 0.0
    return ungrouped(_attend(q, k, v, mask_B1SK[:, :, None], dropout_key if rate > 0.0 else None, rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q_BGRSD, k_BGKD, v_BGKD, mask_B11SK, key, rate):
    return _attend_fwd(q_BGRSD, k_BGKD, v_BGKD, mask_B11SK, key, rate)[0]


def _attend_fwd(q, k, v, mask, key, rate):
    scores = matmul("bgrsd,bgkd->bgrsk", q, k, q.dtype) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    out = matmul("bgrsk,bgkd->bgrsd", dropout(probs, rate, key), v, v.dtype)
    return out, (q, k, v, mask, key, probs)


def _attend_bwd(rate, res, g_BGRSD):
    q, k, v, mask, key, probs = res
    # without the dependence, XLA's CPU compiler also merges the dropout regenerated here with the
    # forward pass's and keeps a second [S, K] buffer per layer
    probs = after_gradient(probs, g_BGRSD)
    dv = matmul("bgrsd,bgrsk->bgdk", g_BGRSD, dropout(probs, rate, key), v.dtype).swapaxes(-1, -2)
    d_probs = dropout(matmul("bgrsd,bgkd->bgrsk", g_BGRSD, v, v.dtype), rate, key)
    # softmax backward; masked scores were constants (a fully masked row's uniform probabilities too)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    d_scores = jnp.where(mask, d_scores, 0.0) / math.sqrt(q.shape[-1])
    dq = matmul("bgrsk,bgkd->bgrsd", d_scores, k, q.dtype)
    dk = matmul("bgrsd,bgrsk->bgdk", q, d_scores, q.dtype).swapaxes(-1, -2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
