"""Mixtral's sparse mixture-of-experts feed-forward (HF `MixtralSparseMoeBlock`, transformers 4.40,
as the reference builds it for experts > 1; reference.md §3.3) and its load-balancing loss.

Routing: router logits `h @ W_r` (no bias), a float32 softmax over the E experts, the k best, their k
probabilities renormalised to sum to 1. Expert e is `w2(gelu(w1 h) * w3 h)` (exact gelu: the
reference's hidden_act "gelu"). A token's output is the weighted sum of its k experts' outputs.

Two dispatches, equal wherever no assignment is dropped (tests/test_moe.py):
- "dropless": the N*k (token, expert) assignments sorted by expert, each expert's three matmuls a
  grouped matmul over its run of sorted rows (`jax.lax.ragged_dot`), the results put back in token
  order. Every assignment is computed once and none is dropped, with static shapes.
- "capacity": each expert has C = ceil(capacity_factor * N * k / E) slots (at most N), filled first
  come first served with every token's first choice before any second choice (GShard's priority);
  the experts run as one batched matmul over [E, C, D]. Assignments past an expert's C slots are
  dropped: they add nothing, the residual carries the token. Padding positions take no slot.
Which to use where: docs/model.md ("Mixture of experts").

Expert parallelism: when the current mesh (`jax.set_mesh`, as the training steps trace) has an
`expert` axis of n > 1 devices, each holds E / n experts and its own share of the tokens (the axis
is also a data-parallel axis), and the layer runs in `jax.shard_map` over that axis alone (data,
fsdp and tensor stay with XLA's partitioner). Tokens travel by `jax.lax.all_to_all`:
- "dropless": each device packs its assignments by destination into n fixed buffers of
  tokens * min(k, E / n) rows (the most one device can be sent, so nothing drops), the all-to-all
  delivers them, the receiver sorts what it got by its local expert for `ragged_dot`, and a second
  all-to-all brings the results home. Equal to one device to float rounding (tests/test_expert_parallel.py).
- "capacity": GShard's exchange, the [E, C, D] slot buffer of each device's tokens split by
  expert and gathered by slot, [E / n, n * C, D]; C comes from the device's own tokens, so which
  assignments drop depends on n (nothing drops with capacity_factor >= E / k).
Why all-to-all in shard_map and not sharding constraints: docs/model.md ("Expert parallelism").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from valle_jax import backend
from valle_jax.config import EXPERT_AXIS, ModelConfig
from valle_jax.models.layers import matmul
from valle_jax.models.lora import LoraWeight

Array = jax.Array


class Routing(NamedTuple):
    experts_NK: Array  # int32: each token's k experts, best first
    weights_NK: Array  # float32: their probabilities, renormalised to sum to 1 over the k
    probs_NE: Array  # float32: the softmax over every expert (what the load-balancing loss averages)


def route(h_ND: Array, router_DE: Array, k: int, dtype) -> Routing:
    probs = jax.nn.softmax(matmul("nd,de->ne", h_ND, router_DE, dtype), axis=-1)
    top_p, top_e = jax.lax.top_k(probs, k)
    return Routing(top_e.astype(jnp.int32), top_p / top_p.sum(-1, keepdims=True), probs)


def _expert_ffn(x: Array, w1: Array, w3: Array, w2: Array, product) -> Array:
    """w2(gelu(w1 x) * w3 x) per expert, `product(x, w)` being the per-expert matmul."""
    return product(jax.nn.gelu(product(x, w1), approximate=False) * product(x, w3), w2)


def _grouped_ffn(x_MD: Array, expert_M: Array, w1: Array, w3: Array, w2: Array, dtype) -> Array:
    """Each row through the expert `expert_M` names (a value >= E: no expert, a zero row), by
    grouped matmuls over the rows sorted by expert; results in the rows' own order."""
    order_M = jnp.argsort(expert_M, stable=True)
    sizes_E = jnp.zeros(w1.shape[0], jnp.int32).at[expert_M].add(1, mode="drop")  # rows past their sum: zeros

    def plain(x_MD, w_EDF):
        # the CPU has no batched bfloat16 dot, and jax lowers ragged_dot there to one
        x_MD, w_EDF = backend.batched_dot_operands(x_MD.astype(dtype), w_EDF.astype(dtype))
        return jax.lax.ragged_dot(x_MD, w_EDF, sizes_E, preferred_element_type=jnp.float32)

    def grouped(x_MD, w):
        if isinstance(w, LoraWeight):  # each row's dropout seed is its expert's (models.lora)
            seed = None if w.seed is None else jnp.repeat(w.seed, sizes_E, total_repeat_length=x_MD.shape[0])
            return w.product(x_MD, plain, None if seed is None else seed[:, None])
        return plain(x_MD, w)

    y_MD = _expert_ffn(x_MD[order_M], w1, w3, w2, grouped)
    return jnp.zeros_like(y_MD).at[order_M].set(y_MD, unique_indices=True)


