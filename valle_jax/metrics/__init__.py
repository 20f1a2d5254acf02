"""Measuring synthesised speech: each metric is a small function over one `Sample`.

    from valle_jax.metrics import Sample, make_metric
    sim = make_metric("sim")                  # speaker similarity (resemblyzer; see speaker.VERIFIERS)
    wer = make_metric("wer", asr="pocketsphinx")
    row = {**sim(Sample(hyp, prompt=prompt, truth=truth)), **wer(Sample(hyp, text="Hello there."))}

Metrics (METRICS, by name): `sim` (speaker similarity, prompt vs output and ground truth vs
output), `wer` (ASR transcript vs text: WER and CER), `mcd` (mel-cepstral distortion with DTW,
log-F0 RMSE and the duration ratio against the ground truth). A metric returns the scores it can
compute (NaN where an input is missing or it cannot tell). Their libraries are the `eval` extra
(`pip install -e .[eval]`); a missing one raises MetricUnavailable with a one-line message.
`ranking` orders best-of-N candidates; `stats` gives means and 95% intervals.
"""

from valle_jax.metrics import intelligibility, signal, speaker  # noqa: F401 - importing registers their metrics
from valle_jax.metrics.base import METRICS, Metric, MetricUnavailable, Sample, make_metric, register_metric
from valle_jax.metrics.ranking import Candidate, best_candidate, mean_ar_logprob, rank_candidates, score_candidates
from valle_jax.metrics.stats import interval, summarize

__all__ = [
    "METRICS",
    "Metric",
    "MetricUnavailable",
    "Sample",
    "make_metric",
    "register_metric",
    "Candidate",
    "best_candidate",
    "mean_ar_logprob",
    "rank_candidates",
    "score_candidates",
    "interval",
    "summarize",
]
