"""The training state of a LoRA run: the adapters train, the base model rides along frozen.

    {"params": adapters, "opt_state": optimizer state of the adapters only, "step", "rng",
     "base": the base model's parameters (never updated, never checkpointed)}

Checkpoints save the state's named items (training.checkpoint.ITEMS), so they hold the adapters
and their optimizer state; the base is referenced by the run (run.json's train.init_from) and is
loaded again on resume. Adapters get their shardings from their matrices' logical axes
(models.lora.adapter_axes), so on a sharded mesh they are split like the matrices they adapt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from valle_jax.models import lora as LR
from valle_jax.training import sharding
from valle_jax.training.checkpoint import abstract_like
from valle_jax.training.state import Layout


def adapter_shardings(targets: list[LR.Target], abstract_adapters: dict, mesh, mesh_cfg) -> dict:
    rules = dict(mesh_cfg.rules)
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, sharding.spec_for(tuple(x.shape), tuple(axes), rules, mesh)),
        abstract_adapters,
        LR.adapter_axes(targets),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_layout(mesh, mesh_cfg, abstract_model, targets, abstract_adapters, abstract_opt) -> Layout:
    """Layout.params stays the full model's shardings (the base, evaluation, export); the state's
    "params" are the adapters'."""
    base = sharding.param_shardings(abstract_model, mesh, mesh_cfg)
    adapters = adapter_shardings(targets, abstract_adapters, mesh, mesh_cfg)
    replicated = NamedSharding(mesh, P())
    state = {
        "params": adapters,
        "opt_state": sharding.mirror_shardings(abstract_opt, abstract_adapters, adapters, mesh),
        "step": replicated,
        "rng": replicated,
        "base": base,
    }
    return Layout(mesh, base, state, sharding.batch_sharding(mesh, mesh_cfg), replicated)


def merge_fn(targets: list[LR.Target], cfg: LR.LoraConfig):
    """merge(base, adapters, key) for the train step: the base with its targets as LoraWeights (the
    adapters applied beside them, in activation space; dropout seeds from `key`)."""
    return lambda base, adapters, key: LR.wrap(base, adapters, targets, cfg, key)


def initial_state(base: dict, targets, cfg: LR.LoraConfig, tx, seed: int, layout: Layout) -> dict:
    """Step 0: fresh adapters (B = 0) and their optimizer state, beside the base on the mesh."""
    on_mesh = jax.device_put(base, layout.params)

    def init(base):
        adapters = LR.init_adapters(targets, cfg, seed)
        return {
            "params": adapters,
            "opt_state": tx.init(adapters),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
            "base": base,
        }

    return jax.jit(init, out_shardings=layout.state)(on_mesh)


def abstract_state(base_abstract: dict, targets, cfg: LR.LoraConfig, tx, seed: int, layout: Layout) -> dict:
    """What a LoRA checkpoint restores into (the "base" entry is not restored)."""
    shapes = jax.eval_shape(
        lambda b: {
            "params": (a := LR.init_adapters(targets, cfg, seed)),
            "opt_state": tx.init(a),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
            "base": b,
        },
        base_abstract,
    )
    return abstract_like(shapes, layout.state)


def merger(targets, cfg: LR.LoraConfig, layout: Layout):
    """state -> the base with the adapters merged in (no dropout), on the base's shardings: what
    evaluation and export use. Jitted once per trainer."""
    fn = jax.jit(lambda base, adapters: LR.merge(base, adapters, targets, cfg), out_shardings=layout.params)
    return lambda state: fn(state["base"], state["params"])
