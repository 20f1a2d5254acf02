"""Token samplers (reference.md §5), pure jnp and per row: every setting is an array with one value per
batch row, so changing it between calls never recompiles, and rows of one batch may differ.

Order of operations (the reference's `Base.sample`): repetition penalty -> length penalty -> (ours)
the stop token banned below a minimum length -> top-k / top-p / min-p -> temperature (dynamic when
min_temperature differs) -> draw. Temperature 0 is greedy (the reference divides by zero there).

Penalties are sign-aware by default: a positive logit is divided by the penalty, a negative one
multiplied, so a penalty never makes a token more likely. `sign_aware=False` is the reference's
variant (always divide), kept for comparison (docs/deviations.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


def _penalise(logits: Array, penalty: Array, sign_aware: bool) -> Array:
    if sign_aware:
        return jnp.where(logits > 0, logits / penalty, logits * penalty)
    return logits / penalty


def repetition_factors(
    history_BT: Array, history_valid_BT: Array, factor_B: Array, decay_B: Array, vocab: int
) -> tuple[Array, Array]:
    """(penalty [B, V], applies [B, V]) for a row's history: each token already in it is penalised
    once, by factor * distance^decay, where distance is 1 for the most recent position of the
    history, 2 for the one before, ... and the token's most recent occurrence counts (the
    reference's one_time walk from the end). Separate from applying it so that one history can
    penalise many rows (the NAR's frames all share the previous level's codes)."""
    b, t = history_BT.shape
    last = jnp.max(jnp.where(history_valid_BT, jnp.arange(t)[None, :], -1), axis=1)  # [B]
    distance = (last[:, None] - jnp.arange(t)[None, :] + 1).astype(jnp.float32)
    distance = jnp.where(history_valid_BT, distance, jnp.inf)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], history_BT.shape)
    nearest_BV = jnp.full((b, vocab), jnp.inf).at[rows, jnp.clip(history_BT, 0, vocab - 1)].min(distance)
    seen = jnp.isfinite(nearest_BV)
    penalty = factor_B[:, None] * jnp.where(seen, nearest_BV, 1.0) ** decay_B[:, None]
    return penalty, seen & (factor_B[:, None] != 1.0)


def apply_penalty(logits: Array, penalty: Array, applies: Array, sign_aware: bool = True) -> Array:
    return jnp.where(applies, _penalise(logits, penalty, sign_aware), logits)


def repetition_penalty(
    logits_BV: Array,
    history_BT: Array,
    history_valid_BT: Array,
    factor_B: Array,
    decay_B: Array,
    sign_aware: bool = True,
) -> Array:
    """`repetition_factors` applied to the row's own logits."""
    penalty, applies = repetition_factors(history_BT, history_valid_BT, factor_B, decay_B, logits_BV.shape[1])
    return apply_penalty(logits_BV, penalty, applies, sign_aware)


def length_penalty(
    logits_BV: Array, length_B: Array, factor_B: Array, stop_token: int, sign_aware: bool = True
) -> Array:
    """The stop token's logit penalised by (length + 1)^factor (factor 0: off)."""
    penalty = (length_B.astype(jnp.float32) + 1.0) ** factor_B
    stop = logits_BV[:, stop_token]
    new = jnp.where(factor_B != 0, _penalise(stop, penalty, sign_aware), stop)
    return logits_BV.at[:, stop_token].set(new)


def min_length(logits_BV: Array, length_B: Array, min_length_B: Array, stop_token: int) -> Array:
    """The stop token banned (-inf) in rows shorter than their minimum length (0: never banned)."""
    stop = logits_BV[:, stop_token]
    return logits_BV.at[:, stop_token].set(jnp.where(length_B < min_length_B, NEG_INF, stop))


def top_k(logits_BV: Array, k_B: Array) -> Array:
    """Keeps logits >= the k-th largest of the row (ties kept); k <= 0: off."""
    kth = kth_largest(logits_BV, k_B)
    return jnp.where((k_B[:, None] > 0) & (logits_BV < kth), NEG_INF, logits_BV)


def kth_largest(x_BV: Array, k_B: Array) -> Array:
    """[B, 1]: each row's k-th largest value (k clipped to 1..V), exactly, without sorting.

    XLA's CPU sort is slow: at a NAR level of a server batch (16 rows x 150 frames x 1025 logits) sorting
    took ~0.7 s, longer than the rest of the level, and a row's k differs per request so lax.top_k's static
    k does not fit (it was no faster either). Instead the float32 values are mapped to uint32 keys in the
    same order, and the k-th largest key is found bit by bit from the top: the largest t with at least k
    keys >= t. 32 passes of compare-and-count: 26x faster than the sort there, and the same value.
    """
    bits = jax.lax.bitcast_convert_type(x_BV.astype(jnp.float32), jnp.int32)
    sign = jnp.uint32(0x80000000)
    order = lambda i: jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ 0x7FFFFFFF, i), jnp.uint32) ^ sign  # noqa: E731
    keys = order(bits)  # a < b as floats <=> keys a < b as unsigned (-0.0 just below +0.0)
    k = jnp.clip(k_B, 1, x_BV.shape[1])[:, None]

    def bit(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(keys >= candidate, axis=-1, keepdims=True) >= k, candidate, t)

    t = jax.lax.fori_loop(0, 32, bit, jnp.zeros((x_BV.shape[0], 1), jnp.uint32))
    t = jax.lax.bitcast_convert_type(t ^ sign, jnp.int32)  # the inverse of `order`
    return jax.lax.bitcast_convert_type(jnp.where(t < 0, t ^ 0x7FFFFFFF, t), jnp.float32)


