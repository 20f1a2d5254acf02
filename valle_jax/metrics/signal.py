"""Distance to the ground truth: mel-cepstral distortion with DTW, log-F0 RMSE, duration ratio.

Both utterances are analysed with WORLD (pyworld: DIO + StoneMask F0, CheapTrick spectral
envelope) at 16 kHz with a 5 ms frame period; the envelope is coded as MCEP_ORDER + 1 mel-cepstral
coefficients (pyworld.code_spectral_envelope), c0 (energy) left out, as in ESPnet's MCD. The two
sequences are aligned by DTW over those coefficients (librosa.sequence.dtw, Euclidean), and

    MCD = 10 / ln(10) * sqrt(2 * sum_d (c_d - c'_d)^2)      (dB), averaged over the aligned pairs;
    log-F0 RMSE = sqrt(mean (ln F0 - ln F0')^2) over the aligned pairs voiced in both
                  (natural log; x 1731 gives cents; NaN when no pair is voiced in both);
    duration ratio = output seconds / ground-truth seconds, leading and trailing silence
                     (40 dB below the peak) trimmed from both.
"""

from __future__ import annotations

import math

import numpy as np

from valle_jax.audio import resample
from valle_jax.metrics.base import Sample, nan, register_metric, require

RATE = 16_000
FRAME_MS = 5.0
MCEP_ORDER = 24
MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)
TRIM_DB = 40.0


def world_features(wav: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(F0 [T] in Hz, 0 where unvoiced; mel-cepstrum [T, MCEP_ORDER] without c0)."""
    pw = require("pyworld", "pyworld")
    x = resample(np.asarray(wav, np.float32), sr, RATE).astype(np.float64)
    f0, t = pw.dio(x, RATE, frame_period=FRAME_MS)
    f0 = pw.stonemask(x, f0, t, RATE)
    sp = pw.cheaptrick(x, f0, t, RATE)
    mcep = pw.code_spectral_envelope(sp, RATE, MCEP_ORDER + 1)
    return f0, mcep[:, 1:]


def dtw_path(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Aligned frame pairs [K, 2] (in time order) of feature sequences a [Ta, D] and b [Tb, D]."""
    librosa = require("librosa", "librosa")
    _, path = librosa.sequence.dtw(X=a.T, Y=b.T, metric="euclidean")
    return path[::-1]


def trimmed_seconds(wav: np.ndarray, sr: int, top_db: float = TRIM_DB) -> float:
    """Seconds from the first to the last 10 ms frame within `top_db` of the loudest frame."""
    hop = max(1, sr // 100)
    n = -(-len(wav) // hop)
    if n == 0:
        return 0.0
    x = np.zeros(n * hop, np.float64)
    x[: len(wav)] = wav
    rms = np.sqrt(np.mean(x.reshape(n, hop) ** 2, axis=1))
    if rms.max() <= 0:
        return 0.0
    loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-12) / rms.max()) > -top_db)
    return min((loud[-1] - loud[0] + 1) * hop, len(wav)) / sr


def distortion(truth: np.ndarray, hyp: np.ndarray, sr: int) -> dict:
    """{"mcd", "f0_rmse", "duration_ratio"} of `hyp` against `truth` (see the module doc)."""
    gt_s, hyp_s = trimmed_seconds(truth, sr), trimmed_seconds(hyp, sr)
    ratio = hyp_s / gt_s if gt_s > 0 else nan()
    if min(len(hyp), len(truth)) < sr // 50:  # under 20 ms: too few frames to analyse
        return {"mcd": nan(), "f0_rmse": nan(), "duration_ratio": ratio}
    f0_a, mc_a = world_features(truth, sr)
    f0_b, mc_b = world_features(hyp, sr)
    path = dtw_path(mc_a, mc_b)
    diff = mc_a[path[:, 0]] - mc_b[path[:, 1]]
    mcd = float(MCD_SCALE * np.mean(np.sqrt(np.sum(diff**2, axis=1))))
    fa, fb = f0_a[path[:, 0]], f0_b[path[:, 1]]
    voiced = (fa > 0) & (fb > 0)
    f0_rmse = float(np.sqrt(np.mean((np.log(fa[voiced]) - np.log(fb[voiced])) ** 2))) if voiced.any() else nan()
    return {"mcd": mcd, "f0_rmse": f0_rmse, "duration_ratio": ratio}


@register_metric("mcd")
class Distortion:
    """MCD (dB), log-F0 RMSE and duration ratio against the ground truth (NaN without one)."""

    keys = ("mcd", "f0_rmse", "duration_ratio")

    def __init__(self):
        require("pyworld", "pyworld")
        require("librosa", "librosa")

    def __call__(self, sample: Sample) -> dict:
        if sample.truth is None:
            return {k: nan() for k in self.keys}
        return distortion(sample.truth, sample.hyp, sample.sr)
