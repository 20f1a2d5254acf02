"""Means with 95% confidence intervals (Student's t over the utterances) for the summary table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats


def interval(values: Iterable[float], level: float = 0.95) -> dict:
    """{"mean", "lo", "hi", "n"} over the finite values (NaN ones are left out and not counted);
    lo/hi: the t-interval of the mean (NaN with fewer than 2 values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def summarize(rows: Sequence[Mapping], keys: Sequence[str]) -> dict[str, dict]:
    """interval() of each numeric key over the rows that hold it."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        out[k] = interval(vals)
    return out
