"""The jitted train and eval steps over a layout, and the train step compiled once per batch shape.

Compiling ahead of time (`.lower().compile()`) for each of the pipeline's bucket shapes makes the
compile time visible in the log instead of hiding it in the first step of each shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh

from valle_jax.config import ModelConfig
from valle_jax.training.state import Layout
from valle_jax.training.step import DEVICE_KEYS, make_eval_step, make_train_step

log = logging.getLogger("valle_jax.train")


class OnMesh:
    """A jitted step traced and run with its mesh as JAX's current mesh (`jax.set_mesh`): an MoE layer
    reads the expert axis from it (valle_jax.models.moe), so the model needs no mesh of its own."""

    def __init__(self, jitted: Callable, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def jit_train_step(graph, cfg: ModelConfig, tx: optax.GradientTransformation, level_probs, layout: Layout, merge=None):
    """step(state, batch, lr_scale) -> (state, metrics); the state's buffers are donated."""
    jitted = jax.jit(
        make_train_step(graph, cfg, tx, level_probs, merge),
        in_shardings=(layout.state, layout.batch_arrays, layout.replicated),
        out_shardings=(layout.state, layout.replicated),
        donate_argnums=(0,),
    )
    return OnMesh(jitted, layout.mesh)


def jit_eval_step(graph, cfg: ModelConfig, level_probs, layout: Layout):
    """eval_step(params, batch, key) -> summed metrics, replicated."""
    jitted = jax.jit(
        make_eval_step(graph, cfg, level_probs),
        in_shardings=(layout.params, layout.batch_arrays, layout.replicated),
        out_shardings=layout.replicated,
    )
    return OnMesh(jitted, layout.mesh)


class CompiledSteps:
    """The train step, compiled on first sight of each batch shape."""

    def __init__(self, jitted: Callable):
        self.jitted = jitted
        self.by_shape: dict[tuple, Callable] = {}

    def __call__(self, state: dict, batch: dict, lr_scale):
        key = tuple((k, batch[k].shape) for k in DEVICE_KEYS)
        if key not in self.by_shape:
            t0 = time.perf_counter()
            self.by_shape[key] = self.jitted.lower(state, batch, lr_scale).compile()
            log.info(
                "compiled the train step for text %d, prompt %d, response %d frames in %.1f s (%d shapes so far)",
                batch["text"].shape[1],
                batch["prompt"].shape[1],
                batch["resp"].shape[1],
                time.perf_counter() - t0,
                len(self.by_shape),
            )
        return self.by_shape[key](state, batch, lr_scale)
