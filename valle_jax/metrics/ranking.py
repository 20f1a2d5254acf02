"""Best-of-N: ranking candidate syntheses of one text.

Candidates are ordered by WER (lower first), ties broken by speaker similarity to the prompt
(higher first), then by the AR's mean log-probability (higher first). A criterion is used only
when every candidate has it (a finite value): without an ASR or a verifier the ranking falls back
to the log-probability alone, which needs nothing but the decoder's logits (`mean_ar_logprob`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import log_softmax

from valle_jax.metrics.base import Sample


@dataclasses.dataclass(frozen=True)
class Candidate:
    wer: float | None = None
    sim: float | None = None
    logprob: float | None = None  # mean AR log-probability of the sampled level-0 tokens


def _known(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def rank_candidates(candidates: Sequence[Candidate]) -> list[int]:
    """Candidate indices, best first (stable: equal candidates keep their order)."""
    use_wer = _known(c.wer for c in candidates)
    use_sim = _known(c.sim for c in candidates)
    use_lp = _known(c.logprob for c in candidates)

    def key(i: int) -> tuple:
        c = candidates[i]
        return (
            c.wer if use_wer else 0.0,
            -c.sim if use_sim else 0.0,
            -c.logprob if use_lp else 0.0,
        )

    return sorted(range(len(candidates)), key=key)


def best_candidate(candidates: Sequence[Candidate]) -> int:
    if not candidates:
        raise ValueError("no candidates to rank")
    return rank_candidates(candidates)[0]


def score_candidates(
    wavs: Sequence[np.ndarray],
    text: str,
    prompt: np.ndarray | None,
    sr: int,
    wer=None,
    sim=None,
    logprobs: Sequence[float] | None = None,
) -> list[Candidate]:
    """Candidates of `wavs` scored with the given metrics (`valle_jax.metrics.make_metric("wer")`
    and `("sim")`; None: that criterion is left out)."""
    out = []
    for i, wav in enumerate(wavs):
        s = Sample(wav, text=text, prompt=prompt, sr=sr)
        out.append(
            Candidate(
                wer=wer(s)["wer"] if wer is not None else None,
                sim=sim(s)["sim_prompt"] if sim is not None and prompt is not None else None,
                logprob=None if logprobs is None else float(logprobs[i]),
            )
        )
    return out


def mean_ar_logprob(logits: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean log-probability [B] of each row's first `lengths` tokens under the raw AR logits
    [B, N, V] (as `Decoder.ar(..., keep_logits=True)` returns them; before any temperature)."""
    logits = np.asarray(logits, np.float64)
    tokens = np.asarray(tokens)[:, : logits.shape[1]]
    lp = np.take_along_axis(log_softmax(logits, axis=-1), tokens[..., None].astype(np.int64), axis=-1)[..., 0]
    mask = np.arange(lp.shape[1])[None, :] < np.asarray(lengths)[:, None]
    n = np.maximum(mask.sum(axis=1), 1)
    return np.where(mask.sum(axis=1) > 0, (lp * mask).sum(axis=1) / n, np.nan)
