"""The random training batch the training benchmarks time a step on (train_step.py, moe_vs_dense.py,
lora_vs_full.py): one place, so that their step times are over the same data for the same shapes."""

from __future__ import annotations

import numpy as np


def random_batch(batch: int, t_len: int, p_len: int, r_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`batch` full rows of t_len phonemes, a p_len-frame prompt and an r_len-frame response (8 codebooks),
    in the layout valle_jax.data's loader yields: every row valid, no padding."""
    rng = np.random.default_rng(seed)
    return {
        "text": rng.integers(3, 200, (batch, t_len)).astype(np.int32),
        "text_len": np.full(batch, t_len, np.int32),
        "lang": np.zeros(batch, np.int32),
        "prompt": rng.integers(0, 1024, (batch, p_len, 8)).astype(np.int16),
        "prompt_len": np.full(batch, p_len, np.int32),
        "resp": rng.integers(0, 1024, (batch, r_len, 8)).astype(np.int16),
        "resp_len": np.full(batch, r_len, np.int32),
        "row_valid": np.ones(batch, bool),
    }
