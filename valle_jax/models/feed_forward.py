"""The backbones' feed-forward block with a hand-written backward pass that keeps little and
transposes nothing large.

    out = dropout(gelu(h @ w_a + bias_a) * (h @ w_b)) @ w_out     (exact gelu; w_b None: no gate)

Autodiff of that expression keeps, per layer, erfc(a), gelu's derivative and the product beside
the pre-activations a and b for the backward pass: three more [B, S, F] float32 buffers, ~2 of
the ~5 GB that the half preset's training step needed at batch 8. And XLA's CPU compiler fed the
weight gradients' matmuls from transposed [F, B*S] copies of the product and of the
pre-activations' gradients, each computed by a transposing elementwise loop that reads its inputs
column by column (~0.2 s apiece at that size, three per layer). Here the backward pass keeps h,
a and b, recomputes gelu elementwise (no matmul is recomputed), and writes every product as a 2D
matmul whose large operand is contracted along its rows, which the CPU matmul reads as it lies.
A weight that is a LoRA training step's LoraWeight (frozen W and its adapter) gets the adapter's
gradients alone (models.lora.backward_2d): the frozen W's weight-gradient matmuls are not computed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from valle_jax.models.layers import after_gradient, dropout, matmul
from valle_jax.models.lora import LoraWeight, backward_2d
from valle_jax.ternary import TernaryWeight

Array = jax.Array


def feed_forward(
    h_BSD: Array,
    w_a: Array,
    bias_a: Array | None,
    w_b: Array | None,
    w_out: Array,
    dtype,
    rate: float = 0.0,
    key: Array | None = None,
) -> Array:
    """The block's output before any output bias, float32 [B, S, D_out]; matmul operands in
    `dtype` with float32 accumulation; dropout at `rate` on the product when `key` is given."""
    b, s, d = h_BSD.shape
    rate = float(rate) if key is not None else 0.0
    if isinstance(w_out, TernaryWeight):
        # BitLinear weights: autodiff through the expression itself, whose products quantise what
        # they multiply; the backward pass below multiplies gradients by the weights, which must not be
        out_ND = _ffn_fwd(h_BSD.reshape(b * s, d), w_a, bias_a, w_b, w_out, jnp.dtype(dtype), rate, key)[0]
        return out_ND.reshape(b, s, -1)
    out_ND = _ffn(h_BSD.reshape(b * s, d), w_a, bias_a, w_b, w_out, jnp.dtype(dtype), rate, key)
    return out_ND.reshape(b, s, -1)


def _gelu_and_slope(a: Array) -> tuple[Array, Array]:
    """Exact gelu and its derivative written with erf, where jax.nn.gelu uses erfc: the backward
    pass's recomputation must not be the forward's expression, or XLA's CSE merges the two and
    keeps the forward's result for the backward pass after all (on CPU, XLA drops optimization
    barriers before CSE runs)."""
    cdf = 0.5 * (1.0 + jax.lax.erf(a * (1.0 / math.sqrt(2.0))))
    return a * cdf, cdf + a * jnp.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ffn(h_ND, w_a, bias_a, w_b, w_out, dtype, rate, key):
    return _ffn_fwd(h_ND, w_a, bias_a, w_b, w_out, dtype, rate, key)[0]


def _ffn_fwd(h_ND, w_a, bias_a, w_b, w_out, dtype, rate, key):
    a_NF = matmul("nd,df->nf", h_ND, w_a, dtype)
    if bias_a is not None:
        a_NF = a_NF + bias_a[None, :]
    b_NF = None if w_b is None else matmul("nd,df->nf", h_ND, w_b, dtype)
    f_NF = jax.nn.gelu(a_NF, approximate=False)
    f_NF = dropout(f_NF if b_NF is None else f_NF * b_NF, rate, key)
    return matmul("nf,fe->ne", f_NF, w_out, dtype), (h_ND, a_NF, b_NF, w_a, bias_a, w_b, w_out, key)


def _ffn_bwd(dtype, rate, res, g_NE):
    h_ND, a_NF, b_NF, w_a, bias_a, w_b, w_out, key = res
    a_NF = after_gradient(a_NF, g_NE)
    y_NF, slope_NF = _gelu_and_slope(a_NF)
    f_NF = dropout(y_NF if b_NF is None else y_NF * b_NF, rate, key)
    # weight gradients as (small operand)^T (large operand): "nd,nf->df" contracts both along rows
    if isinstance(w_out, LoraWeight):  # a frozen matrix: its adapter's gradients alone (models.lora)
        df_NF, d_w_out = backward_2d(w_out, f_NF, g_NE, dtype, lambda g, w: matmul("ne,fe->nf", g, w, dtype))
        df_NF = dropout(df_NF, rate, key)
    else:
        d_w_out = matmul("ne,nf->ef", g_NE, f_NF, dtype).T.astype(w_out.dtype)
        df_NF = dropout(matmul("ne,fe->nf", g_NE, w_out, dtype), rate, key)
    if b_NF is None:
        da_NF, d_w_b, db_NF = df_NF * slope_NF, None, None
    else:
        da_NF, db_NF = df_NF * b_NF * slope_NF, df_NF * y_NF
    dh_ND, d_w_a = _input_side(w_a, h_ND, da_NF, dtype)
    if db_NF is not None:
        dh_b, d_w_b = _input_side(w_b, h_ND, db_NF, dtype)
        dh_ND = dh_ND + dh_b
    d_bias = None if bias_a is None else da_NF.sum(0).astype(bias_a.dtype)
    return (dh_ND.astype(h_ND.dtype), d_w_a, d_bias, d_w_b, d_w_out, None)


def _input_side(w, h_ND: Array, d_NF: Array, dtype) -> tuple[Array, object]:
    """(dh, dw) of the product h·w given its gradient d."""
    if isinstance(w, LoraWeight):
        return backward_2d(w, h_ND, d_NF, dtype, lambda g, w: matmul("nf,df->nd", g, w, dtype))
    return matmul("nf,df->nd", d_NF, w, dtype), matmul("nd,nf->df", h_ND, d_NF, dtype).astype(w.dtype)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
