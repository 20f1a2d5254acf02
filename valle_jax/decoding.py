"""Decoding: one prefill, a KV-cached AR loop on device, the NAR levels in one jitted loop.

    decoder = Decoder(model)
    out = decoder.generate(inputs, settings)   # inputs: text ids and prompt codes per utterance

The AR is `lax.scan` chunks of single-token steps inside a `lax.while_loop` that exits once every row
has produced the stop token (or its step limit): sampling happens inside the loop, so no token
makes a host round trip. Text, prompt and step limit are padded to buckets, and every per-call
value (temperatures, penalties, limits) is an array with one value per row, so a compile serves a
whole bucket and batch size.

With causal attention (the reference's model) the prefix `[text | sep | lang | sep | prompt | sep]`
does not depend on the response: its keys and values are computed once, and the AR and every NAR
level attend to them from the cache; a NAR level only computes the response positions. With
`bidirectional_nar` the NAR reruns the whole sequence instead.

Samplers (valle_jax.sampling): temperature (0: greedy), dynamic temperature, top-k, top-p, min-p,
repetition and length penalties, mirostat, VALL-E 2's repetition-aware sampling, and a real beam
search whose beams reorder the cache. The stop token is banned in NAR passes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valle_jax import kernels, runtime
from valle_jax import sampling as S
from valle_jax.models import layers as L
from valle_jax.models.layers import cache_storage
from valle_jax.models.valle import VALLE, prefix_len

Array = jax.Array
NEG_INF = -jnp.inf

TEXT_BUCKETS = (32, 64, 128, 256, 512, 1024)  # phoneme ids, <s> and </s> included
PROMPT_BUCKETS = (75, 150, 225, 300, 450, 600, 900, 1350, 1800)  # frames (75 per second)
STEP_BUCKETS = (75, 150, 300, 450, 600, 900, 1350, 1800, 2700)  # AR steps / response frames
# The NAR's response length is known once the AR has stopped, and its cost is proportional to it (every
# level is a pass over the response): finer buckets there, one second apart up to 10 s, waste less
# (5 s of audio: 375 frames instead of 450) for a few more compilations. Every step bucket is one of them.
NAR_BUCKETS = tuple(range(75, 751, 75)) + (900, 1050, 1200, 1350, 1800, 2700)


class DecodeError(ValueError):
    """Settings or inputs decoding cannot use."""


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest size >= n; past the largest, n rounded up to a multiple of the largest."""
    for s in sizes:
        if n <= s:
            return s
    return -(-n // sizes[-1]) * sizes[-1]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one synthesis call asks for. Defaults are the reference CLI's (SPEC §4.8)."""

    max_ar_steps: int = 450  # frames of level 0 at most (75 per second)
    max_nar_levels: int = 7  # NAR levels after the AR; 0 means all, as in the reference
    max_ar_context: int = -1  # > 0: the AR attends to the prefix and only its last N frames
    ar_temp: float = 1.0  # 0: greedy
    min_ar_temp: float = -1.0  # >= 0 and != ar_temp: dynamic temperature; < 0: off
    nar_temp: float = 1.0
    min_nar_temp: float = -1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    repetition_penalty_decay: float = 0.0
    length_penalty: float = 0.0  # 0: off (AR only)
    beam_width: int = 0  # > 1: beam search (AR)
    mirostat_tau: float = 0.0  # > 0: mirostat (AR)
    mirostat_eta: float = 0.0
    repetition_aware: bool = False  # VALL-E 2 repetition-aware sampling (AR)
    ras_window: int = 10
    ras_threshold: float = 0.1
    sign_aware_penalties: bool = True  # False: the reference's sign-blind division
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.max_ar_steps >= 1, f"max_ar_steps must be >= 1, got {self.max_ar_steps}"),
            (0 <= self.max_nar_levels, f"max_nar_levels must be >= 0, got {self.max_nar_levels}"),
            (self.ar_temp >= 0 and self.nar_temp >= 0, "temperatures must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.beam_width >= 0, f"beam_width must be >= 0, got {self.beam_width}"),
            (self.mirostat_tau >= 0, f"mirostat_tau must be >= 0, got {self.mirostat_tau}"),
            (not (self.beam_width > 1 and self.mirostat_tau > 0), "beam search and mirostat cannot be combined"),
            (
                not (self.beam_width > 1 and self.repetition_aware),
                "beam search and repetition-aware sampling cannot be combined",
            ),
            (
                not (self.mirostat_tau > 0 and self.repetition_aware),
                "mirostat and repetition-aware sampling cannot be combined",
            ),
            (self.ras_window >= 1, f"ras_window must be >= 1, got {self.ras_window}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DecodeError(message)

    @property
    def mode(self) -> str:
        if self.beam_width > 1:
            return "beam"
        if self.mirostat_tau > 0:
            return "mirostat"
        return "repetition_aware" if self.repetition_aware else "sample"

    def nar_levels(self, n_resp_levels: int) -> int:
        top = n_resp_levels - 1
        return top if self.max_nar_levels == 0 else min(self.max_nar_levels, top)


class Knobs(NamedTuple):
    """Per-row sampler values (arrays [B]): traced, so changing them never recompiles."""

    temp: Array
    min_temp: Array
    top_k: Array
    top_p: Array
    min_p: Array
    rep: Array
    rep_decay: Array
    length_penalty: Array
    tau: Array
    eta: Array
    ras_threshold: Array
    max_steps: Array
    context: Array

    @classmethod
    def of(cls, s: Settings, batch: int, ar: bool = True) -> Knobs:
        f = lambda v: np.full((batch,), v, np.float32)  # noqa: E731
        i = lambda v: np.full((batch,), v, np.int32)  # noqa: E731
        return cls(
            f(s.ar_temp if ar else s.nar_temp),
            f(s.min_ar_temp if ar else s.min_nar_temp),
            i(s.top_k),
            f(s.top_p),
            f(s.min_p),
            f(s.repetition_penalty),
            f(s.repetition_penalty_decay),
            f(s.length_penalty if ar else 0.0),
            f(s.mirostat_tau),
            f(s.mirostat_eta),
            f(s.ras_threshold),
            i(s.max_ar_steps),
            i(s.max_ar_context),
        )


class Inputs(NamedTuple):
    """A padded batch of utterances to synthesise (numpy or jax arrays)."""

    text: Array  # int32 [B, Tcap]: <s> phonemes </s>, right-padded
    text_len: Array  # int32 [B]
    lang: Array  # int32 [B]
    prompt: Array  # int16/int32 [B, Pcap, Q]: reference codes, right-padded
    prompt_len: Array  # int32 [B]


def make_inputs(
    texts: Sequence[Sequence[int]],
    prompts: Sequence[np.ndarray],
    langs: Sequence[int],
    n_prom_levels: int,
    text_cap: int | None = None,
    prompt_cap: int | None = None,
) -> Inputs:
    """Pads utterances to the text and prompt buckets (or the given caps)."""
    if not texts or len(texts) != len(prompts) or len(texts) != len(langs):
        raise DecodeError(f"need as many texts, prompts and languages (got {len(texts)}, {len(prompts)}, {len(langs)})")
    b = len(texts)
    t_cap = text_cap or bucket(max(len(t) for t in texts), TEXT_BUCKETS)
    p_cap = prompt_cap or bucket(max(len(p) for p in prompts), PROMPT_BUCKETS)
    text = np.zeros((b, t_cap), np.int32)
    prompt = np.zeros((b, p_cap, n_prom_levels), np.int32)
    for i, (t, p) in enumerate(zip(texts, prompts)):
        p = np.asarray(p)
        if p.ndim != 2 or p.shape[1] < n_prom_levels or len(p) == 0:
            raise DecodeError(f"prompt {i}: expected codes [frames, >= {n_prom_levels}], got shape {p.shape}")
        if len(t) > t_cap or len(p) > p_cap:
            raise DecodeError(f"utterance {i} does not fit the caps ({len(t)} > {t_cap} or {len(p)} > {p_cap})")
        text[i, : len(t)] = t
        prompt[i, : len(p)] = p[:, :n_prom_levels]
    return Inputs(
        text,
        np.array([len(t) for t in texts], np.int32),
        np.asarray(langs, np.int32),
        prompt,
        np.array([len(p) for p in prompts], np.int32),
    )


# ---- the sampling of one AR step ---------------------------------------------------------------


def _generated(history_BN: Array, t: Array) -> Array:
    """Which slots of the token history hold generated tokens before step t."""
    return jnp.broadcast_to(jnp.arange(history_BN.shape[1]) < t, history_BN.shape)


def _filtered(
    logits_BV: Array, knobs: Knobs, history_BN: Array, t: Array, stop: int, sign_aware: bool, top_p: bool = True
) -> Array:
    return S.filter_logits(
        logits_BV,
        top_k_B=knobs.top_k,
        top_p_B=knobs.top_p if top_p else None,
        min_p_B=knobs.min_p,
        history_BT=history_BN,
        history_valid_BT=_generated(history_BN, t),
        repetition_penalty_B=knobs.rep,
        repetition_decay_B=knobs.rep_decay,
        length_B=jnp.full(logits_BV.shape[:1], t),
        length_penalty_B=knobs.length_penalty,
        stop_token=stop,
        sign_aware=sign_aware,
    )


def _pick(
    mode: str,
    key: Array,
    logits_BV: Array,
    knobs: Knobs,
    history_BN: Array,
    t: Array,
    mu_B: Array,
    stop: int,
    sign_aware: bool,
    ras_window: int,
) -> tuple[Array, Array]:
    """(token [B], new mirostat mu [B]) for step t, after every penalty and filter."""
    if mode == "repetition_aware":
        x = _filtered(logits_BV, knobs, history_BN, t, stop, sign_aware, top_p=False)
        tok = S.repetition_aware(
            key,
            x,
            history_BN,
            _generated(history_BN, t),
            top_p_B=knobs.top_p,
            temperature_B=knobs.temp,
            window=ras_window,
            threshold_B=knobs.ras_threshold,
        )
        return tok, mu_B
    x = _filtered(logits_BV, knobs, history_BN, t, stop, sign_aware)
    if mode == "mirostat":
        return S.mirostat(key, S.scale_by_temperature(x, knobs.temp, knobs.min_temp), mu_B, knobs.tau, knobs.eta)
    return S.draw(key, x, knobs.temp, knobs.min_temp), mu_B


# ---- the AR loops, generic over the model step ---------------------------------------------------
# step_fn(state, token_B, t) -> (logits of the next token [B, V], state): feeds the token generated
# at step t (response frame t). The loops know nothing else about the model, so tests can drive
# them with constructed distributions.


class ArResult(NamedTuple):
    tokens: Array  # int32 [B, N]: level-0 codes, the stop token from each row's end on
    length: Array  # int32 [B]: frames before the stop (or the step limit)
    stopped: Array  # bool [B]: the row produced the stop token (False: it hit its step limit)
    state: object  # the model state after the last step (the KV cache)
    logits: Array | None  # float32 [B, N, V]: each step's raw logits (when asked for)


def ar_loop(
    first_logits_BV: Array,
    step_fn: Callable,
    state,
    knobs: Knobs,
    key: Array,
    *,
    n_slots: int,
    stop: int,
    mode: str = "sample",
    chunk: int = 8,
    sign_aware: bool = True,
    ras_window: int = 10,
    keep_logits: bool = False,
) -> ArResult:
    """Samples up to `n_slots` tokens per row; exits when every row is done. `n_slots` must be a
    multiple of `chunk` (the steps one while-loop iteration scans)."""
    b, v = first_logits_BV.shape
    assert n_slots % chunk == 0, (n_slots, chunk)
    knobs = jax.tree.map(jnp.asarray, knobs)

    def one(carry, _):
        t, logits, tokens, done, mu, state, kept = carry
        tok, new_mu = _pick(
            mode, jax.random.fold_in(key, t), logits, knobs, tokens, t, mu, stop, sign_aware, ras_window
        )
        tok = jnp.where(done, stop, tok)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
        if keep_logits:
            kept = jax.lax.dynamic_update_slice_in_dim(kept, logits[:, None], t, axis=1)
        mu = jnp.where(done, mu, new_mu)
        done = done | (tok == stop) | (t + 1 >= knobs.max_steps)
        logits, state = step_fn(state, tok, t)
        return (t + 1, logits, tokens, done, mu, state, kept), None

    def chunk_body(carry):
        return jax.lax.scan(one, carry, None, length=chunk)[0]

    def running(carry):
        return (carry[0] < n_slots) & ~jnp.all(carry[3])

    tokens = jnp.full((b, n_slots), stop, jnp.int32)
    kept = jnp.zeros((b, n_slots, v), jnp.float32) if keep_logits else jnp.zeros((), jnp.float32)
    carry = (
        jnp.zeros((), jnp.int32),
        first_logits_BV.astype(jnp.float32),
        tokens,
        jnp.zeros((b,), bool),
        S.mirostat_init(knobs.tau),
        state,
        kept,
    )
    _, _, tokens, _, _, state, kept = jax.lax.while_loop(running, chunk_body, carry)
    return ArResult(tokens, *_ends(tokens, knobs.max_steps, stop), state, kept if keep_logits else None)


def _ends(tokens_BN: Array, max_steps_B: Array, stop: int) -> tuple[Array, Array]:
    """(length [B]: frames before the first stop, stopped [B]: a real stop token came before the
    step limit; past a row's end the loops write stop tokens that do not count)."""
    n = tokens_BN.shape[1]
    is_stop = tokens_BN == stop
    stopped = jnp.any(is_stop & (jnp.arange(n)[None, :] < max_steps_B[:, None]), axis=1)
    length = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), n).astype(jnp.int32)
    return length, stopped


