"""Flax NNX VALL-E: the reference's AR+NAR model on a transformer or llama backbone."""

from valle_jax.models.valle import (
    VALLE,
    draw_levels,
    init_model,
    jit_forward,
    jit_method,
    layout,
    loss_and_metrics,
    model_from_params,
    targets,
)

__all__ = [
    "VALLE",
    "draw_levels",
    "init_model",
    "jit_forward",
    "jit_method",
    "model_from_params",
    "layout",
    "loss_and_metrics",
    "targets",
]
