"""Multi-scale retention (RetNet, reference.md §3.2) in one exact formulation with three schedules.

Per head h with decay gamma = exp(lambda_h), lambda_h = log(1 - 2^(-5-h)), the reference's parallel
form computes, for query position i over key positions j <= i,

    A_ij = (q_i . k_j) gamma^(i-j) / sqrt(c_i),    c_i = sum_{m<=i} gamma^m  (the row-normalised decay)
    o_i  = sum_j A_ij v_j / max(|sum_j A_ij|, 1)   (the detached |row-sum| normaliser)

Both sums factor through a state of everything before a point: S = sum_j gamma^(e-j) k_j v_j^T and
z = sum_j gamma^(e-j) k_j, stored divided by sqrt(c_e) so they stay O(1) in magnitude, plus the
count n of positions absorbed (e = n - 1). `retain_chunk` computes a block of positions exactly from
the state before it and returns the state after it, so

    parallel   = one chunk over the whole sequence from the empty state (training),
    chunkwise  = a scan over fixed-size chunks (long prefills; the last chunk may be shorter),
    recurrent  = chunks of one position (decoding: a fixed-size state per layer),

compute the same numbers (the normaliser included, which the reference's recurrent and chunkwise
forms only approximate) up to float rounding. Positions are absolute (position p has p positions
before it); invalid positions (right padding) contribute nothing and do not advance the state.

Shapes: B batch, C chunk positions, H heads, Dk key width d/H, Dv value width 2d/H.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class State(NamedTuple):
    """One layer's recurrent state: kv [B, H, Dk, Dv] and k_sum [B, H, Dk], both divided by
    sqrt(c_e), and count [B] (int32), the number of positions absorbed."""

    kv: Array
    k_sum: Array
    count: Array


def empty_state(batch: int, heads: int, key_dim: int, value_dim: int) -> State:
    return State(
        jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32),
        jnp.zeros((batch, heads, key_dim), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
    )


def decay_rates(heads: int) -> Array:
    """lambda_h = log(1 - 2^(-5-h)): the log of each head's per-position decay (torchscale's buffer)."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))))