def top_p(logits_BV: Array, p_B: Array) -> Array:
    """Keeps the smallest set of most likely tokens whose probability reaches p (the first token that
    crosses p is kept, the top token always); p >= 1: off."""
    sorted_desc = -jnp.sort(-logits_BV, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    remove = jnp.concatenate([jnp.zeros_like(cum[:, :1], bool), cum[:, :-1] > p_B[:, None]], axis=-1)
    threshold = jnp.min(jnp.where(remove, jnp.inf, sorted_desc), axis=-1, keepdims=True)
    return jnp.where((p_B[:, None] < 1.0) & (logits_BV < threshold), NEG_INF, logits_BV)


def min_p(logits_BV: Array, p_B: Array) -> Array:
    """Keeps tokens whose probability is at least p times the top token's; p <= 0: off."""
    logp = jax.nn.log_softmax(logits_BV, axis=-1)
    cut = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(jnp.maximum(p_B[:, None], 1e-30))
    return jnp.where((p_B[:, None] > 0) & (logp < cut), NEG_INF, logits_BV)


def temperature_of(logits_BV: Array, temperature_B: Array, min_temperature_B: Array) -> Array:
    """The temperature per row: dynamic (reference.md §5.5: towards min_temperature when the top token is
    likely) when it differs from temperature by 0.001 or more, else temperature."""
    p_max = 1.0 / jnp.sum(jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)), axis=-1)
    dynamic = temperature_B - (temperature_B - min_temperature_B) / (1.0 + jnp.exp(-10.0 * (p_max - 0.5)))
    return jnp.where(jnp.abs(temperature_B - min_temperature_B) >= 0.001, dynamic, temperature_B)


def _when(active: Array, fn, x: Array) -> Array:
    """fn(x) if any row asks for it, else x unchanged: a filter that no row uses costs nothing
    (lax.cond runs one branch), and the choice stays a traced value (no recompile)."""
    return jax.lax.cond(jnp.any(active), fn, lambda x: x, x)


def filter_logits(
    logits_BV: Array,
    *,
    top_k_B: Array | None = None,
    top_p_B: Array | None = None,
    min_p_B: Array | None = None,
    history_BT: Array | None = None,
    history_valid_BT: Array | None = None,
    repetition_penalty_B: Array | None = None,
    repetition_decay_B: Array | None = None,
    length_B: Array | None = None,
    length_penalty_B: Array | None = None,
    min_length_B: Array | None = None,
    stop_token: int | None = None,
    sign_aware: bool = True,
) -> Array:
    """Penalties then truncation (reference.md §5.1 steps 4-6), in float32; filtered tokens become -inf. The
    stop token is banned below `min_length_B` before truncation, so top-k/p/min-p choose among what
    may be drawn (a row whose nucleus was the stop token alone still draws a frame)."""
    b = logits_BV.shape[0]
    x = logits_BV.astype(jnp.float32)
    if repetition_penalty_B is not None and history_BT is not None:
        decay = repetition_decay_B if repetition_decay_B is not None else jnp.zeros((b,), jnp.float32)
        valid = history_valid_BT if history_valid_BT is not None else jnp.ones(history_BT.shape, bool)
        x = _when(
            repetition_penalty_B != 1.0,
            lambda x: repetition_penalty(x, history_BT, valid, repetition_penalty_B, decay, sign_aware),
            x,
        )
    if length_penalty_B is not None and length_B is not None and stop_token is not None:
        x = length_penalty(x, length_B, length_penalty_B, stop_token, sign_aware)
    if min_length_B is not None and length_B is not None and stop_token is not None:
        x = min_length(x, length_B, min_length_B, stop_token)
    if top_k_B is not None:
        x = _when(top_k_B > 0, lambda x: top_k(x, top_k_B), x)
    if top_p_B is not None:
        x = _when(top_p_B < 1.0, lambda x: top_p(x, top_p_B), x)
    if min_p_B is not None:
        x = _when(min_p_B > 0, lambda x: min_p(x, min_p_B), x)
    return x


