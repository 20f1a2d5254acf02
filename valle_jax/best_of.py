"""Best-of-N synthesis: N candidates of one text decoded in one batch, the best one kept.

    picks = tts.best_of("Hello there.", "voice.wav", 4)              # one BestOf per line of text
    wav = tts.synthesize("Hello there.", "voice.wav", best_of=4)    # the same, as a waveform
    python -m valle_jax.synthesize TEXT voice.wav --out o.wav --checkpoint M --best-of 4 --verbose

The candidates are the text and voice repeated N times in one decoder batch: every row draws its
own tokens (the batch shares a key, each row its own draws), so they differ wherever sampling does
(beam search and fully greedy decoding would make N copies: refused). They are ranked by
valle_jax.metrics.ranking: WER of an ASR transcript (lower first), ties by speaker similarity to
the voice (higher first), then by the AR's mean log-probability of its level-0 tokens (raw
logits, before penalties and temperature; higher first). Without an ASR backend (asr "none", or
its library missing: a warning says so) only the log-probability ranks them: similarity alone
would prefer the voice over the words. A candidate with no frames never wins over one with some.

For a server: a request's `best_of` field maps to `TTS.synthesize(..., best_of=N)` or
`TTS.best_of(...)`; `check_best_of(n, settings)` validates it before anything decodes, and
`BestOf.as_dict()` gives every candidate's scores as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import numpy as np

from valle_jax.audio import SAMPLE_RATE
from valle_jax.decoding import DecodeError, Settings, make_inputs
from valle_jax.metrics import (
    Candidate,
    Metric,
    MetricUnavailable,
    make_metric,
    mean_ar_logprob,
    rank_candidates,
    score_candidates,
)
from valle_jax.metrics.intelligibility import ASR_BACKENDS
from valle_jax.metrics.speaker import VERIFIERS

log = logging.getLogger(__name__)
NO_ASR = "none"  # rank by the AR's mean log-probability alone
MAX_BEST_OF = 64  # candidates are one batch: its memory grows with N


@dataclasses.dataclass(frozen=True)
class Judge:
    """What ranks candidates: a WER metric and a similarity metric, or neither (log-probability)."""

    wer: Metric | None = None
    sim: Metric | None = None

    @property
    def criteria(self) -> str:
        if self.wer is None:
            return "mean AR log-probability"
        return "WER, then " + ("speaker similarity, then " if self.sim is not None else "") + "mean AR log-probability"


def check_best_of(n: int, settings: Settings, asr: str = "pocketsphinx", verifier: str = "resemblyzer") -> None:
    """A best-of request decoding can serve (no model needed): raises DecodeError."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_BEST_OF:
        raise DecodeError(f"best_of must be an integer from 1 to {MAX_BEST_OF}, got {n!r}")
    if asr != NO_ASR and asr not in ASR_BACKENDS:
        raise DecodeError(f"unknown best-of ASR {asr!r}; known: {', '.join([NO_ASR, *sorted(ASR_BACKENDS)])}")
    if verifier not in VERIFIERS:
        raise DecodeError(f"unknown speaker verifier {verifier!r}; known: {', '.join(sorted(VERIFIERS))}")
    if n > 1 and settings.beam_width > 1:
        raise DecodeError("best_of > 1 needs sampling: beam search would make the same candidate N times")
    if n > 1 and settings.ar_temp == 0 and settings.nar_temp == 0:
        raise DecodeError("best_of > 1 needs sampling: with both temperatures 0 the N candidates are identical")


@functools.lru_cache(maxsize=4)
def make_judge(asr: str = "pocketsphinx", verifier: str = "resemblyzer") -> Judge:
    """The metrics that rank candidates (loaded once per process). A missing ASR library falls back
    to the log-probability and a missing verifier to WER then log-probability, each with a warning."""
    if asr == NO_ASR:
        return Judge()
    try:
        wer = make_metric("wer", asr=asr)
    except MetricUnavailable as e:
        log.warning("best-of: no ASR (%s); ranking by mean AR log-probability", e)
        return Judge()
    try:
        sim = make_metric("sim", verifier=verifier)
    except MetricUnavailable as e:
        log.warning("best-of: no speaker verifier (%s); ranking by WER, then mean AR log-probability", e)
        sim = None
    return Judge(wer, sim)