def beam_loop(
    first_logits_BV: Array,
    step_fn: Callable,
    reorder_fn: Callable,
    state,
    knobs: Knobs,
    *,
    width: int,
    n_slots: int,
    stop: int,
    chunk: int = 8,
    sign_aware: bool = True,
) -> tuple[ArResult, Array]:
    """Beam search over B utterances x `width` beams (rows b * width + w of `state`, which
    `reorder_fn(state, rows)` gathers). A beam's score is the sum of its tokens' log-probabilities
    (after penalties, filters and temperature; temperature 0 counts as 1); a finished beam keeps its
    score. Returns each utterance's best beam and its score."""
    bw, v = first_logits_BV.shape
    b = bw // width
    assert n_slots % chunk == 0
    knobs = jax.tree.map(jnp.asarray, knobs)

    def one(carry, _):
        t, logits, tokens, done, score, state = carry
        x = _filtered(logits, knobs, tokens, t, stop, sign_aware)
        logp = jax.nn.log_softmax(S.scale_by_temperature(x, knobs.temp, knobs.min_temp), axis=-1)
        finished = jnp.where(jnp.arange(v)[None, :] == stop, 0.0, NEG_INF)  # a done beam only "stays"
        logp = jnp.where(done[:, None], finished, logp)
        cand = (score[:, None] + logp).reshape(b, width * v)
        best, idx = jax.lax.top_k(cand, width)  # [b, width]
        rows = (jnp.arange(b)[:, None] * width + idx // v).reshape(-1)
        tok = (idx % v).reshape(-1).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens[rows], tok[:, None], t, axis=1)
        done = done[rows] | (tok == stop) | (t + 1 >= knobs.max_steps)
        logits, state = step_fn(reorder_fn(state, rows), tok, t)
        return (t + 1, logits, tokens, done, best.reshape(-1), state), None

    def running(carry):
        return (carry[0] < n_slots) & ~jnp.all(carry[3])

    # all beams start identical: only beam 0 may expand at the first step, or they would stay copies
    score = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, NEG_INF), b)
    carry = (
        jnp.zeros((), jnp.int32),
        first_logits_BV.astype(jnp.float32),
        jnp.full((bw, n_slots), stop, jnp.int32),
        jnp.zeros((bw,), bool),
        score,
        state,
    )
    _, _, tokens, _, score, state = jax.lax.while_loop(
        running, lambda c: jax.lax.scan(one, c, None, length=chunk)[0], carry
    )
    best_rows = jnp.arange(b) * width + jnp.argmax(score.reshape(b, width), axis=1)
    tokens = tokens[best_rows]
    return (
        ArResult(tokens, *_ends(tokens, knobs.max_steps[best_rows], stop), reorder_fn(state, best_rows), None),
        score[best_rows],
    )


