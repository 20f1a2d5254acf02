"""Flax NNX VALL-E: the reference's AR+NAR model on a transformer or llama backbone."""
from valle_jax.models.valle import VALLE, draw_levels, layout, loss_and_metrics, targets

__all__ = ["VALLE", "draw_levels", "layout", "loss_and_metrics", "targets"]