@dataclasses.dataclass
class BestOf:
    """One text's candidates and the one kept."""

    wav: np.ndarray  # the chosen candidate's audio (24 kHz)
    codes: np.ndarray  # its codes [frames, levels]
    chosen: int
    candidates: list[Candidate]  # every candidate's scores (None: that criterion was not computed)
    frames: list[int]
    stopped: list[bool]  # the AR produced a stop token (False: it reached max_ar_steps)
    criteria: str

    def as_dict(self) -> dict:
        """JSON-able: the chosen index, the criteria, and every candidate's scores."""
        return {
            "chosen": self.chosen,
            "criteria": self.criteria,
            "candidates": [
                {**dataclasses.asdict(c), "frames": f, "stopped": s}
                for c, f, s in zip(self.candidates, self.frames, self.stopped)
            ],
        }

    def report(self) -> list[str]:
        """One line per candidate (the chosen one marked), as --verbose prints them."""
        lines = [f"best of {len(self.candidates)} by {self.criteria}: candidate {self.chosen}"]
        for i, (c, f, s) in enumerate(zip(self.candidates, self.frames, self.stopped)):
            scores = ", ".join(f"{k} {_fmt(v)}" for k, v in dataclasses.asdict(c).items())
            mark = "  <- chosen" if i == self.chosen else ""
            lines.append(f"  candidate {i}: {f / 75:.2f} s{'' if s else ' (no stop token)'}, {scores}{mark}")
        return lines


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if math.isfinite(v) else "nan"


def choose(candidates: Sequence[Candidate], frames: Sequence[int]) -> int:
    """The best candidate (metrics.rank_candidates) among those with frames, if any has."""
    live = [i for i, f in enumerate(frames) if f > 0] or list(range(len(frames)))
    order = rank_candidates([candidates[i] for i in live])
    return live[order[0]]


def pick_best(
    tts,
    text_ids: list[int],
    lang: int,
    voice_codes: np.ndarray,
    n: int,
    settings: Settings,
    judge: Judge,
    text: str,
    voice_wav: np.ndarray | None = None,
) -> BestOf:
    """Decodes `n` candidates of one text (ids) in the voice (prompt codes) as one batch, scores
    them with `judge` (WER against `text`, similarity to `voice_wav`: the prompt decoded when None)
    and keeps the best. `tts`: a valle_jax.TTS (its decoder, config and codec)."""
    inputs = make_inputs([text_ids] * n, [voice_codes] * n, [lang] * n, tts.cfg.n_prom_levels)
    ar = tts.decoder.ar(inputs, settings, keep_logits=True)
    length, stopped = np.asarray(ar.length), np.asarray(ar.stopped)
    logprobs = mean_ar_logprob(np.asarray(ar.logits), np.asarray(ar.tokens), length)
    if int(length.max()) > 0:
        codes = np.asarray(tts.decoder.nar(inputs, ar, settings))
    else:
        codes = np.zeros((n, 0, tts.cfg.n_resp_levels), np.int32)
    levels = 1 + settings.nar_levels(tts.cfg.n_resp_levels)
    cand_codes = [codes[i, : length[i], :levels] for i in range(n)]
    wavs = list(tts.decode_rows(cand_codes))
    if judge.sim is not None and voice_wav is None:
        voice_wav = tts.decode(np.asarray(voice_codes))
    candidates = score_candidates(wavs, text, voice_wav, SAMPLE_RATE, judge.wer, judge.sim, list(logprobs))
    best = choose(candidates, [int(f) for f in length])
    return BestOf(
        wavs[best],
        cand_codes[best],
        best,
        candidates,
        [int(f) for f in length],
        [bool(s) for s in stopped],
        judge.criteria,
    )