def dropless(h_ND: Array, w1: Array, w3: Array, w2: Array, r: Routing, dtype) -> Array:
    """Every assignment computed by grouped matmuls over the assignments sorted by expert."""
    n, k = r.experts_NK.shape
    y_AD = _grouped_ffn(jnp.repeat(h_ND, k, axis=0), r.experts_NK.reshape(-1), w1, w3, w2, dtype)
    return (y_AD.reshape(n, k, -1) * r.weights_NK[..., None]).sum(1)


def dropless_exchange(h_ND: Array, w1: Array, w3: Array, w2: Array, r: Routing, dtype, axis: str) -> Array:
    """`dropless` with the experts split over mesh axis `axis` (inside shard_map; w1, w3, w2 hold this
    device's E / n experts): assignments go to their expert's device and come back by all-to-all."""
    n, k = r.experts_NK.shape
    local, devices = w1.shape[0], jax.lax.axis_size(axis)
    rows = n * min(k, local)  # per destination: a token never picks one expert twice
    flat_A = r.experts_NK.reshape(-1)  # assignment a = token a // k, choice a % k
    dest_A = flat_A // local
    onehot_AP = jax.nn.one_hot(dest_A, devices, dtype=jnp.int32)
    slot_A = dest_A * rows + (jnp.cumsum(onehot_AP, axis=0) * onehot_AP).sum(-1) - 1  # its row in the send buffer
    send_RD = jnp.zeros((devices * rows, h_ND.shape[1]), h_ND.dtype).at[slot_A].set(jnp.repeat(h_ND, k, axis=0))
    send_R = jnp.full((devices * rows,), local, jnp.int32).at[slot_A].set(flat_A % local)  # `local`: an empty row

    def exchange(x):  # block j of the rows goes to device j; block i of the result came from device i
        return jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0, tiled=True)

    y_RD = _grouped_ffn(exchange(send_RD), exchange(send_R), w1, w3, w2, dtype)
    y_AD = exchange(y_RD)[slot_A]
    return (y_AD.reshape(n, k, -1) * r.weights_NK[..., None]).sum(1)


def capacity_slots(tokens: int, k: int, experts: int, factor: float) -> int:
    """Slots per expert: capacity_factor times an even share of the assignments, at least 1 and at
    most `tokens` (a token never picks one expert twice)."""
    return max(1, min(tokens, math.ceil(factor * tokens * k / experts)))


def capacity(
    h_ND: Array,
    w1: Array,
    w3: Array,
    w2: Array,
    r: Routing,
    valid_N: Array,
    factor: float,
    dtype,
    axis: str | None = None,
) -> Array:
    """Fixed-size expert buffers [E, C, D]; assignments beyond an expert's C slots are dropped. With
    `axis` (inside shard_map; w1, w3, w2 this device's experts) the buffers are exchanged by all-to-all."""
    n, k = r.experts_NK.shape
    e, d = r.probs_NE.shape[1], h_ND.shape[1]
    c = capacity_slots(n, k, e, factor)
    expert_A = r.experts_NK.T.reshape(-1)  # choice-major: all first choices, then all second ones
    token_A = jnp.tile(jnp.arange(n), k)
    live_A = jnp.tile(valid_N, k)
    onehot_AE = jax.nn.one_hot(expert_A, e, dtype=jnp.int32) * live_A[:, None]
    slot_A = (jnp.cumsum(onehot_AE, axis=0) * onehot_AE).sum(-1) - 1  # place in its expert's queue
    kept_A = live_A & (slot_A >= 0) & (slot_A < c)
    dest_A = jnp.where(kept_A, expert_A * c + slot_A, e * c)  # dropped: a spare row, never read back
    x_ECD = jnp.zeros((e * c + 1, d), h_ND.dtype).at[dest_A].set(h_ND[token_A])[: e * c].reshape(e, c, d)

    def plain(x_ECD, w_EDF):
        x_ECD, w_EDF = backend.batched_dot_operands(x_ECD.astype(dtype), w_EDF.astype(dtype))
        return jnp.einsum("ecd,edf->ecf", x_ECD, w_EDF, preferred_element_type=jnp.float32)

    def batched(x_ECD, w):
        if isinstance(w, LoraWeight):
            return w.product(x_ECD, plain, None if w.seed is None else w.seed[:, None, None])
        return plain(x_ECD, w)

    if axis is not None:  # [E, C, D] -> this device's experts' slots from every device, [E / n, n * C, D]
        x_ECD = jax.lax.all_to_all(x_ECD, axis, split_axis=0, concat_axis=1, tiled=True)
    y_ECD = _expert_ffn(x_ECD, w1, w3, w2, batched)
    if axis is not None:
        y_ECD = jax.lax.all_to_all(y_ECD, axis, split_axis=1, concat_axis=0, tiled=True)
    y_AD = jnp.concatenate([y_ECD.reshape(e * c, d), jnp.zeros((1, d), y_ECD.dtype)])[dest_A]
    y_NKD = y_AD.reshape(k, n, d).transpose(1, 0, 2)
    return (y_NKD * r.weights_NK[..., None]).sum(1)


