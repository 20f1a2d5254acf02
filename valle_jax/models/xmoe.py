"""torchscale's XMoE layer (torchscale 0.3.0 `Top2Gate` + `MOELayer` with `use_xmoe=True`): what the
reference puts in place of every RetNet feed-forward when experts > 1 (reference.md §3.2, §2.9).

Written out here because no JAX library has this gate, and its numbers depend on details a generic
MoE does not share:
- Routing (in the model's dtype: the reference passes `moe_gating_use_fp32=False`): the input is
  reduced to 16 dims (`wg_reduction`, no bias), multiplied by the rows of `wg` normalised to unit
  length (a half-cosine: the reduced input is not normalised), a softmax over the E experts. The
  first expert is the arg-max, the second the arg-max of the logits without the first; their two
  probabilities are renormalised to sum to 1 before any drop (`use_xmoe` forces that).
- Second-expert policy: "random" (what `use_xmoe` forces) keeps the second expert with probability
  2 p2, in training and at inference; "all" always keeps it (the golden files').
- Capacity: every position of the reference's batch is a token, its padding included (it passes no
  mask), in batch-major order: here the positions up to the longest row's end (what the reference
  pads to; our bucket padding beyond it is no token). Each expert has C slots, given first to every
  first choice in that order, then to the second choices; an assignment past C is dropped (the
  residual carries the token). Training: C = 2 ceil(N / E); otherwise C = ceil(moe_eval_capacity *
  N) (torchscale: 0.25). So a position's output depends on the rest of the batch:
  docs/deviations.md. C depends on N, a traced value: the buffers have a static size (its bound for
  the padded batch) and slots past C are not filled.
- Experts: torchscale's FeedForwardNetwork with sub-LN, `fc2(LayerNorm(gelu(fc1 x)))`, biases.
- l_aux = E^2 * mean_e(mean_n gates[n, e] * mean_n [first(n) = e]) per layer; the reference adds
  0.001 * (sum over layers) to the loss.

Two dispatches give these numbers: with a capacity, GShard's fixed [E, C, D] buffers (one batched
matmul per weight); without one (decoding, `moe_eval_capacity=0`), every assignment computed once by
grouped matmuls over the assignments sorted by expert (`jax.lax.ragged_dot`, as models/moe.py does
for Mixtral) where those are native (backend.grouped_matmul_native), else buffers of N slots, which
hold every assignment (E N rows of work: half of what ragged_dot costs on the CPU).

The random policy's draws: torch draws them from its global RNG, which nothing else reproduces.
Here a draw is a counter-based hash (layers.hash_bits): in training, of the step's key, the layer
and the token's index in the batch (fresh every step); otherwise of the layer and the token's
position alone, so inference is deterministic and a position gets the same draw whether it is
decoded step by step, in a batch or teacher-forced (the tests compare those).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from valle_jax import backend
from valle_jax.config import ModelConfig
from valle_jax.models import layers as L
from valle_jax.models.lora import LoraWeight

Array = jax.Array
GATE_DIM = 16  # torchscale's wg_reduction width
NORM_EPS = 1e-4  # F.normalize's eps on the rows of wg
INFERENCE_SEED = 0x5EED  # the fixed draws outside training, varied per layer
# a layer's parameters, each with a leading layers axis (backbones.XMoERetNetBackbone)
PARAMS = (
    "gate_reduce",  # [D, 16]: wg_reduction
    "gate_wg",  # [E, 16]: wg, torch's layout (its rows are normalised)
    "expert_fc1",  # [E, D, F]
    "expert_fc1_bias",  # [E, F]
    "expert_norm",  # [E, F]: ffn_layernorm
    "expert_norm_bias",  # [E, F]
    "expert_fc2",  # [E, F, D]
    "expert_fc2_bias",  # [E, D]
)


class Mode(NamedTuple):
    """How a teacher-forced call routes: torchscale's training or eval mode (`model.train()`), and
    the training draws' key (None outside training)."""

    train: bool = False
    key: Array | None = None


class Call(NamedTuple):
    """What an XMoE layer knows of its call (the `features` every layer receives)."""

    positions: Array  # int [B, S]
    tokens: Array | None  # bool [B, S]: the positions that are tokens of the reference's batch; None: all
    slots: int | None  # static buffer size per expert (the capacity's bound); None: no capacity
    train: bool  # the capacity is the training one (else the eval one)
    key: Array | None  # the training draws' key; None: the fixed draws, by position