# ---- the model side ------------------------------------------------------------------------------


def prefix_slots(inputs: Inputs) -> int:
    """Padded prefix length: text and prompt buckets, 2 separators, lang, separator."""
    return inputs.text.shape[1] + inputs.prompt.shape[1] + 4


def cache_dtype(dtype: str, cpu_kernels: bool = False):
    """The KV cache's dtype: the model's dtype, except float32 on the CPU without the kernels,
    where XLA has no batched bfloat16 dot and a bfloat16 cache was converted whole at every step
    (half preset, batch 1: ~7 of ~17 ms per step). The kernels' attention reads a bfloat16 cache as
    it is: half the bytes a step streams from it."""
    return jnp.float32 if jax.default_backend() == "cpu" and not cpu_kernels else jnp.dtype(dtype)


def _prefill(
    model: VALLE, inputs: Inputs, capacity: int | None = None, layers: list[dict] | None = None, kv_dtype=None
):
    """The prefix through the model, into a new cache of `capacity` slots (None: no cache) in
    `kv_dtype` (None: `cache_dtype` of the model's dtype): (logits for response frame 0 [B, V],
    cache, prefix length [B], prefix inputs x, valid)."""
    x, valid = model.embed_prefix(inputs.text, inputs.text_len, inputs.lang, inputs.prompt, inputs.prompt_len)
    b, sp = valid.shape
    kv_dtype = kv_dtype or cache_dtype(model.cfg.dtype)
    cache = None if capacity is None else model.init_cache(b, capacity, cache_storage(kv_dtype))
    level = jnp.zeros((b,), jnp.int32)
    logits, _, cache = model.run(x, jnp.broadcast_to(jnp.arange(sp), (b, sp)), valid, level, cache, layers=layers)
    if cache is not None:
        cache = model.backbone.mark_prefix(cache)
    plen = prefix_len(inputs.text_len, inputs.prompt_len)
    return logits[jnp.arange(b), plen - 1], cache, plen, x, valid


