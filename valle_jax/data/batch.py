"""Padding a handful of utterances into one model batch (tools, tests, synthesis).

The training pipeline builds its batches itself (valle_jax.data.pipeline); this is the same layout
for lists of arrays held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_batch(
    texts: Sequence[np.ndarray],
    langs: Sequence[int],
    prompts: Sequence[np.ndarray],
    resps: Sequence[np.ndarray],
    text_cap: int | None = None,
    prompt_cap: int | None = None,
    resp_cap: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-pads each segment to the longest (or the given cap): the pipeline's batch layout."""
    b = len(texts)
    q_p = prompts[0].shape[1]
    q_r = max((r.shape[1] for r in resps), default=q_p)
    tc = text_cap or max(len(t) for t in texts)
    pc = prompt_cap or max(len(p) for p in prompts)
    rc = resp_cap or max(1, max(len(r) for r in resps))
    out = {
        "text": np.zeros((b, tc), np.int32),
        "text_len": np.zeros(b, np.int32),
        "lang": np.asarray(langs, np.int32),
        "prompt": np.zeros((b, pc, q_p), np.int16),
        "prompt_len": np.zeros(b, np.int32),
        "resp": np.zeros((b, rc, q_r), np.int16),
        "resp_len": np.zeros(b, np.int32),
    }
    for i, (t, p, r) in enumerate(zip(texts, prompts, resps)):
        out["text"][i, : len(t)] = t
        out["text_len"][i] = len(t)
        out["prompt"][i, : len(p)] = p
        out["prompt_len"][i] = len(p)
        out["resp"][i, : len(r), : r.shape[1]] = r
        out["resp_len"][i] = len(r)
    return out
