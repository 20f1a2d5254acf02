"""Device mesh and shardings: logical axis names (on every parameter) -> mesh axes, by rules.

Parameters carry `logical_axes` metadata (valle_jax.models.layers.param). The rules map each
logical name to zero or more mesh axes; a dimension that the mesh axes' size does not divide stays
replicated (the vocabulary of 1025 classes, a single language row), and a mesh axis is used at most
once per array. Optimizer state leaves that mirror a parameter get that parameter's sharding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from valle_jax.config import EXPERT_AXIS, MESH_AXES, ConfigError, MeshConfig, ModelConfig

BATCH = "batch"
DATA_PARALLEL = ("data", "fsdp", "expert")  # the batch's axes when the rules do not say


def resolve_shape(shape: tuple[int, ...], n_devices: int) -> tuple[int, ...]:
    """Replaces the one -1 by whatever makes the product equal to the device count."""
    known = math.prod(x for x in shape if x != -1)
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh.shape {shape}: {n_devices} devices are not divisible by {known}")
        shape = tuple(n_devices // known if x == -1 else x for x in shape)
    if math.prod(shape) != n_devices:
        raise ConfigError(f"mesh.shape {shape} needs {math.prod(shape)} devices, there are {n_devices}")
    return shape


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_shape(cfg.shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def spec_for(
    shape: tuple[int, ...], logical: tuple[str | None, ...], rules: dict[str, tuple[str, ...]], mesh: Mesh
) -> P:
    used: set[str] = set()
    out = []
    for size, name in zip(shape, logical):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes if len(axes) > 1 else axes[0])
        else:
            out.append(None)
    return P(*out)


def param_shardings(abstract_model: nnx.Module, mesh: Mesh, cfg: MeshConfig) -> dict:
    """Nested dict (the structure of `params_of(model)`) of NamedShardings from the rules."""
    rules = dict(cfg.rules)
    state = nnx.state(abstract_model, nnx.Param)

    def one(v: nnx.Variable):
        logical = v.get_metadata().get("logical_axes") or (None,) * len(v.shape)
        return NamedSharding(mesh, spec_for(tuple(v.shape), tuple(logical), rules, mesh))

    return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_sharding(mesh: Mesh, cfg: MeshConfig) -> NamedSharding:
    """Leading (batch) dimension over the rules' data-parallel axes."""
    axes = tuple(a for a in dict(cfg.rules).get(BATCH, DATA_PARALLEL))
    return NamedSharding(mesh, P(axes if axes else None))


def data_parallel_size(mesh: Mesh, cfg: MeshConfig) -> int:
    return math.prod(mesh.shape[a] for a in dict(cfg.rules).get(BATCH, DATA_PARALLEL))


def check_expert_axis(mesh: Mesh, cfg: ModelConfig) -> None:
    """An MoE's experts must split evenly over the expert axis (each device holds E / axis of them);
    without experts the axis is one more data-parallel axis."""
    n = mesh.shape[EXPERT_AXIS]
    if n > 1 and cfg.moe and cfg.n_experts % n:
        raise ConfigError(f"model.experts={cfg.n_experts} is not divisible by the mesh's {n}-device {EXPERT_AXIS} axis")


def mirror_shardings(tree: Any, params: dict, param_sh: dict, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and that
    has the parameter's shape gets its sharding; everything else (counts, scalars) is replicated."""
    by_path = {
        tuple(str(getattr(k, "key", k)) for k in path): (np.shape(v), s)
        for (path, v), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh))
    }
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def describe(shardings: dict) -> list[str]:
    """One line per parameter: path and partition spec (for logs and tests)."""
    return [f"{jax.tree_util.keystr(p)}: {s.spec}" for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]]


def gather_to_host(tree: Any) -> Any:
    """`tree`'s arrays, whole, as numpy on every process (a collective when there are several)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