def _cached_step(model: VALLE, sp: int, context_B: Array, layers: list[dict]):
    """step_fn over the cache: token t sits at cache slot sp + t (a KV cache; a recurrent state
    just absorbs it), position prefix_len + t."""

    def step(state, tok_B, t):
        cache, plen = state
        b = tok_B.shape[0]
        if model.backbone.has_window:  # rolling context: the frame that falls out of the window is masked
            old = t - context_B
            cache = model.backbone.forget(
                cache, jnp.where((context_B > 0) & (old >= 0), sp + old, cache["valid"].shape[1])
            )
        level = jnp.zeros((b,), jnp.int32)
        x = model.embed_frames(tok_B[:, None, None], level)
        logits, _, cache = model.run(x, (plen + t)[:, None], jnp.ones((b, 1), bool), level, cache, layers=layers)
        return logits[:, 0], (cache, plen)

    return step


def _uncached_step(model: VALLE, x_prefix: Array, valid_prefix: Array, n_slots: int):
    """step_fn without a cache (the reference's way): the whole sequence, prefix and every frame
    so far, runs through the model at each step; frames are kept in a fixed-size buffer."""
    b, sp = valid_prefix.shape

    def step(state, tok_B, t):
        frames, plen = state
        frames = jax.lax.dynamic_update_slice_in_dim(frames, tok_B[:, None], t, axis=1)
        level = jnp.zeros((b,), jnp.int32)
        x = jnp.concatenate([x_prefix, model.embed_frames(frames[..., None], level)], axis=1)
        slots = jnp.arange(n_slots)[None, :]
        valid = jnp.concatenate([valid_prefix, jnp.broadcast_to(slots <= t, (b, n_slots))], axis=1)
        pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(sp), (b, sp)), plen[:, None] + slots], axis=1)
        logits, _, _ = model.run(x, pos, valid, level)
        return jax.lax.dynamic_index_in_dim(logits, sp + t, axis=1, keepdims=False), (frames, plen)

    return step