def angles(key_dim: int, base: float) -> Array:
    """base^-linspace(0, 1, Dk/2), each value twice in a row (interleaved pairs; both ends included)."""
    return jnp.repeat(1.0 / base ** jnp.linspace(0.0, 1.0, key_dim // 2, dtype=jnp.float32), 2)


def rotate(x_BSHD: Array, positions_BS: Array, angle_D: Array) -> Array:
    """x cos + r(x) sin with r mapping each pair (x1, x2) to (-x2, x1) ("rotate every two")."""
    ang = positions_BS.astype(jnp.float32)[:, :, None, None] * angle_D[None, None, None, :]
    x = x_BSHD.astype(jnp.float32)
    pairs = x.reshape(x.shape[:-1] + (-1, 2))
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * jnp.cos(ang) + rotated * jnp.sin(ang)


def _mass(n: Array, lam: Array) -> Array:
    """c(n) = sum_{m<n} gamma^m = expm1(n lambda) / expm1(lambda): exact in float32 even where gamma
    is within 1e-6 of 1 (1 - gamma^n would cancel)."""
    return jnp.expm1(n * lam) / jnp.expm1(lam)


class Plan(NamedTuple):
    """The decay terms of one chunk, shared by every layer (they depend on positions only)."""

    decay_BHCC: Array  # gamma^(p_i - p_j) for valid j with p_j <= p_i, else 0
    inv_norm_BHC: Array  # 1 / sqrt(c_i)
    from_state_BHC: Array  # gamma^(p_i - e) sqrt(c_e): weight of the incoming state for row i
    to_state_BHC: Array  # gamma^(e' - p_j) for valid j, else 0: each position's share of the new state
    carry_BH: Array  # gamma^(e' - e) sqrt(c_e / c_e'): the incoming state's share of the new state
    count_B: Array  # n': positions absorbed after the chunk


def plan(positions_BC: Array, valid_BC: Array, count_B: Array, lam_H: Array) -> Plan:
    lam = lam_H[None, :, None]
    pos = positions_BC.astype(jnp.int32)
    rel = pos[:, :, None] - pos[:, None, :]  # [B, C(i), C(j)]
    keep = valid_BC[:, None, :] & (rel >= 0)
    decay = jnp.where(
        keep[:, None], jnp.exp(lam[..., None] * jnp.where(keep, rel, 0)[:, None].astype(jnp.float32)), 0.0
    )
    inv_norm = jax.lax.rsqrt(_mass((pos + 1).astype(jnp.float32)[:, None, :], lam))  # c_i >= 1
    n = count_B.astype(jnp.float32)[:, None, None]  # the state ends at e = n - 1
    root_c = jnp.sqrt(_mass(n, lam))
    from_state = jnp.exp(lam * (pos[:, None, :] - (n - 1.0))) * root_c
    new_count = count_B + valid_BC.sum(1).astype(jnp.int32)
    n2 = new_count.astype(jnp.float32)[:, None, None]  # e' = n2 - 1
    c2 = _mass(n2, lam)
    inv_root_c2 = jnp.where(c2 > 0, jax.lax.rsqrt(jnp.maximum(c2, 1e-30)), 0.0)  # 0 while nothing is absorbed
    to_state = jnp.where(valid_BC[:, None, :], jnp.exp(lam * jnp.maximum(n2 - 1.0 - pos[:, None, :], 0.0)), 0.0)
    carry = jnp.exp(lam * (n2 - n)) * root_c * inv_root_c2
    return Plan(decay, inv_norm, from_state, to_state * inv_root_c2, carry[..., 0], new_count)


def retain_chunk(
    q_BCHD: Array, k_BCHD: Array, v_BCHE: Array, p: Plan, state: State | None, want_state: bool = True
) -> tuple[Array, State | None]:
    """Retention outputs [B, C, H, Dv] (before the group norm) for a chunk whose queries and keys
    are already rotated, continuing `state` (None: the empty state); and the state after it."""
    f32 = jnp.float32
    q, k, v = q_BCHD.astype(f32), k_BCHD.astype(f32), v_BCHE.astype(f32)
    scores = jnp.einsum("bihd,bjhd->bhij", q, k) * p.decay_BHCC
    num = jnp.einsum("bhij,bjhe->bhie", scores, v)
    row_sum = scores.sum(-1)
    if state is not None:
        num = num + p.from_state_BHC[..., None] * jnp.einsum("bihd,bhde->bhie", q, state.kv)
        row_sum = row_sum + p.from_state_BHC * jnp.einsum("bihd,bhd->bhi", q, state.k_sum)
    num, row_sum = num * p.inv_norm_BHC[..., None], row_sum * p.inv_norm_BHC
    # the reference detaches this normaliser: no gradient flows through it
    out = num / jnp.maximum(jnp.abs(jax.lax.stop_gradient(row_sum)), 1.0)[..., None]
    if not want_state:
        return out.transpose(0, 2, 1, 3), None
    kv = jnp.einsum("bhj,bjhd,bjhe->bhde", p.to_state_BHC, k, v)
    k_sum = jnp.einsum("bhj,bjhd->bhd", p.to_state_BHC, k)
    if state is not None:
        kv = kv + p.carry_BH[..., None, None] * state.kv
        k_sum = k_sum + p.carry_BH[..., None] * state.k_sum
    return out.transpose(0, 2, 1, 3), State(kv, k_sum, p.count_B)


def chunked(
    fn,
    q_BSHD: Array,
    k_BSHD: Array,
    v_BSHE: Array,
    positions_BS: Array,
    valid_BS: Array,
    state: State,
    lam_H: Array,
    chunk: int,
) -> tuple[Array, State]:
    """`fn(q, k, v, plan, state) -> (out, state)` over consecutive chunks of `chunk` positions (a
    `lax.scan`), then the remainder as one shorter chunk; the outputs concatenated."""
    s = q_BSHD.shape[1]
    n_full, rest = divmod(s, chunk)
    outs = []
    if n_full:

        def split(a):
            a = a[:, : n_full * chunk]
            return jnp.moveaxis(a.reshape((a.shape[0], n_full, chunk) + a.shape[2:]), 1, 0)

        def body(st, xs):
            q, k, v, pos, val = xs
            out, st = fn(q, k, v, plan(pos, val, st.count, lam_H), st)
            return st, out

        state, out = jax.lax.scan(
            body, state, tuple(split(a) for a in (q_BSHD, k_BSHD, v_BSHE, positions_BS, valid_BS))
        )
        outs.append(jnp.moveaxis(out, 0, 1).reshape((out.shape[1], n_full * chunk) + out.shape[3:]))
    if rest:
        tail = lambda a: a[:, n_full * chunk :]  # noqa: E731
        out, state = fn(
            tail(q_BSHD),
            tail(k_BSHD),
            tail(v_BSHE),
            plan(tail(positions_BS), tail(valid_BS), state.count, lam_H),
            state,
        )
        outs.append(out)
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), state


def xavier_uniform(gain: float, fan_in: int, fan_out: int):
    """torch's xavier_uniform_ (torchscale's retention init) for a kernel of any layout."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