def capacity(tokens, train: bool, cfg: ModelConfig):
    """Slots per expert for `tokens` tokens (a Python int or a traced one): torchscale's top-2
    training capacity 2 ceil(N / E), or ceil(moe_eval_capacity * N) (0: no limit, None). Never more
    than N: a token takes at most one slot of an expert, so N slots hold every assignment."""
    if train:
        c = 2 * (-(-tokens // cfg.n_experts))
    elif cfg.moe_eval_capacity > 0:
        scaled = cfg.moe_eval_capacity * tokens
        c = math.ceil(scaled) if isinstance(tokens, int) else jnp.ceil(scaled).astype(jnp.int32)
    else:
        return None
    return min(tokens, c) if isinstance(tokens, int) else jnp.minimum(tokens, c)


def teacher_call(cfg: ModelConfig, positions_BS: Array, valid_BS: Array, mode: Mode | None) -> Call:
    """The Call of a teacher-forced forward: the tokens are the positions before the longest row's
    end (the reference pads its batch to that row)."""
    mode = mode or Mode()
    b, s = positions_BS.shape
    extent = jnp.max(jnp.where(valid_BS, jnp.arange(1, s + 1)[None, :], 0))
    tokens = jnp.broadcast_to((jnp.arange(s) < extent)[None, :], (b, s))
    return Call(positions_BS, tokens, capacity(b * s, mode.train, cfg), mode.train, mode.key if mode.train else None)


def decoding_call(positions_BS: Array) -> Call:
    """Decoding routes without a capacity: torchscale's own recurrent form, one utterance one
    position at a time, has ceil(0.25 * 1) = 1 slot per expert for its single token, never full."""
    return Call(positions_BS, None, None, False, None)


class Gate(NamedTuple):
    """Each token's two experts, their renormalised weights, and the layer's l_aux."""

    first: Array  # int32 [N]
    second: Array  # int32 [N]
    w_first: Array  # float32 [N]
    w_second: Array  # float32 [N]: 0 where the policy dropped the second expert
    keep_second: Array  # bool [N]
    l_aux: Array  # float32 []


def gate(h_ND: Array, reduce_DG: Array, wg_EG: Array, tokens_N: Array, uniform_N: Array | None, dtype) -> Gate:
    """Top2Gate with use_xmoe in `dtype` (`tokens_N`: which rows are tokens, the ones l_aux averages
    over; `uniform_N`: the random policy's draws in [0, 1), None: the policy "all")."""
    reduced = L.matmul("nd,dg->ng", h_ND, reduce_DG, dtype).astype(dtype)
    wg = wg_EG.astype(jnp.float32)
    unit = wg / jnp.maximum(jnp.linalg.norm(wg, axis=1, keepdims=True), NORM_EPS)
    logits = jnp.einsum("ng,eg->ne", reduced.astype(jnp.float32), unit).astype(dtype)
    finite = jnp.isfinite(logits)  # torchscale replaces non-finite scores by the smallest finite one
    logits = jnp.where(finite, logits, jnp.min(jnp.where(finite, logits, jnp.inf)))
    gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
    e = gates.shape[1]
    first = jnp.argmax(gates, axis=-1)
    second = jnp.argmax(jnp.where(jax.nn.one_hot(first, e, dtype=bool), -jnp.inf, logits), axis=-1)
    g1 = jnp.take_along_axis(gates, first[:, None], 1)[:, 0]
    g2 = jnp.take_along_axis(gates, second[:, None], 1)[:, 0]
    denom = jnp.maximum(g1 + g2, jnp.finfo(dtype).eps)
    g1, g2 = (g1 / denom).astype(jnp.float32), (g2 / denom).astype(jnp.float32)
    keep = jnp.ones_like(g2, bool) if uniform_N is None else 2.0 * g2 > uniform_N
    m = tokens_N[:, None].astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    share = (gates.astype(jnp.float32) * m).sum(0) / n  # me: the mean gate of each expert
    chosen = (jax.nn.one_hot(first, e, dtype=jnp.float32) * m).sum(0) / n  # ce: the share of first choices
    return Gate(
        first.astype(jnp.int32),
        second.astype(jnp.int32),
        g1,
        jnp.where(keep, g2, 0.0),
        keep,
        jnp.mean(share * chosen) * e * e,
    )


def draws(call: Call, layer: Array) -> Array:
    """float32 [B * S] uniform in [0, 1): the random policy's draw for each token (module docstring)."""
    if call.key is None:
        seed = L.hash_bits(layer.astype(jnp.uint32), jnp.uint32(INFERENCE_SEED))
        idx = call.positions.astype(jnp.uint32)
    else:
        seed = jax.random.bits(jax.random.fold_in(call.key, layer), (), jnp.uint32)
        idx = jax.lax.iota(jnp.uint32, math.prod(call.positions.shape)).reshape(call.positions.shape)
    return (L.hash_bits(idx, seed) >> 8).reshape(-1).astype(jnp.float32) * 2.0**-24


def _experts(x, p: dict, product, rows, eps: float) -> Array:
    """fc2(LayerNorm(gelu(fc1 x))) with biases per expert: `product(x, w)` is the per-expert matmul,
    `rows(t)` an [E, ...] table as x's rows see it."""
    a = jax.nn.gelu(product(x, p["expert_fc1"]) + rows(p["expert_fc1_bias"]), approximate=False)
    a = L.layer_norm(a, rows(p["expert_norm"]), rows(p["expert_norm_bias"]), eps)
    return product(a, p["expert_fc2"]) + rows(p["expert_fc2_bias"])


def with_capacity(h_ND: Array, p: dict, g: Gate, tokens_N: Array, slots: int, limit: Array, eps: float, dtype) -> Array:
    """GShard's dispatch into [E, C, D] buffers (C = `slots`, static): slots by first choices in
    token order, then by second choices; assignments past `limit` (<= C, traced) are dropped, and
    rows that are no token take none. Returns float32 [N, D]."""
    n, d = h_ND.shape
    e, c = p["gate_wg"].shape[0], slots
    expert_A = jnp.concatenate([g.first, g.second])  # choice-major: every first choice, then the seconds
    live_A = jnp.concatenate([tokens_N, tokens_N & g.keep_second])
    onehot_AE = jax.nn.one_hot(expert_A, e, dtype=jnp.int32) * live_A[:, None]
    slot_A = (jnp.cumsum(onehot_AE, axis=0) * onehot_AE).sum(-1) - 1
    kept_A = live_A & (slot_A < limit)
    dest_A = jnp.where(kept_A, expert_A * c + slot_A, e * c)  # dropped: a spare row, read back as zeros
    token_A = jnp.concatenate([jnp.arange(n), jnp.arange(n)])
    x_ECD = jnp.zeros((e * c + 1, d), h_ND.dtype).at[dest_A].set(h_ND[token_A])[: e * c].reshape(e, c, d)

    def plain(x_ECK, w_EKF):
        x_ECK, w_EKF = backend.batched_dot_operands(x_ECK.astype(dtype), w_EKF.astype(dtype))
        return jnp.einsum("eck,ekf->ecf", x_ECK, w_EKF, preferred_element_type=jnp.float32)

    def batched(x_ECK, w):
        if isinstance(w, LoraWeight):  # a LoRA adapter beside the frozen experts (models.lora)
            return w.product(x_ECK, plain, None if w.seed is None else w.seed[:, None, None])
        return plain(x_ECK, w)

    y_ECD = _experts(x_ECD, p, batched, lambda t: t[:, None], eps)
    y_AD = jnp.concatenate([y_ECD.reshape(e * c, d), jnp.zeros((1, d), y_ECD.dtype)])[dest_A]
    return y_AD[:n] * g.w_first[:, None] + y_AD[n:] * g.w_second[:, None]


def dropless(h_ND: Array, p: dict, g: Gate, eps: float, dtype) -> Array:
    """Every assignment, by grouped matmuls over the assignments sorted by expert. float32 [N, D]."""
    n = h_ND.shape[0]
    e = p["gate_wg"].shape[0]
    expert_A = jnp.concatenate([g.first, g.second])
    order_A = jnp.argsort(expert_A, stable=True)
    sizes_E = jnp.bincount(expert_A, length=e).astype(jnp.int32)
    sorted_expert = expert_A[order_A]

    def plain(x_MK, w_EKF):
        x_MK, w_EKF = backend.batched_dot_operands(x_MK.astype(dtype), w_EKF.astype(dtype))
        return jax.lax.ragged_dot(x_MK, w_EKF, sizes_E, preferred_element_type=jnp.float32)

    def grouped(x_MK, w):
        if isinstance(w, LoraWeight):  # each row's dropout seed is its expert's
            return w.product(x_MK, plain, None if w.seed is None else w.seed[sorted_expert][:, None])
        return plain(x_MK, w)

    y = _experts(h_ND[order_A % n], p, grouped, lambda t: t[sorted_expert], eps)
    y_AD = jnp.zeros_like(y).at[order_A].set(y, unique_indices=True)
    return y_AD[:n] * g.w_first[:, None] + y_AD[n:] * g.w_second[:, None]


def xmoe_ffn(h_BSD: Array, p: dict, call: Call, cfg: ModelConfig) -> tuple[Array, Array]:
    """(the XMoE layer's output float32 [B, S, D], its l_aux) over the call's tokens (padding
    included, module docstring); `p` holds the layer's PARAMS and its "layer_index" (which keys its
    draws)."""
    b, s, d = h_BSD.shape
    dt = jnp.dtype(cfg.dtype)
    h_ND = h_BSD.reshape(b * s, d)
    tokens_N = jnp.ones((b * s,), bool) if call.tokens is None else call.tokens.reshape(-1)
    uniform = draws(call, p["layer_index"]) if cfg.moe_second_policy == "random" else None
    g = gate(h_ND, p["gate_reduce"], p["gate_wg"], tokens_N, uniform, dt)
    if call.slots is None and backend.grouped_matmul_native():
        out = dropless(h_ND, p, g, cfg.eps, dt)
    elif call.slots is None:
        out = with_capacity(h_ND, p, g, tokens_N, b * s, jnp.asarray(b * s), cfg.eps, dt)
    else:
        limit = capacity(tokens_N.sum(dtype=jnp.int32), call.train, cfg)
        out = with_capacity(h_ND, p, g, tokens_N, call.slots, limit, cfg.eps, dt)
    return out.reshape(b, s, d), g.l_aux


def orthogonal_rows(gain: float):
    """torch.nn.init.orthogonal_(w, gain) for each layer's [E, 16] `wg` of a [layers, E, 16] stack."""
    one = jax.nn.initializers.orthogonal(scale=gain)
    return lambda key, shape, dtype: jax.vmap(lambda k: one(k, shape[1:], dtype))(jax.random.split(key, shape[0]))