def _reorderer(model: VALLE):
    """Beams take over other beams' caches: (cache, prefix lengths) gathered by batch rows."""
    return lambda state, rows: (model.backbone.reorder_cache(state[0], rows), state[1][rows])


def _ar(
    graph,
    params,
    inputs: Inputs,
    knobs: Knobs,
    key: Array,
    *,
    n_slots: int,
    chunk: int,
    mode: str,
    width: int,
    sign_aware: bool,
    ras_window: int,
    cached: bool,
    keep_logits: bool,
    step_layers: list[dict] | None = None,
    kv_dtype: str | None = None,
):
    """`step_layers`: the backbone's layers as `backbone.step_layers()` gives them (CPU kernels), or
    None to slice them from `params`; `kv_dtype`: the cache's (None: `cache_dtype`'s)."""
    model = nnx.merge(graph, params)
    stop = model.cfg.stop_token
    sp = prefix_slots(inputs)
    if not cached:
        first, _, plen, x, valid = _prefill(model, inputs)
        state = (jnp.full((valid.shape[0], n_slots), stop, jnp.int32), plen)
        return ar_loop(
            first,
            _uncached_step(model, x, valid, n_slots),
            state,
            knobs,
            key,
            n_slots=n_slots,
            stop=stop,
            mode=mode,
            chunk=chunk,
            sign_aware=sign_aware,
            ras_window=ras_window,
            keep_logits=keep_logits,
        )
    layers = step_layers if step_layers is not None else model.backbone.unstack()  # sliced once, outside the loop
    if len(inputs.text_len) * (width if mode == "beam" else 1) > kernels.MAX_ROWS:
        # steps with more rows than rows_linear takes run XLA's dot: over weights unpacked once, here
        # (else XLA unpacks them inside the loop, at every step)
        layers = [L.unpacked(p) for p in layers]
    first, cache, plen, _, _ = _prefill(model, inputs, sp + n_slots, layers, kv_dtype)
    if mode == "beam":
        rows = jnp.repeat(jnp.arange(first.shape[0]), width)
        reorder = _reorderer(model)
        cache, plen = reorder((cache, plen), rows)
        knobs = jax.tree.map(lambda a: a[rows], knobs)
        result, _ = beam_loop(
            first[rows],
            _cached_step(model, sp, knobs.context, layers),
            reorder,
            (cache, plen),
            knobs,
            width=width,
            n_slots=n_slots,
            stop=stop,
            chunk=chunk,
            sign_aware=sign_aware,
        )
        return result
    return ar_loop(
        first,
        _cached_step(model, sp, knobs.context, layers),
        (cache, plen),
        knobs,
        key,
        n_slots=n_slots,
        stop=stop,
        mode=mode,
        chunk=chunk,
        sign_aware=sign_aware,
        ras_window=ras_window,
        keep_logits=keep_logits,
    )


