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

Continuation (VALL-E's continuation task, `Continuation`): a row's response may start with given
frames (the first seconds of the utterance itself). The AR takes them as its first outputs instead
of sampling (`Forced`), so every later step conditions on them exactly as on frames it had sampled
(the cache, a recurrent state and the uncached path alike); the NAR keeps their codes at every
level. The frames every row has (the shortest row's count, down to a whole chunk) go through the
model in one pass after the prefix (`Absorbed`), as the prompt does, and the loop starts after them;
a longer row's remaining given frames are stepped, forced, like sampled ones. A rolling context
(`max_ar_context`) masks frames step by step, so with one every given frame is stepped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from valle_jax import backend
from valle_jax import sampling as S
from valle_jax.models.valle import VALLE, abstract_model, prefix_len

Array = jax.Array
NEG_INF = -jnp.inf

TEXT_BUCKETS = (32, 64, 128, 256, 512, 1024)  # phoneme ids, <s> and </s> included
PROMPT_BUCKETS = (75, 150, 225, 300, 450, 600, 900, 1350, 1800)  # frames (75 per second)
STEP_BUCKETS = (75, 150, 300, 450, 600, 900, 1350, 1800, 2700)  # AR steps / response frames
# The NAR's response length is known once the AR has stopped, and its cost is proportional to it (every
# level is a pass over the response): finer buckets there, one second apart up to 10 s, waste less
# (5 s of audio: 375 frames instead of 450) for a few more compilations. Every step bucket is one of them.
NAR_BUCKETS = tuple(range(75, 751, 75)) + (900, 1050, 1200, 1350, 1800, 2700)

# The stop token may not end a row before this many frames per phoneme of its text (Settings.min_ar_steps
# = -1). Speech runs at about 5 frames (67 ms) per phoneme token (spaces and punctuation count as tokens:
# 4.5-5.4 over the demo corpus's espeak speech); a quarter of that is below any real speaking rate, so the
# floor only removes the degenerate endings (a beam or a draw that stops at its first frames).
FRAMES_PER_PHONEME = 5.0
MIN_FRAMES_PER_PHONEME = 0.25 * FRAMES_PER_PHONEME
# Beam scores are summed log-probabilities divided by (tokens scored)**LENGTH_NORMALIZATION
# (docs/synthesis.md, "Beam search"); 0 is the reference's plain sum.
LENGTH_NORMALIZATION = 1.0


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
    """What one synthesis call asks for. Defaults are the reference CLI's (reference.md §4.8), except two
    that keep the AR from ending at its first frames: `min_ar_steps` (-1: from the text) and
    `length_normalization` (docs/synthesis.md, "Stopping"); 0 for both is the reference."""

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
    min_ar_steps: int = -1  # frames before the stop token may end a row; -1: from the text (min_steps_for); 0: off
    beam_width: int = 0  # > 1: beam search (AR)
    length_normalization: float = LENGTH_NORMALIZATION  # beam scores: summed log-probs / tokens**this; 0: plain sums
    mirostat_tau: float = 0.0  # > 0: mirostat (AR)
    mirostat_eta: float = 0.0
    repetition_aware: bool = False  # VALL-E 2 repetition-aware sampling (AR)
    ras_window: int = 10
    ras_threshold: float = 0.1
    sign_aware_penalties: bool = True  # False: the reference's sign-blind division
    seed: int = 0

    def __post_init__(self):
        checks = [
            (  # first: NaN fails every comparison below with a misleading message
                not (
                    bad := [
                        f"{f.name}={getattr(self, f.name)}"
                        for f in dataclasses.fields(self)
                        if f.type in ("float", float) and not -float("inf") < getattr(self, f.name) < float("inf")
                    ]
                ),
                f"settings must be finite numbers, got {', '.join(bad)}",
            ),
            (self.max_ar_steps >= 1, f"max_ar_steps must be >= 1, got {self.max_ar_steps}"),
            (
                -1 <= self.min_ar_steps <= self.max_ar_steps,
                f"min_ar_steps must be -1 (from the text), 0 (off) or at most max_ar_steps={self.max_ar_steps}, "
                f"got {self.min_ar_steps}",
            ),
            (self.length_normalization >= 0, f"length_normalization must be >= 0, got {self.length_normalization}"),
            (  # twice the largest step bucket (72 s of audio; the reference's UI stops at 32 s): its KV cache fits
                self.max_ar_steps <= 2 * STEP_BUCKETS[-1],
                f"max_ar_steps must be <= {2 * STEP_BUCKETS[-1]} ({2 * STEP_BUCKETS[-1] // 75} s of audio at "
                f"75 frames/s), got {self.max_ar_steps}",
            ),
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

    def min_steps_for(self, text_len: Sequence[int] | np.ndarray | None) -> np.ndarray | int:
        """The AR's minimum frames per row: `min_ar_steps` when set, else (-1) MIN_FRAMES_PER_PHONEME per
        phoneme of the row's text (`text_len` counts <s> and </s>; None: no text known, 0), never more
        than max_ar_steps (a row that may not stop before its limit just runs to it)."""
        if self.min_ar_steps >= 0:
            return self.min_ar_steps
        if text_len is None:
            return 0
        phonemes = np.maximum(np.asarray(text_len, np.int64) - 2, 0)
        return np.minimum(np.floor(MIN_FRAMES_PER_PHONEME * phonemes), self.max_ar_steps).astype(np.int32)

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
    min_steps: Array  # int32: the stop token is banned before this step
    length_norm: Array  # beam scores are divided by (tokens scored)**this

    @classmethod
    def of(cls, s: Settings, batch: int, ar: bool = True, text_len: Sequence[int] | None = None) -> Knobs:
        """`text_len` (<s> and </s> included, per row) sets the minimum steps when `min_ar_steps` is -1;
        without it there is none."""
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
            i(s.min_steps_for(text_len) if ar else 0),
            f(s.length_normalization),
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


class Continuation(NamedTuple):
    """Frames each row's response starts with, given instead of generated (numpy or jax arrays)."""

    codes: Array  # int32 [B, Kcap, Q]: the given frames, every response level, right-padded
    length: Array  # int32 [B]: given frames per row (0: none, an ordinary row)


def make_continuation(prefixes: Sequence[np.ndarray | None], n_levels: int, cap: int | None = None) -> Continuation:
    """Pads each row's given frames (codes [frames, >= n_levels], or None: none) to a prompt bucket."""
    k = [0 if p is None else len(p) for p in prefixes]
    k_cap = cap or bucket(max(max(k), 1), PROMPT_BUCKETS)
    codes = np.zeros((len(prefixes), k_cap, n_levels), np.int32)
    for i, p in enumerate(prefixes):
        if p is None:
            continue
        p = np.asarray(p)
        if p.ndim != 2 or p.shape[1] < n_levels:
            raise DecodeError(f"continuation {i}: expected codes [frames, >= {n_levels}], got shape {p.shape}")
        if len(p) > k_cap:
            raise DecodeError(f"continuation {i}: {len(p)} frames do not fit the cap {k_cap}")
        codes[i, : len(p)] = p[:, :n_levels]
    return Continuation(codes, np.asarray(k, np.int32))


class Forced(NamedTuple):
    """The AR's view of a Continuation: level-0 tokens it takes instead of sampling."""

    tokens: Array  # int32 [B, K]
    length: Array  # int32 [B]: steps t < length take tokens[:, t]

    @classmethod
    def of(cls, c: Continuation) -> Forced:
        return cls(jnp.asarray(c.codes)[..., 0].astype(jnp.int32), jnp.asarray(c.length, jnp.int32))

    def at(self, t: Array) -> tuple[Array, Array]:
        """(is step t forced [B], its token [B]; meaningless where not forced)."""
        k = self.tokens.shape[1]
        tok = jax.lax.dynamic_index_in_dim(self.tokens, jnp.minimum(t, k - 1), axis=1, keepdims=False)
        return t < self.length, tok


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
        min_length_B=knobs.min_steps,
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


class Absorbed(NamedTuple):
    """Given frames the model state has already taken in (one pass after the prefix): the loop starts
    at step `steps`, as if it had taken `forced`'s first `steps` tokens one step each."""

    steps: int  # static: frames 0..steps-1 of every row (each row has at least this many given); a chunk multiple
    logits: Array | None  # float32 [B, steps, V]: the logits each of those steps would have sampled from (keep_logits)


class ArResult(NamedTuple):
    tokens: Array  # int32 [B, N]: level-0 codes, the stop token from each row's end on
    length: Array  # int32 [B]: frames before the stop (or the step limit)
    stopped: Array  # bool [B]: the row produced the stop token (False: it hit its step limit)
    state: object  # the model state after the last step (the KV cache)
    logits: Array | None  # float32 [B, N, V]: each step's raw logits (when asked for)


@struct.dataclass
class ArState:
    """What the AR loop carries from one step to the next."""

    t: Array  # int32 (): the step about to run (= response frames sampled so far)
    logits: Array  # float32 [B, V]: the logits that step t samples from
    tokens: Array  # int32 [B, N]: the tokens sampled so far; the stop token in every later slot
    done: Array  # bool [B]: the row has ended (a stop token, or its step limit)
    mu: Array  # float32 [B]: mirostat's surprise budget (carried unchanged by the other samplers)
    model: Any  # the model's state after the last step (KV cache or recurrent state, prefix lengths)
    kept: Array  # float32 [B, N, V]: each step's raw logits when asked for (else a () placeholder)


@struct.dataclass
class BeamState:
    """What beam search carries from one step to the next (rows b * width + w: beam w of utterance b)."""

    t: Array  # int32 (): the step about to run
    logits: Array  # float32 [B*W, V]: each beam's logits for step t
    tokens: Array  # int32 [B*W, N]: each beam's tokens so far; the stop token in every later slot
    done: Array  # bool [B*W]: the beam has ended (it only "stays" from then on, keeping its score)
    score: Array  # float32 [B*W]: the sum of the beam's token log-probabilities
    length: Array  # int32 [B*W]: the tokens that sum counts (frames, and the stop token once it ended)
    model: Any  # the model's state, gathered along with the beams


@struct.dataclass
class NarState:
    """What the NAR's level loop carries from one level to the next."""

    codes: Array  # int32 [B, R, Q]: the response codes, levels up to the current one filled (0 past a row's end)


def _running(n_slots: int):
    """A while-loop condition: slots are left and some row has not ended."""
    return lambda state: (state.t < n_slots) & ~jnp.all(state.done)


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
    forced: Forced | None = None,
    absorbed: Absorbed | None = None,
) -> ArResult:
    """Samples up to `n_slots` tokens per row; exits when every row is done. `n_slots` must be a
    multiple of `chunk` (the steps one while-loop iteration scans). `forced`: a row's first steps
    take the given tokens instead of sampling (they count as its output, in the step limits and in
    the penalties' history, and leave mirostat's state alone). `absorbed`: the first of them are in
    `state` already (`first_logits_BV` then follow them): the loop starts after them."""
    b, v = first_logits_BV.shape
    assert n_slots % chunk == 0, (n_slots, chunk)
    knobs = jax.tree.map(jnp.asarray, knobs)

    def one(s: ArState, _) -> tuple[ArState, None]:
        key_t = jax.random.fold_in(key, s.t)
        tok, mu = _pick(mode, key_t, s.logits, knobs, s.tokens, s.t, s.mu, stop, sign_aware, ras_window)
        if forced is not None:
            given, forced_tok = forced.at(s.t)
            tok, mu = jnp.where(given, forced_tok, tok), jnp.where(given, s.mu, mu)
        tok = jnp.where(s.done, stop, tok)
        kept = s.kept
        if keep_logits:
            kept = jax.lax.dynamic_update_slice_in_dim(kept, s.logits[:, None], s.t, axis=1)
        logits, model = step_fn(s.model, tok, s.t)
        return ArState(
            t=s.t + 1,
            logits=logits,
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.t, axis=1),
            done=s.done | (tok == stop) | (s.t + 1 >= knobs.max_steps),
            mu=jnp.where(s.done, s.mu, mu),
            model=model,
            kept=kept,
        ), None

    t0, tokens, done = _start(b, n_slots, stop, knobs, forced, absorbed)
    kept = jnp.zeros((b, n_slots, v), jnp.float32) if keep_logits else jnp.zeros((), jnp.float32)
    if keep_logits and absorbed is not None and absorbed.steps:
        kept = kept.at[:, : absorbed.steps].set(absorbed.logits)
    start = ArState(
        t=t0,
        logits=first_logits_BV.astype(jnp.float32),
        tokens=tokens,
        done=done,
        mu=S.mirostat_init(knobs.tau),
        model=state,
        kept=kept,
    )
    end = jax.lax.while_loop(_running(n_slots), lambda s: jax.lax.scan(one, s, None, length=chunk)[0], start)
    length, stopped = _ends(end.tokens, knobs.max_steps, stop)
    return ArResult(end.tokens, length, stopped, end.model, end.kept if keep_logits else None)


def _start(
    rows: int, n_slots: int, stop: int, knobs: Knobs, forced: Forced | None, absorbed: Absorbed | None
) -> tuple[Array, Array, Array]:
    """(first step, token history [rows, n_slots], done [rows]) of a loop: from nothing, or after the
    absorbed given frames, as stepping them would have left them (no row ends on a given frame
    but at its step limit)."""
    tokens = jnp.full((rows, n_slots), stop, jnp.int32)
    if absorbed is None or absorbed.steps == 0:
        return jnp.zeros((), jnp.int32), tokens, jnp.zeros((rows,), bool)
    k = absorbed.steps
    tokens = tokens.at[:, :k].set(forced.tokens[:, :k])
    return jnp.asarray(k, jnp.int32), tokens, k >= knobs.max_steps


def _ends(tokens_BN: Array, max_steps_B: Array, stop: int) -> tuple[Array, Array]:
    """(length [B]: frames before the first stop, stopped [B]: a real stop token came before the
    step limit; past a row's end the loops write stop tokens that do not count)."""
    n = tokens_BN.shape[1]
    is_stop = tokens_BN == stop
    stopped = jnp.any(is_stop & (jnp.arange(n)[None, :] < max_steps_B[:, None]), axis=1)
    length = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), n).astype(jnp.int32)
    return length, stopped


