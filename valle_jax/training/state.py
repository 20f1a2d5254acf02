"""The training state on the mesh: where each part lives, a fresh state, and injected embeddings.

State is a plain pytree (see valle_jax.training.step):
    {"params": nested dict, "opt_state": optax state, "step": int32, "rng": uint32[2] key data}
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from valle_jax.config import ModelConfig
from valle_jax.training import sharding
from valle_jax.training.checkpoint import abstract_like
from valle_jax.training.step import DEVICE_KEYS, init_params

log = logging.getLogger("valle_jax.train")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the training state and the batches live on the mesh."""

    mesh: Mesh
    params: dict  # the parameters' NamedShardings, nested as the parameters
    state: dict  # the whole state's: {"params", "opt_state", "step", "rng"}
    batch: NamedSharding  # every batch array: rows over the data-parallel axes
    replicated: NamedSharding  # scalars, keys, metrics

    @property
    def batch_arrays(self) -> dict:
        """The sharding of each array a step takes from a batch."""
        return {k: self.batch for k in DEVICE_KEYS}

    def global_batch(self, local: dict) -> dict:
        """This process's rows of a batch, as global arrays over the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(local[k])) for k in DEVICE_KEYS}


def make_layout(mesh: Mesh, mesh_cfg, abstract_model, abstract_params: dict, abstract_opt) -> Layout:
    params = sharding.param_shardings(abstract_model, mesh, mesh_cfg)
    replicated = NamedSharding(mesh, P())
    state = {
        "params": params,
        "opt_state": sharding.mirror_shardings(abstract_opt, abstract_params, params, mesh),
        "step": replicated,
        "rng": replicated,
    }
    return Layout(mesh, params, state, sharding.batch_sharding(mesh, mesh_cfg), replicated)


def fresh_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, layout: Layout) -> dict:
    """Step 0, created directly in its shards (one compiled initialiser, nothing on the host)."""

    def init():
        params = init_params(cfg, seed)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    return jax.jit(init, out_shardings=layout.state)()


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, layout: Layout) -> dict:
    """Shapes, dtypes and shardings of the state: what a checkpoint is restored into."""
    return abstract_like(jax.eval_shape(lambda: fresh_state(cfg, tx, seed, layout)), layout.state)


def inject(state: dict, injected: dict, layout: Layout, source: str) -> dict:
    """`state` with the injected (frozen) embedding tables in place of its own."""
    if not injected:
        return state
    params = dict(state["params"])
    for k, v in injected.items():
        params[k] = jax.device_put(v, layout.params[k])
    log.info("injected and froze %s from %s", sorted(injected), source)
    return {**state, "params": params}