def _nar(
    graph,
    params,
    inputs: Inputs,
    cache: dict | None,
    level0_BR: Array,
    length_B: Array,
    knobs: Knobs,
    n_levels: Array,
    key: Array,
    layers: list[dict] | None = None,
    *,
    sign_aware: bool,
    kernels: bool = False,
):
    """Levels 1..n_levels (a traced count) of the response, each from the levels below it.
    `layers`: the backbone's per-layer parameters as an argument (the Decoder's float32
    `step_layers`, unpacked here, outside the levels' loop); None slices them from `params` here,
    where XLA copies every weight at every call (half preset: ~150 ms of ~2.5 s), as step layers
    with `kernels` (so that attention runs the CPU kernel)."""
    model = nnx.merge(graph, params)
    cfg = model.cfg
    b, r = level0_BR.shape
    sp = prefix_slots(inputs)
    plen = prefix_len(inputs.text_len, inputs.prompt_len)
    frame_valid = jnp.arange(r)[None, :] < length_B[:, None]
    positions = plen[:, None] + jnp.arange(r)[None, :]
    codes = jnp.zeros((b, r, cfg.n_resp_levels), jnp.int32).at[..., 0].set(jnp.where(frame_valid, level0_BR, 0))
    if layers is None:
        layers = model.backbone.step_layers(jnp.float32, packed=False) if kernels else model.backbone.unstack()
    layers = [L.unpacked(p) for p in layers]  # here, outside the levels' loop: once per call
    if cache is not None:  # the prefix's keys/values (or recurrent state) alone
        cache = model.backbone.nar_cache(cache, sp, r)

    def level_logits(level_B, codes):
        if cache is not None:
            x = model.embed_frames(codes, level_B)
            logits, _, _ = model.run(x, positions, frame_valid, level_B, cache, layers=layers)
            return logits
        batch = {
            "text": inputs.text,
            "text_len": inputs.text_len,
            "lang": inputs.lang,
            "prompt": inputs.prompt,
            "prompt_len": inputs.prompt_len,
            "resp": codes,
            "resp_len": length_B,
        }
        logits, _ = model(batch, level_B)  # the whole sequence: bidirectional NAR attends to the response
        return jnp.take_along_axis(logits, positions[..., None], axis=1)

    def body(level, codes):
        logits = level_logits(jnp.full((b,), level), codes)
        logits = logits.at[..., cfg.stop_token].set(NEG_INF)  # a NAR pass never ends the utterance
        prev = jax.lax.dynamic_index_in_dim(codes, level - 1, axis=2, keepdims=False)
        penalty, applies = S.repetition_factors(prev, frame_valid, knobs.rep, knobs.rep_decay, logits.shape[-1])
        x = S.apply_penalty(logits, penalty[:, None], applies[:, None], sign_aware)
        rows = lambda a: jnp.repeat(a, r)  # noqa: E731
        tok = S.sample(
            jax.random.fold_in(key, level),
            x.reshape(b * r, -1),
            temperature_B=rows(knobs.temp),
            min_temperature_B=rows(knobs.min_temp),
            top_k_B=rows(knobs.top_k),
            top_p_B=rows(knobs.top_p),
            min_p_B=rows(knobs.min_p),
        ).reshape(b, r)
        tok = jnp.where(frame_valid, tok, 0)
        return jax.lax.dynamic_update_slice_in_dim(codes, tok[..., None], level, axis=2)

    return jax.lax.fori_loop(1, n_levels + 1, body, codes)