def balance_stats(r: Routing, valid_N: Array) -> Array:
    """float32 [2, E] of one layer over its valid positions: how many assignments each expert got,
    and the sum of each expert's router probability (what the load-balancing loss needs)."""
    m = valid_N[:, None].astype(jnp.float32)
    chosen_NE = jax.nn.one_hot(r.experts_NK, r.probs_NE.shape[1], dtype=jnp.float32).sum(1)
    return jnp.stack([(chosen_NE * m).sum(0), (r.probs_NE * m).sum(0)])


def balance_loss(stats_L2E: Array, tokens: Array) -> Array:
    """HF's `load_balancing_loss_func` over every layer's router logits at once: E * sum over experts
    of (the fraction of all (layer, token) rows that picked it among their k) * (its mean router
    probability). Both means run over the `tokens` valid positions of each layer (HF's masked
    variant; the reference passes no mask, so its padding counts: docs/deviations.md)."""
    n = stats_L2E.shape[0] * jnp.maximum(tokens, 1).astype(jnp.float32)
    sums = stats_L2E.sum(0)
    return stats_L2E.shape[-1] * jnp.sum((sums[0] / n) * (sums[1] / n))


def expert_shards() -> int:
    """How many devices the current mesh's expert axis has (1: no mesh, or no such axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)


def _moe_ffn(h_BSD, router, w1, w3, w2, valid_BS, cfg: ModelConfig, axis: str | None):
    b, s, d = h_BSD.shape
    dt = jnp.dtype(cfg.dtype)
    h_ND, valid_N = h_BSD.reshape(b * s, d), valid_BS.reshape(b * s)
    r = route(h_ND, router, cfg.top_k, dt)
    if cfg.moe_dispatch == "capacity":
        out = capacity(h_ND, w1, w3, w2, r, valid_N, cfg.capacity_factor, dt, axis)
    elif axis is not None:
        out = dropless_exchange(h_ND, w1, w3, w2, r, dt, axis)
    else:
        out = dropless(h_ND, w1, w3, w2, r, dt)
    stats = balance_stats(r, valid_N)
    return out.reshape(b, s, d), (stats if axis is None else jax.lax.psum(stats, axis))


def moe_ffn(
    h_BSD: Array, router: Array, w1: Array, w3: Array, w2: Array, valid_BS: Array, cfg: ModelConfig
) -> tuple[Array, Array]:
    """(the MoE feed-forward's output float32 [B, S, D], balance_stats [2, E]) by `cfg.moe_dispatch`,
    expert-parallel over the current mesh's expert axis where it has several devices."""
    shards = expert_shards()
    if shards == 1:
        return _moe_ffn(h_BSD, router, w1, w3, w2, valid_BS, cfg, None)
    if w1.shape[0] % shards or h_BSD.shape[0] % shards:
        raise ValueError(
            f"expert parallelism over {shards} devices needs experts ({w1.shape[0]}) and batch rows "
            f"({h_BSD.shape[0]}) divisible by {shards}"
        )
    split = P(EXPERT_AXIS)  # experts, or the batch rows: the expert axis is also a data-parallel axis
    return jax.shard_map(
        functools.partial(_moe_ffn, cfg=cfg, axis=EXPERT_AXIS),
        in_specs=(split, P(), split, split, split, split),
        out_specs=(split, P()),
        axis_names={EXPERT_AXIS},
        # JAX 0.11+ checks varying manual axes and rejects its own exact GELU here: lax.erf's
        # polynomial mixes the expert-varying activations with unvarying constants ("Primitive
        # polynomial requires varying manual axes to match"; JAX's suggested workaround). The check
        # only guards collectives' transposes; tests/test_expert_parallel.py compares the whole
        # step, gradients included, with one device (docs/install.md, the newest-versions run).
        check_vma=False,
    )(h_BSD, router, w1, w3, w2, valid_BS)