def categorical(key: Array, logits_BV: Array) -> Array:
    """One draw per row from softmax(logits) by inverting the CDF with one uniform per row:
    jax.random.categorical draws a Gumbel variate per vocabulary entry, which on CPU costs more
    than the rest of a small model's decoding step. -inf logits are never drawn."""
    probs = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    u = 1.0 - jax.random.uniform(key, (logits_BV.shape[0], 1))  # (0, 1]: a zero-probability head is skipped
    idx = jnp.sum(cum < u * cum[:, -1:], axis=-1)
    return jnp.minimum(idx, logits_BV.shape[1] - 1).astype(jnp.int32)


def scale_by_temperature(x_BV: Array, temperature_B: Array, min_temperature_B: Array | None) -> Array:
    """Logits divided by each row's temperature (dynamic when min_temperature differs; < 0 means
    "as temperature", reference.md §5.1); rows at temperature 0 are left unscaled (greedy callers argmax)."""
    t_min = (
        temperature_B
        if min_temperature_B is None
        else jnp.where(min_temperature_B < 0, temperature_B, min_temperature_B)
    )
    temp = temperature_of(x_BV, temperature_B, t_min)
    return x_BV / jnp.where(temp > 0, temp, 1.0)[:, None]


def draw(key: Array, x_BV: Array, temperature_B: Array, min_temperature_B: Array | None = None) -> Array:
    """One token per row from filtered logits; rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(x_BV, axis=-1)
    drawn = categorical(key, scale_by_temperature(x_BV, temperature_B, min_temperature_B))
    return jnp.where(temperature_B > 0, drawn, greedy).astype(jnp.int32)


def sample(
    key: Array, logits_BV: Array, *, temperature_B: Array, min_temperature_B: Array | None = None, **filters
) -> Array:
    """One token per row (int32[B]): `filter_logits(logits, **filters)`, then `draw`."""
    return draw(key, filter_logits(logits_BV, **filters), temperature_B, min_temperature_B)


def mirostat_init(tau_B: Array) -> Array:
    """The starting surprise budget mu per row: 2 tau, as in the Mirostat paper (the reference's
    2 eta is a bug, reference.md §5.8)."""
    return 2.0 * tau_B


def mirostat(key: Array, logits_BV: Array, mu_B: Array, tau_B: Array, eta_B: Array) -> tuple[Array, Array]:
    """Mirostat v1 (reference.md §5.8) with per-row state: (tokens int32[B], new mu[B]). The Zipf exponent is
    estimated from the 101 largest probabilities; k tokens are kept so that the expected surprise
    is mu; mu then moves by eta times the error against the target surprise tau."""
    b, v = logits_BV.shape
    order = jnp.argsort(-logits_BV, axis=-1)
    sorted_desc = jnp.take_along_axis(logits_BV, order, axis=-1)
    p = jax.nn.softmax(sorted_desc, axis=-1)
    m = min(100, v - 1)
    i = jnp.arange(m, dtype=jnp.float32)
    ln_t = jnp.log((i + 2) / (i + 1))
    ln_b = jnp.log(jnp.maximum(p[:, :m], 1e-30) / jnp.maximum(p[:, 1 : m + 1], 1e-30))
    s = jnp.sum(ln_b * ln_t[None, :], axis=-1) / jnp.sum(ln_t**2)
    eps = jnp.maximum(s - 1.0, 1e-6)
    k = jnp.round(((eps * 2.0**mu_B) / (1.0 - v ** (-eps))) ** (1.0 / jnp.maximum(s, 1e-6))) + 1
    k = jnp.clip(jnp.nan_to_num(k, nan=v, posinf=v), 1, v).astype(jnp.int32)
    masked = jnp.where(jnp.arange(v)[None, :] < k[:, None], sorted_desc, NEG_INF)
    idx = categorical(key, masked)
    surprise = -jnp.log2(jnp.take_along_axis(p, idx[:, None], axis=-1)[:, 0])
    tokens = jnp.take_along_axis(order, idx[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), mu_B - eta_B * (surprise - tau_B)


def repetition_aware(
    key: Array,
    logits_BV: Array,
    history_BT: Array,
    history_valid_BT: Array,
    *,
    top_p_B: Array,
    temperature_B: Array,
    window: int = 10,
    threshold_B: Array | None = None,
) -> Array:
    """VALL-E 2's repetition-aware sampling: draw from the nucleus; if that token fills at least
    `threshold` of the last `window` valid history tokens, draw again from the whole distribution
    (which breaks the loops nucleus sampling falls into)."""
    b, t = history_BT.shape
    k_nuc, k_full = jax.random.split(key)
    scaled = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    nucleus = categorical(k_nuc, top_p(scaled, top_p_B))
    full = categorical(k_full, scaled)
    last = jnp.max(jnp.where(history_valid_BT, jnp.arange(t)[None, :], -1), axis=1)
    recent = history_valid_BT & (jnp.arange(t)[None, :] > (last - window)[:, None])
    ratio = jnp.sum(recent & (history_BT == nucleus[:, None]), axis=-1) / window
    thr = threshold_B if threshold_B is not None else jnp.full((b,), 0.1)
    return jnp.where(ratio >= thr, full, nucleus).astype(jnp.int32)
