"""BitNet b1.58's BitLinear arithmetic (Ma et al. 2024), and the 2-bit layout its weights are kept in.

Why hand-written: no JAX library implements b1.58 (the reference swapped in the unpinned `bitnet`
package's PyTorch BitLinear), and the packed layout is the contract between export, the decoder
and the CPU kernel `rows_linear` (valle_jax/kernels/cpu_kernels.cc), so it lives in one place.

- Weights: ternary t = round(clip(W / s, -1, 1)), s = mean|W| over the matrix (one scale per matrix,
  per layer), times s. Training keeps the float32 latent W; a straight-through estimator passes
  the gradient of the quantised weight to W unchanged (`TernaryWeight.of`).
- Activations: per token (over the contracted features) absmax to 8 bits, q = round(x * 127 /
  max|x|) clipped to [-128, 127], straight through as well.
- The product is computed on the integers (q @ t, exact in float32 accumulation, and exact in
  bfloat16 operands: |q| <= 128, |t| <= 1) and rescaled once: y = (q @ t) * s * max|x| / 127. So
  every path (teacher forcing, XLA over unpacked weights, the kernel over packed ones) computes the
  same sums and differs at most by the order of float32 additions of integers, which is exact.
- Packed: a [K, N] ternary matrix as uint32 [P, K, 2], P = ceil(N / 32), the panels of 32 columns
  the kernel streams (kernels.pack's layout); word 0 of (p, k) has bit j set where t[k, 32p + j] = +1,
  word 1 where it is -1: 2 bits a weight, 16x fewer bytes than float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ACT_MAX = 127.0  # 8-bit activations: round(x * 127 / absmax), clipped to [-128, 127]
EPS = 1e-5  # floor of a weight scale and of a token's absmax (an all-zero matrix or token)
PANEL = 32  # columns per packed panel: one uint32 word per sign (kernels.PANEL)


@jax.custom_vjp
def _ste_ternary(x: Array) -> Array:
    return jnp.round(jnp.clip(x, -1.0, 1.0))


_ste_ternary.defvjp(lambda x: (_ste_ternary(x), None), lambda _, g: (g,))


@jax.custom_vjp
def _ste_int8(x: Array) -> Array:
    return jnp.clip(jnp.round(x), -ACT_MAX - 1.0, ACT_MAX)


_ste_int8.defvjp(lambda x: (_ste_int8(x), None), lambda _, g: (g,))


def weight_scale(w: Array, stacked: bool = False) -> Array:
    """mean|W| of each matrix (each layer's, for a `stacked` [layers, ...] weight), floored at EPS."""
    axes = tuple(range(1 if stacked else 0, w.ndim))
    return jnp.maximum(jnp.abs(w.astype(jnp.float32)).mean(axes), EPS)


def ternary_values(w: Array, stacked: bool = False) -> tuple[Array, Array]:
    """(t, s): W's ternary values (float32, exactly -1, 0 or 1) and scale; no gradient (export, decoding)."""
    s = weight_scale(w, stacked)
    return jnp.round(jnp.clip(w.astype(jnp.float32) / _trailing(s, w.ndim), -1.0, 1.0)), s


def _trailing(a: Array, ndim: int) -> Array:
    """a [lead...] with singleton axes appended up to `ndim` axes (explicit broadcasting)."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


@jax.tree_util.register_pytree_node_class
class TernaryWeight:
    """A BitLinear weight as the layers use it in teacher forcing: `values` (exactly -1, 0 or 1,
    gradient straight through to the latent weight scaled by 1/scale) and `scale` (mean|W|, a
    constant to the gradient, as in the paper's `w + (quant(w) - w).detach()`). `contracted`: how
    many leading axes of the weight a product contracts with x's trailing ones."""

    def __init__(self, values: Array, scale: Array, contracted: int):
        self.values, self.scale, self.contracted = values, scale, contracted

    @classmethod
    def of(cls, w: Array, contracted: int, stacked: bool = False) -> TernaryWeight:
        s = jax.lax.stop_gradient(weight_scale(w, stacked))
        return cls(_ste_ternary(w.astype(jnp.float32) / _trailing(s, w.ndim)), s, contracted)

    def dequantized(self) -> Array:
        """t * s: the weight the layer computes with."""
        return self.values * _trailing(self.scale, self.values.ndim)

    def tree_flatten(self):
        return (self.values, self.scale), self.contracted

    @classmethod
    def tree_unflatten(cls, contracted, children):
        return cls(*children, contracted)

    def apply(self, spec: str, x: Array, dtype) -> Array:
        """What backend.linear(spec, x, W_quantised, dtype) computes, with x quantised per token:
        float32, for a spec contracting x's trailing `contracted` axes with the weight's leading ones."""
        c = self.contracted
        q, x_scale = quantize_activations(x, c)
        y = jnp.einsum(spec, q.astype(dtype), self.values.astype(dtype), preferred_element_type=jnp.float32)
        return y * _trailing(self.scale / x_scale, y.ndim)


def quantize_activations(x: Array, contracted: int = 1) -> tuple[Array, Array]:
    """(q, scale): x's 8-bit integers per token (absmax over the trailing `contracted` axes; float32
    holding integers, gradient straight through times `scale`) and 127 / absmax [lead]."""
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - contracted, x.ndim))
    scale = jax.lax.stop_gradient(ACT_MAX / jnp.maximum(jnp.abs(x).max(axes), EPS))
    return _ste_int8(x * _trailing(scale, x.ndim)), scale


