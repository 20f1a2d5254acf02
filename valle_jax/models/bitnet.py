"""A BitNet model on disk: its BitLinear weights packed, 2 bits a weight and one scale per matrix.

Export writes each BitLinear matrix of the backbone as {"bits": uint32 [layers, P, K, 2], "scale":
float32 [layers]} (valle_jax.ternary's panel layout, the one the decoder streams), in place of the
float32 latent weight: 16x fewer bytes. Loading turns them back into latent weights that quantise
to exactly the same ternary values and (to float32 rounding) the same scales
(ternary.latent_from_ternary), so a loaded model decodes what the exported one did; what it cannot
do is resume training (the latent weights' fine detail is gone: training checkpoints keep it).
The layers themselves (arch "bitnet", model.bitnet on the others) are valle_jax.models.backbones'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from valle_jax import ternary
from valle_jax.config import ModelConfig

PACKED_KEYS = ("bits", "scale")


def bitlinear_names(backbone) -> tuple[str, ...]:
    """The backbone's parameters that are BitLinear weights (its matmuls), in layer order."""
    if not backbone.cfg.bitlinear:
        return ()
    return tuple(k for k in backbone.layer_params if k in backbone.STEP_MATMULS)


def _matrix(w: np.ndarray, contracted: int) -> np.ndarray:
    """A stacked weight [layers, *contracted, *out] as [layers, K, N]."""
    return w.reshape(w.shape[0], math.prod(w.shape[1 : 1 + contracted]), -1)


def pack_params(backbone, params: Mapping) -> dict:
    """`params` with each BitLinear weight of `backbone` replaced by its packed form."""
    out = {**params, "backbone": dict(params["backbone"])}
    for name in bitlinear_names(backbone):
        w = jnp.asarray(params["backbone"][name], jnp.float32)
        t, scale = ternary.ternary_values(w, stacked=True)
        t_LKN = _matrix(t, backbone.STEP_MATMULS[name])
        bits = jax.vmap(ternary.pack)(t_LKN)
        out["backbone"][name] = {"bits": np.asarray(bits), "scale": np.asarray(scale)}
    return out


def packed_shapes(backbone, shapes: Mapping) -> dict:
    """The ShapeDtypeStructs of `pack_params`' output, from those of the parameters."""
    out = {**shapes, "backbone": dict(shapes["backbone"])}
    for name in bitlinear_names(backbone):
        shape = shapes["backbone"][name].shape
        layers, k = shape[0], math.prod(shape[1 : 1 + backbone.STEP_MATMULS[name]])
        n = math.prod(shape[1 + backbone.STEP_MATMULS[name] :])
        out["backbone"][name] = {
            "bits": jax.ShapeDtypeStruct((layers, ternary.panels(n), k, 2), jnp.uint32),
            "scale": jax.ShapeDtypeStruct((layers,), jnp.float32),
        }
    return out


def unpack_params(backbone, packed: Mapping) -> dict:
    """Latent float32 parameters from `pack_params`' output (shapes from `backbone`'s own)."""
    out = {**packed, "backbone": dict(packed["backbone"])}
    for name in bitlinear_names(backbone):
        entry = packed["backbone"][name]
        if not isinstance(entry, Mapping) or set(entry) != set(PACKED_KEYS):
            raise ValueError(f"backbone.{name}: expected a packed BitLinear weight {PACKED_KEYS}, got {type(entry)}")
        shape = getattr(backbone, name).shape
        n = math.prod(shape[1 + backbone.STEP_MATMULS[name] :])
        t = np.asarray(jax.vmap(lambda b, n=n: ternary.unpack(b, n))(jnp.asarray(entry["bits"])))
        out["backbone"][name] = ternary.latent_from_ternary(t, np.asarray(entry["scale"])).reshape(shape)
    return out


def is_packed(cfg: ModelConfig) -> bool:
    """Whether a model directory of `cfg` holds packed BitLinear weights (every BitNet model does)."""
    return cfg.bitlinear