def _normalised(score: Array, length: Array, alpha: Array) -> Array:
    """Beam scores compared across lengths: the summed log-probability over (tokens scored)**alpha
    (alpha 0: the sum itself). Every live candidate of a step has the same length, so this only
    changes how ended beams rank against live ones, and which beam wins at the end."""
    return score / length.astype(jnp.float32) ** alpha


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
    forced: Forced | None = None,
    absorbed: Absorbed | None = None,
) -> tuple[ArResult, Array]:
    """Beam search over B utterances x `width` beams (rows b * width + w of `state`, which
    `reorder_fn(state, rows)` gathers). A beam's score is the sum of its tokens' log-probabilities
    (after penalties, filters and temperature; temperature 0 counts as 1), the stop token's included;
    beams are ranked by it over (tokens scored)**knobs.length_norm (`_normalised`); a finished beam
    keeps its score and length. Returns each utterance's best beam and its (summed) score.
    `forced` (rows as `state`'s): a forced step gives every beam its token at log-probability 0, so
    the beams stay one (beam 0) until the given frames end, and the scores count sampled tokens alone;
    `absorbed` (as ar_loop's): the first of them are in `state` already, the search starts after them
    (the beams are still one there, their scores 0 and -inf)."""
    bw, v = first_logits_BV.shape
    b = bw // width
    assert n_slots % chunk == 0
    knobs = jax.tree.map(jnp.asarray, knobs)

    def one(s: BeamState, _) -> tuple[BeamState, None]:
        x = _filtered(s.logits, knobs, s.tokens, s.t, stop, sign_aware)  # the stop token banned before min_steps
        logp = jax.nn.log_softmax(S.scale_by_temperature(x, knobs.temp, knobs.min_temp), axis=-1)
        scored = s.t + 1  # tokens each live candidate's score sums
        if forced is not None:
            given, forced_tok = forced.at(s.t)
            only = jnp.where(jnp.arange(v)[None, :] == forced_tok[:, None], 0.0, NEG_INF)
            logp = jnp.where(given[:, None], only, logp)
            scored = jnp.maximum(s.t + 1 - forced.length, 1)
        finished = jnp.where(jnp.arange(v)[None, :] == stop, 0.0, NEG_INF)  # a done beam only "stays"
        total = s.score[:, None] + jnp.where(s.done[:, None], finished, logp)  # [B*W, V]
        length = jnp.where(s.done, s.length, scored)
        rank = _normalised(total, length[:, None], knobs.length_norm[:, None])
        _, idx = jax.lax.top_k(rank.reshape(b, width * v), width)  # [b, width]
        rows = (jnp.arange(b)[:, None] * width + idx // v).reshape(-1)
        tok = (idx % v).reshape(-1).astype(jnp.int32)
        logits, model = step_fn(reorder_fn(s.model, rows), tok, s.t)
        return BeamState(
            t=s.t + 1,
            logits=logits,
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens[rows], tok[:, None], s.t, axis=1),
            done=s.done[rows] | (tok == stop) | (s.t + 1 >= knobs.max_steps),
            score=jnp.take_along_axis(total.reshape(b, width * v), idx, axis=1).reshape(-1),
            length=length[rows],
            model=model,
        ), None

    t0, tokens, done = _start(bw, n_slots, stop, knobs, forced, absorbed)
    start = BeamState(
        t=t0,
        logits=first_logits_BV.astype(jnp.float32),
        tokens=tokens,
        done=done,
        # all beams start identical: only beam 0 may expand at the first step, or they would stay copies
        score=jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, NEG_INF), b),
        length=jnp.ones((bw,), jnp.int32),
        model=state,
    )
    end = jax.lax.while_loop(_running(n_slots), lambda s: jax.lax.scan(one, s, None, length=chunk)[0], start)
    final = _normalised(end.score, end.length, knobs.length_norm).reshape(b, width)
    best_rows = jnp.arange(b) * width + jnp.argmax(final, axis=1)
    tokens = end.tokens[best_rows]
    length, stopped = _ends(tokens, knobs.max_steps[best_rows], stop)
    return ArResult(tokens, length, stopped, reorder_fn(end.model, best_rows), None), end.score[best_rows]


