"""Embedding injection (reference.md §7.8): take the code/text/language embedding tables of another model
and freeze them. The reference keeps keys matching `_emb\\.` (text, prompt, response, language
tables and, in version 4, the per-level weights that live under them), never `sep` or the classifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from valle_jax.checkpointing import load_model, params_of
from valle_jax.config import ConfigError, ModelConfig
from valle_jax.models.convert import from_reference, infer_config, read_source
from valle_jax.models.valle import abstract_model

INJECTED = ("text_emb", "lang_emb", "prom_emb", "resp_emb_ar", "resp_emb_nar", "prom_level_w", "resp_level_w")


def load_embeddings(source: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{parameter name: float32 array} from a valle_jax model dir or a reference .pth / .npz."""
    source = Path(source)
    if source.is_dir():
        model, src_cfg, _ = load_model(source)
        params = {k: np.asarray(v) for k, v in params_of(model).items() if k in INJECTED}
    elif source.is_file():
        state, _, _ = read_source(source)
        src_cfg = infer_config(state, heads=cfg.n_heads)
        params = {k: v for k, v in from_reference(state, src_cfg).items() if k in INJECTED}
    else:
        raise ConfigError(f"optim.embeddings: {source} is neither a model directory nor a checkpoint file")
    own = {
        k
        for k in INJECTED
        if k in ("text_emb", "lang_emb", "prom_emb", "resp_emb_ar", "resp_emb_nar") or cfg.version >= 4
    }
    params = {k: v for k, v in params.items() if k in own}
    shapes = {k: tuple(v.shape) for k, v in params_of(abstract_model(cfg)).items() if k in own}
    bad = {k: (tuple(params[k].shape), shapes[k]) for k in params if tuple(params[k].shape) != shapes[k]}
    if bad or not params:
        raise ConfigError(
            f"optim.embeddings {source}: tables do not fit this model (got, expected): {bad or 'none found'}"
        )
    return params