class Output(NamedTuple):
    codes: list[np.ndarray]  # int32 [frames, 1 + levels] per utterance
    stopped: np.ndarray  # bool [B]: the AR produced a stop token (False: it ran to max_ar_steps)


def _computing_in(model: VALLE, dtype: str) -> VALLE:
    """A VALLE sharing `model`'s arrays whose layers compute in `dtype`."""
    graph, state = nnx.split(model)
    twin = nnx.merge(graph, state)
    twin.cfg = twin.backbone.cfg = dataclasses.replace(model.cfg, dtype=dtype)
    return twin


class Decoder:
    """Jitted decoding for one model: compiled once per (batch, text, prompt, step) bucket and mode.

    On the CPU (when valle_jax.kernels can be built here), the AR steps' matmuls run the
    `rows_linear` kernel over `step_layers`: the layer weights packed (kernels.pack), in the model's dtype.
    There `dtype="bfloat16"` means bfloat16 weights for the AR steps (half the bytes to stream per
    step) while everything else computes in float32 (XLA's CPU dot is ~10x slower in bfloat16 than
    in float32). Elsewhere (or with `cpu_kernels=False`), `dtype="bfloat16"` stores the matrices and
    tables in bfloat16 and computes in it. `step_layers` are made on first use and again whenever
    `params` is replaced. `kv_dtype`: the AR's KV cache (None: `cache_dtype`, the model's dtype
    except float32 on a CPU without the kernels); "bfloat16" halves what a step reads from the
    cache, which at batch 8 and more is about as much as the weights (recurrent states stay float32)."""

    def __init__(self, model: VALLE, chunk: int = 8, cpu_kernels: bool = True, kv_dtype: str | None = None):
        self.cfg = model.cfg
        self.chunk = chunk
        self.has_window = model.backbone.has_window
        self.cpu_kernels = cpu_kernels and jax.default_backend() == "cpu" and kernels.available()
        self.kv_dtype = jnp.dtype(kv_dtype or cache_dtype(self.cfg.dtype, self.cpu_kernels)).name
        if self.cpu_kernels and self.cfg.dtype != "float32":
            model = _computing_in(model, "float32")
        self.graph, params = nnx.split(model)
        if self.cfg.dtype == "bfloat16" and not self.cpu_kernels:  # matrices and tables; norms and biases stay float32
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
        self.params = params
        self._ar = jax.jit(
            functools.partial(_ar, self.graph),
            static_argnames=(
                "n_slots",
                "chunk",
                "mode",
                "width",
                "sign_aware",
                "ras_window",
                "cached",
                "keep_logits",
                "kv_dtype",
            ),
        )
        self._nar = jax.jit(
            functools.partial(_nar, self.graph),
            static_argnames=("sign_aware", "kernels"),
            compiler_options=runtime.large_dot_compiler_options(),
        )
        step_dtype = jnp.dtype(self.cfg.dtype)
        self._pack = jax.jit(lambda params: nnx.merge(self.graph, params).backbone.step_layers(step_dtype))

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        self._params, self._step_layers = params, None

    @property
    def step_layers(self) -> list[dict] | None:
        """The layer weights the AR steps read (None: XLA's dot over `params`, off the CPU)."""
        if self._step_layers is None and self.cpu_kernels:
            self._step_layers = self._pack(self._params)
        return self._step_layers

    def n_slots(self, max_steps: int) -> int:
        return -(-bucket(max_steps, STEP_BUCKETS) // self.chunk) * self.chunk

    def ar(
        self,
        inputs: Inputs,
        settings: Settings,
        *,
        cached: bool = True,
        keep_logits: bool = False,
        knobs: Knobs | None = None,
        n_slots: int | None = None,
    ) -> ArResult:
        """Level 0. `knobs` overrides the per-row values `settings` gives; `n_slots` the step
        bucket (a multiple of the chunk)."""
        b = len(inputs.text_len)
        knobs = knobs if knobs is not None else Knobs.of(settings, b)
        if not self.has_window and bool(np.any(np.asarray(knobs.context) > 0)):
            raise DecodeError(
                f"max_ar_context needs a cache that keeps every frame; the {self.cfg.arch} backbone "
                "decodes from a recurrent state, whose past already fades by its decay"
            )
        n_slots = n_slots or self.n_slots(int(np.max(knobs.max_steps)))
        return self.ar_call(settings, n_slots, cached, keep_logits)(
            self.params, inputs, knobs, jax.random.key(settings.seed)
        )

    def ar_call(self, settings: Settings, n_slots: int, cached: bool = True, keep_logits: bool = False):
        """The jitted AR with the static choices of `settings` bound: `(params, inputs, knobs, key) ->
        ArResult` (for `jax.eval_shape` or `.lower()` too)."""
        return functools.partial(
            self._ar,
            n_slots=n_slots,
            chunk=self.chunk,
            mode=settings.mode,
            width=max(settings.beam_width, 1),
            sign_aware=settings.sign_aware_penalties,
            ras_window=settings.ras_window,
            cached=cached,
            keep_logits=keep_logits,
            step_layers=self.step_layers if cached else None,
            kv_dtype=self.kv_dtype,
        )

    def nar(self, inputs: Inputs, ar: ArResult, settings: Settings) -> Array:
        """codes [B, R, n_resp_levels] (levels past the requested count are 0); R is a bucket."""
        args, static = self.nar_arguments(inputs, ar, settings)
        return self._nar(*args, **static)

    def nar_arguments(self, inputs: Inputs, ar: ArResult, settings: Settings) -> tuple[tuple, dict]:
        """What `nar` passes to the jitted NAR: (arguments, static arguments), for `._nar.lower()` too."""
        b = len(inputs.text_len)
        n_slots = ar.tokens.shape[1]
        r = min(bucket(max(int(np.max(ar.length)), 1), NAR_BUCKETS), n_slots)
        reuse = not self.cfg.bidirectional_nar
        cache = ar.state[0] if reuse else None
        key = jax.random.fold_in(jax.random.key(settings.seed), 1)
        return (
            (
                self.params,
                inputs,
                cache,
                ar.tokens[:, :r],
                jnp.minimum(ar.length, r),
                Knobs.of(settings, b, ar=False),
                jnp.asarray(settings.nar_levels(self.cfg.n_resp_levels)),
                key,
                self.nar_layers,
            ),
            {"sign_aware": settings.sign_aware_penalties, "kernels": self.cpu_kernels},
        )

    @property
    def nar_layers(self) -> list[dict] | None:
        """The layer weights the NAR reads: the float32 `step_layers` where there are some (unpacked
        in the call, once), else None (sliced from the float32 `params` in the call: bfloat16 step
        weights are for the AR's steps alone)."""
        layers = self.step_layers
        if layers is None or jnp.dtype(self.cfg.dtype) != jnp.float32:
            return None
        return layers

    def generate(self, inputs: Inputs, settings: Settings) -> Output:
        ar = self.ar(inputs, settings)
        length, stopped = np.asarray(ar.length), np.asarray(ar.stopped)
        if int(length.max()) == 0:
            codes = np.zeros((len(length), 0, self.cfg.n_resp_levels), np.int32)
        else:
            codes = np.asarray(self.nar(inputs, ar, settings))
        levels = 1 + settings.nar_levels(self.cfg.n_resp_levels)
        return Output([codes[i, : length[i], :levels] for i in range(len(length))], stopped)


__all__ = [
    "Decoder",
    "Settings",
    "Knobs",
    "Inputs",
    "Output",
    "ArResult",
    "make_inputs",
    "ar_loop",
    "beam_loop",
    "bucket",
    "DecodeError",
    "TEXT_BUCKETS",
    "PROMPT_BUCKETS",
    "STEP_BUCKETS",
    "NAR_BUCKETS",
]