# ---- the model side ------------------------------------------------------------------------------


def prefix_slots(inputs: Inputs) -> int:
    """Padded prefix length: text and prompt buckets, 2 separators, lang, separator."""
    return inputs.text.shape[1] + inputs.prompt.shape[1] + 4


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The decoding cache a prefill makes (static)."""

    capacity: int  # slots: the prefix and every response frame
    storage: str = "float32"  # the buffers' dtype (backend.cache_storage: a bfloat16 cache may be held as bits)
    layout: backend.CacheLayout = backend.CacheLayout()  # which backend attends over it


def _prefill(model: VALLE, inputs: Inputs, spec: CacheSpec | None = None, layers: list[dict] | None = None):
    """The prefix through the model, into a new cache (`spec`; None: no cache): (logits for
    response frame 0 [B, V], cache, prefix length [B], prefix inputs x, valid)."""
    x, valid = model.embed_prefix(inputs.text, inputs.text_len, inputs.lang, inputs.prompt, inputs.prompt_len)
    b, sp = valid.shape
    cache = None if spec is None else model.init_cache(b, spec.capacity, jnp.dtype(spec.storage), spec.layout)
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
            past_end = cache["valid"].shape[1]
            cache = model.backbone.forget(cache, jnp.where((context_B > 0) & (old >= 0), sp + old, past_end))
        level = jnp.zeros((b,), jnp.int32)
        x = model.embed_frames(tok_B[:, None, None], level)
        logits, _, cache = model.run(x, (plen + t)[:, None], jnp.ones((b, 1), bool), level, cache, layers=layers)
        return logits[:, 0], (cache, plen)

    return step


def _uncached_logits(model: VALLE, x_prefix: Array, valid_prefix: Array, frames_BN: Array, t: Array, plen: Array):
    """The whole sequence, prefix and frames 0..t of the buffer `frames_BN`, through the model:
    logits [B, sp + N, V] (slot sp + t chooses frame t + 1)."""
    (b, sp), n = valid_prefix.shape, frames_BN.shape[1]
    level = jnp.zeros((b,), jnp.int32)
    x = jnp.concatenate([x_prefix, model.embed_frames(frames_BN[..., None], level)], axis=1)
    slots = jnp.arange(n)[None, :]
    valid = jnp.concatenate([valid_prefix, jnp.broadcast_to(slots <= t, (b, n))], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(sp), (b, sp)), plen[:, None] + slots], axis=1)
    return model.run(x, pos, valid, level)[0]


def _uncached_step(model: VALLE, x_prefix: Array, valid_prefix: Array):
    """step_fn without a cache (the reference's way): the whole sequence, prefix and every frame
    so far, runs through the model at each step; frames are kept in a fixed-size buffer."""
    sp = valid_prefix.shape[1]

    def step(state, tok_B, t):
        frames, plen = state
        frames = jax.lax.dynamic_update_slice_in_dim(frames, tok_B[:, None], t, axis=1)
        logits = _uncached_logits(model, x_prefix, valid_prefix, frames, t, plen)
        return jax.lax.dynamic_index_in_dim(logits, sp + t, axis=1, keepdims=False), (frames, plen)

    return step


def _absorbed(first_BV: Array, frame_logits_BKV: Array) -> tuple[Array, Absorbed]:
    """(the logits the loop starts from, Absorbed) after a pass over K given frames whose logits
    (frame t's: choosing frame t + 1) are `frame_logits_BKV`; `first_BV`: the prefix's (frame 0's)."""
    k = frame_logits_BKV.shape[1]
    kept = jnp.concatenate([first_BV[:, None], frame_logits_BKV[:, : k - 1]], axis=1)
    return frame_logits_BKV[:, k - 1], Absorbed(k, kept)


def _absorb_cached(model: VALLE, forced: Forced, k: int, cache, plen: Array, layers: list[dict]):
    """Given frames 0..k-1 of every row through the model in one pass after the prefix, into the
    cache at the slots and positions their steps would have used: (their logits [B, k, V], cache)."""
    b = plen.shape[0]
    level = jnp.zeros((b,), jnp.int32)
    x = model.embed_frames(forced.tokens[:, :k, None], level)
    pos = plen[:, None] + jnp.arange(k)[None, :]
    logits, _, cache = model.run(x, pos, jnp.ones((b, k), bool), level, cache, layers=layers)
    return logits, cache


def _reorderer(model: VALLE):
    """Beams take over other beams' caches: (cache, prefix lengths) gathered by batch rows."""
    return lambda state, rows: (model.backbone.reorder_cache(state[0], rows), state[1][rows])


@dataclasses.dataclass(frozen=True)
class ArPlan:
    """The static choices of one compiled AR (a change compiles another program)."""

    n_slots: int  # the step bucket: tokens per row at most (a multiple of chunk)
    chunk: int = 8  # steps per while-loop iteration
    mode: str = "sample"  # Settings.mode
    width: int = 1  # beams per utterance (mode "beam")
    sign_aware: bool = True
    ras_window: int = 10
    cached: bool = True  # False: the reference's way, the whole sequence at every step
    keep_logits: bool = False
    absorbed: int = 0  # given frames (Continuation) of every row prefilled in one pass (a chunk multiple)
    kv_storage: str = "float32"  # the KV cache buffers' dtype
    layout: backend.CacheLayout = backend.CacheLayout()

    def loop_options(self, stop: int) -> dict:
        """ar_loop's keyword options."""
        return dict(
            n_slots=self.n_slots,
            stop=stop,
            mode=self.mode,
            chunk=self.chunk,
            sign_aware=self.sign_aware,
            ras_window=self.ras_window,
            keep_logits=self.keep_logits,
        )


def _ar(
    graph,
    params,
    inputs: Inputs,
    knobs: Knobs,
    key: Array,
    layers: list[dict] | None = None,
    forced: Forced | None = None,
    *,
    plan: ArPlan,
):
    """Level 0 of a batch: its prefill, then the AR loop (or beam search) over `plan`. `layers`: the
    backbone's per-layer weights as the decoder holds them (its step layers), or None to slice them
    from `params`, once, outside the loop. `forced`: the given first frames (Continuation)."""
    model = nnx.merge(graph, params)
    stop = model.cfg.stop_token
    sp, k = prefix_slots(inputs), plan.absorbed
    absorbed = None
    if not plan.cached:
        first, _, plen, x, valid = _prefill(model, inputs)
        frames = jnp.full((valid.shape[0], plan.n_slots), stop, jnp.int32)
        if k:  # one pass over the prefix and the given frames, as the step before frame k would make
            frames = frames.at[:, :k].set(forced.tokens[:, :k])
            logits = _uncached_logits(model, x, valid, frames, jnp.asarray(k - 1), plen)
            first, absorbed = _absorbed(first, logits[:, sp : sp + k])
        step = _uncached_step(model, x, valid)
        options = plan.loop_options(stop)
        return ar_loop(first, step, (frames, plen), knobs, key, forced=forced, absorbed=absorbed, **options)
    layers = layers if layers is not None else model.backbone.unstack()
    if not backend.packed_rows_fit(len(inputs.text_len) * plan.width):
        layers = [backend.unpacked(p) for p in layers]  # here, once: XLA would unpack them at every step
    spec = CacheSpec(sp + plan.n_slots, plan.kv_storage, plan.layout)
    first, cache, plen, _, _ = _prefill(model, inputs, spec, layers)
    if k:
        logits, cache = _absorb_cached(model, forced, k, cache, plen, layers)
        first, absorbed = _absorbed(first, logits)
    if plan.mode != "beam":
        step = _cached_step(model, sp, knobs.context, layers)
        options = plan.loop_options(stop)
        return ar_loop(first, step, (cache, plen), knobs, key, forced=forced, absorbed=absorbed, **options)
    rows = jnp.repeat(jnp.arange(first.shape[0]), plan.width)
    reorder = _reorderer(model)
    state = reorder((cache, plen), rows)
    knobs = jax.tree.map(lambda a: a[rows], knobs)
    forced = None if forced is None else jax.tree.map(lambda a: a[rows], forced)
    step = _cached_step(model, sp, knobs.context, layers)
    options = dict(width=plan.width, n_slots=plan.n_slots, stop=stop, chunk=plan.chunk, sign_aware=plan.sign_aware)
    absorbed = None if absorbed is None else Absorbed(k, None)  # beams keep no logits
    return beam_loop(first[rows], step, reorder, state, knobs, forced=forced, absorbed=absorbed, **options)[0]


class NarStart(NamedTuple):
    """Where the NAR starts from: what the AR made."""

    cache: dict | None  # the AR's cache (its prefix is reused), or None: rerun the whole sequence
    level0: Array  # int32 [B, R]: the AR's tokens over the NAR's R response slots
    length: Array  # int32 [B]: response frames per row
    n_levels: Array  # int32 (): levels 1..n_levels are sampled (traced: no recompile per count)
    given: Continuation | None = None  # frames whose codes are kept at every level, not sampled


@dataclasses.dataclass(frozen=True)
class NarPlan:
    """The static choices of one compiled NAR."""

    sign_aware: bool = True


def _nar(
    graph, params, inputs: Inputs, start: NarStart, knobs: Knobs, key: Array, layers=None, *, plan: NarPlan
) -> Array:
    """Levels 1..n_levels of the response, each from the levels below it: codes [B, R, Q].
    `layers`: the backbone's per-layer weights as an argument (the decoder's float32 step layers,
    unpacked here, once, outside the levels' loop); None slices them from `params` here, where XLA
    copies every weight at every call (half preset: ~150 ms of ~2.5 s)."""
    model = nnx.merge(graph, params)
    cfg = model.cfg
    b, r = start.level0.shape
    frame_valid = jnp.arange(r)[None, :] < start.length[:, None]
    layers = [backend.unpacked(p) for p in (layers if layers is not None else model.backbone.unstack())]
    level_logits = _nar_logits(model, inputs, start, frame_valid, layers)
    given = start.given
    if given is not None:
        k = given.codes.shape[1]
        given_codes = jnp.zeros((b, r, cfg.n_resp_levels), jnp.int32).at[:, : min(k, r)].set(given.codes[:, :r])
        given_frames = jnp.arange(r)[None, :] < given.length[:, None]

    def body(level, s: NarState) -> NarState:
        logits = level_logits(jnp.full((b,), level), s.codes)
        logits = logits.at[..., cfg.stop_token].set(NEG_INF)  # a NAR pass never ends the utterance
        prev = jax.lax.dynamic_index_in_dim(s.codes, level - 1, axis=2, keepdims=False)
        penalty, applies = S.repetition_factors(prev, frame_valid, knobs.rep, knobs.rep_decay, logits.shape[-1])
        x = S.apply_penalty(logits, penalty[:, None], applies[:, None], plan.sign_aware)
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
        if given is not None:  # the continuation's own frames keep their codes
            tok = jnp.where(given_frames, given_codes[..., level], tok)
        tok = jnp.where(frame_valid, tok, 0)
        return NarState(jax.lax.dynamic_update_slice_in_dim(s.codes, tok[..., None], level, axis=2))

    codes = jnp.zeros((b, r, cfg.n_resp_levels), jnp.int32).at[..., 0].set(jnp.where(frame_valid, start.level0, 0))
    return jax.lax.fori_loop(1, start.n_levels + 1, body, NarState(codes)).codes


def _nar_logits(model: VALLE, inputs: Inputs, start: NarStart, frame_valid: Array, layers: list[dict]):
    """`(level_B, codes) -> logits [B, R, V]` of the response positions at a NAR level: over the
    AR's cache of the prefix (only the response positions are computed), or over the whole sequence
    when there is none (a bidirectional NAR attends to the response)."""
    plen = prefix_len(inputs.text_len, inputs.prompt_len)
    r = start.level0.shape[1]
    positions = plen[:, None] + jnp.arange(r)[None, :]
    if start.cache is not None:
        cache = model.backbone.nar_cache(start.cache, prefix_slots(inputs), r)  # the prefix's keys/values alone

        def from_cache(level_B, codes):
            x = model.embed_frames(codes, level_B)
            return model.run(x, positions, frame_valid, level_B, cache, layers=layers)[0]

        return from_cache

    def whole(level_B, codes):
        batch = dict(inputs._asdict(), resp=codes, resp_len=start.length)
        logits, _ = model(batch, level_B)
        return jnp.take_along_axis(logits, positions[..., None], axis=1)

    return whole


class Output(NamedTuple):
    codes: list[np.ndarray]  # int32 [frames, 1 + levels] per utterance
    stopped: np.ndarray  # bool [B]: the AR produced a stop token (False: it ran to max_ar_steps)


class Decoder:
    """Jitted decoding for one model: compiled once per (batch, text, prompt, step) bucket and mode.

    How it computes is decided once, by valle_jax.backend (`plan`): on the CPU, where the kernels
    build, the AR steps' matmuls run `rows_linear` over `step_layers` (the layer weights packed, in
    the model's dtype) and attention reads the filled cache slots alone. There `dtype="bfloat16"`
    means bfloat16 weights for the AR steps (half the bytes to stream per step) while everything
    else computes in float32. Elsewhere (or with `cpu_kernels=False`), `dtype="bfloat16"` stores the
    matrices and tables in bfloat16 and computes in it. `step_layers` are made on first use and
    again whenever `params` is replaced. `kv_dtype`: the AR's KV cache (None: the plan's default);
    "bfloat16" halves what a step reads from the cache, which at batch 8 and more is about as much
    as the weights (recurrent states stay float32)."""

    def __init__(self, model: VALLE, chunk: int = 8, cpu_kernels: bool = True, kv_dtype: str | None = None):
        self.cfg = model.cfg
        self.chunk = chunk
        self.has_window = model.backbone.has_window
        self.plan = backend.DecodingPlan.make(self.cfg.dtype, cpu_kernels, kv_dtype)
        graph, params = nnx.split(model)
        if self.plan.compute_dtype != self.cfg.dtype:  # the same parameters, layers computing in another dtype
            graph = nnx.split(abstract_model(dataclasses.replace(self.cfg, dtype=self.plan.compute_dtype)))[0]
        if self.plan.stores_bfloat16:  # matrices and tables; norms and biases stay float32
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
        self.graph, self.params = graph, params
        self._ar = jax.jit(functools.partial(_ar, graph), static_argnames=("plan",))
        self._nar = jax.jit(
            functools.partial(_nar, graph), static_argnames=("plan",), compiler_options=backend.nar_compiler_options()
        )
        self._pack = jax.jit(lambda params: self.plan.step_layers(nnx.merge(graph, params).backbone))

    @property
    def cpu_kernels(self) -> bool:
        return self.plan.kernels

    @property
    def kv_dtype(self) -> str:
        return self.plan.kv_dtype

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        self._params, self._step_layers = params, None

    @property
    def step_layers(self) -> list[dict] | None:
        """The layer weights the AR steps read (None: XLA's dot over `params`, off the kernels)."""
        if self._step_layers is None and (self.plan.kernels or self.cfg.bitlinear):  # BitNet: packed everywhere
            self._step_layers = self._pack(self._params)
        return self._step_layers

    @property
    def nar_layers(self) -> list[dict] | None:
        """The layer weights the NAR reads (backend.DecodingPlan.nar_layers)."""
        return self.plan.nar_layers(self.step_layers)

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
        continuation: Continuation | None = None,
        prefill_given: bool = True,
    ) -> ArResult:
        """Level 0. `knobs` overrides the per-row values `settings` gives (their minimum steps from
        each row's text length); `n_slots` the step bucket (a multiple of the chunk).
        `continuation`: each row's response starts with its given frames, which the AR takes
        as its own output before sampling; the result's tokens and length then cover the whole
        response (given frames first), its step limit counts the frames generated after them (the
        row's max_steps + its given frames), and its minimum steps count the whole response (from the
        text: the given frames say part of it). The given frames every row has go through the model in
        one pass (module docstring); `prefill_given=False` steps through every one instead (what the
        one pass is tested against)."""
        b = len(inputs.text_len)
        knobs = knobs if knobs is not None else Knobs.of(settings, b, text_len=np.asarray(inputs.text_len))
        forced = None
        if continuation is not None:
            self.check_continuation(continuation, b)
            knobs = knobs._replace(max_steps=np.asarray(knobs.max_steps) + np.asarray(continuation.length))
            forced = Forced.of(continuation)
        if not self.has_window and bool(np.any(np.asarray(knobs.context) > 0)):
            raise DecodeError(
                f"max_ar_context needs a cache that keeps every frame; the {self.cfg.arch} backbone "
                "decodes from a recurrent state, whose past already fades by its decay"
            )
        n_slots = n_slots or self.n_slots(int(np.max(knobs.max_steps)))
        absorbed = 0
        if forced is not None and prefill_given and not np.any(np.asarray(knobs.context) > 0):
            absorbed = min(int(np.min(continuation.length)), n_slots) // self.chunk * self.chunk
        call = self.ar_call(settings, n_slots, cached, keep_logits, absorbed)
        return call(self.params, inputs, knobs, jax.random.key(settings.seed), forced=forced)

    def check_continuation(self, c: Continuation, batch: int) -> None:
        """A continuation this model can take: a row each, every response level, codes below the stop token."""
        codes, length = np.asarray(c.codes), np.asarray(c.length)
        if codes.ndim != 3 or codes.shape[0] != batch or codes.shape[2] != self.cfg.n_resp_levels:
            raise DecodeError(
                f"continuation codes must be [{batch}, frames, {self.cfg.n_resp_levels}] (a row each, every "
                f"response level), got {codes.shape}"
            )
        if length.shape != (batch,) or np.any(length < 0) or np.any(length > codes.shape[1]):
            raise DecodeError(f"continuation lengths must be [{batch}] within 0..{codes.shape[1]}, got {length}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.cfg.stop_token):
            raise DecodeError(f"continuation codes must lie in 0..{self.cfg.stop_token - 1}")

    def ar_plan(
        self, settings: Settings, n_slots: int, cached: bool = True, keep_logits: bool = False, absorbed: int = 0
    ) -> ArPlan:
        return ArPlan(
            n_slots=n_slots,
            chunk=self.chunk,
            mode=settings.mode,
            width=max(settings.beam_width, 1),
            sign_aware=settings.sign_aware_penalties,
            ras_window=settings.ras_window,
            cached=cached,
            keep_logits=keep_logits,
            absorbed=absorbed,
            kv_storage=backend.cache_storage(self.plan.kv_dtype).name,
            layout=self.plan.cache_layout,
        )

    def ar_call(
        self, settings: Settings, n_slots: int, cached: bool = True, keep_logits: bool = False, absorbed: int = 0
    ):
        """The jitted AR with the static choices of `settings` bound: `(params, inputs, knobs, key) ->
        ArResult` (for `jax.eval_shape` or `.lower()` too); `absorbed`: ArPlan's."""
        plan = self.ar_plan(settings, n_slots, cached, keep_logits, absorbed)
        return functools.partial(self._ar, layers=self.step_layers if cached else None, plan=plan)

    def nar(
        self,
        inputs: Inputs,
        ar: ArResult,
        settings: Settings,
        continuation: Continuation | None = None,
        knobs: Knobs | None = None,
    ) -> Array:
        """codes [B, R, n_resp_levels] (levels past the requested count are 0); R is a bucket.
        `continuation`: the one given to `ar`; its frames keep their codes at every level. `knobs`:
        per-row NAR values overriding `settings`' (a server's batch of unrelated requests)."""
        args, static = self.nar_arguments(inputs, ar, settings, continuation, knobs)
        return self._nar(*args, **static)

    def nar_arguments(
        self,
        inputs: Inputs,
        ar: ArResult,
        settings: Settings,
        continuation: Continuation | None = None,
        knobs: Knobs | None = None,
    ) -> tuple[tuple, dict]:
        """What `nar` passes to the jitted NAR: (arguments, static arguments), for `._nar.lower()` too."""
        b = len(inputs.text_len)
        r = min(bucket(max(int(np.max(ar.length)), 1), NAR_BUCKETS), ar.tokens.shape[1])
        start = NarStart(
            cache=None if self.cfg.bidirectional_nar else ar.state[0],
            level0=ar.tokens[:, :r],
            length=jnp.minimum(ar.length, r),
            n_levels=jnp.asarray(settings.nar_levels(self.cfg.n_resp_levels)),
            given=None if continuation is None else Continuation(*map(jnp.asarray, continuation)),
        )
        key = jax.random.fold_in(jax.random.key(settings.seed), 1)
        knobs = knobs if knobs is not None else Knobs.of(settings, b, ar=False)
        args = (self.params, inputs, start, knobs, key, self.nar_layers)
        return args, {"plan": NarPlan(settings.sign_aware_penalties)}

    def generate(self, inputs: Inputs, settings: Settings, continuation: Continuation | None = None) -> Output:
        """Each row's codes; with a `continuation`, the frames generated after its given ones."""
        ar = self.ar(inputs, settings, continuation=continuation)
        length, stopped = np.asarray(ar.length), np.asarray(ar.stopped)
        if int(length.max()) == 0:
            codes = np.zeros((len(length), 0, self.cfg.n_resp_levels), np.int32)
        else:
            codes = np.asarray(self.nar(inputs, ar, settings, continuation))
        levels = 1 + settings.nar_levels(self.cfg.n_resp_levels)
        given = np.zeros(len(length), np.int64) if continuation is None else np.asarray(continuation.length)
        return Output([codes[i, given[i] : length[i], :levels] for i in range(len(length))], stopped)


__all__ = [
    "Decoder",
    "Settings",
    "Knobs",
    "Inputs",
    "Output",
    "ArResult",
    "Continuation",
    "make_continuation",
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