# ---- the packed layout ---------------------------------------------------------------------------


def panels(n: int) -> int:
    return -(-n // PANEL)


def pack(t_KN: Array) -> Array:
    """Ternary t [K, N] (values -1, 0, 1) as uint32 [P, K, 2] (the module docstring's layout)."""
    k, n = t_KN.shape
    p = panels(n)
    t = jnp.pad(t_KN, ((0, 0), (0, p * PANEL - n))).reshape(k, p, PANEL)
    bit = jnp.left_shift(jnp.uint32(1), jnp.arange(PANEL, dtype=jnp.uint32))  # [32]
    words = [jnp.where(t == sign, bit[None, None, :], jnp.uint32(0)).sum(-1, dtype=jnp.uint32) for sign in (1, -1)]
    return jnp.stack(words, -1).transpose(1, 0, 2)  # [P, K, 2]


def unpack(bits_PK2: Array, n: int, dtype=jnp.float32) -> Array:
    """The ternary [K, n] `pack` made bits_PK2 from, in `dtype` (XLA's path: the unpacking is
    elementwise work XLA fuses into the consumer where it can)."""
    p, k, _ = bits_PK2.shape
    shifts = jnp.arange(PANEL, dtype=jnp.uint32)
    b = jnp.right_shift(bits_PK2[..., None], shifts[None, None, None, :]) & jnp.uint32(1)  # [P, K, 2, 32]
    t = b[:, :, 0].astype(dtype) - b[:, :, 1].astype(dtype)  # [P, K, 32]
    return t.transpose(1, 0, 2).reshape(k, p * PANEL)[:, :n]


def packed_bytes(k: int, n: int) -> int:
    """Bytes of a packed [k, n] matrix (4 per 32-column panel row and sign)."""
    return panels(n) * k * 2 * 4


def latent_from_ternary(t: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A float32 latent weight that quantises back to exactly (t, scale): t * scale / p, p the
    fraction of nonzero entries per matrix (leading axes: one matrix each), so mean|W| = scale and
    W / mean|W| = t / p, which clips and rounds to t. What a model loaded from packed weights holds."""
    t = np.asarray(t, np.float32)
    lead = np.asarray(scale).ndim
    p = np.abs(t).reshape(t.shape[:lead] + (-1,)).mean(-1)
    factor = np.asarray(scale, np.float32) / np.maximum(p, 1.0 / max(math.prod(t.shape[lead:]), 1))
    return t * factor.reshape(factor.shape + (1,) * (t.ndim - lead))
