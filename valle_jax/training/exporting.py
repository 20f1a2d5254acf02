"""Export from a running training (the `export` command, and on quit with train.export_on_quit):
the current parameters as a model directory WORKDIR/export that synthesis loads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from valle_jax.checkpointing import save_model
from valle_jax.config import ModelConfig
from valle_jax.runs import run_stats
from valle_jax.training.sharding import gather_to_host

log = logging.getLogger("valle_jax.train")


def export_params(
    params: dict,
    cfg: ModelConfig,
    symmap: Mapping,
    meta: Mapping,
    workdir: Path,
    primary: bool,
    langs: Mapping | None = None,
) -> Path | None:
    """Writes WORKDIR/export (replacing the last one); every process must call it, the primary writes."""
    params = gather_to_host(params)  # a collective across processes
    if not primary:
        return None
    out = save_model(workdir / "export", cfg, params, symmap, run_stats(meta), overwrite=True, langs=langs)
    log.info("exported step %d to %s", meta["step"], out)
    return out
