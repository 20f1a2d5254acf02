"""Model checkpoints on disk (the only module that imports orbax).

A model directory holds:
    config.json   {"format": "valle_jax.model", "version": 1, "model": ModelConfig fields, "stats": {...}}
    symmap.json   the phoneme symbol map the model was trained with
    params/       the parameters (orbax), nested exactly as nnx.state(VALLE(cfg), nnx.Param); a
                  BitNet's BitLinear weights packed, 2 bits a weight (valle_jax.models.bitnet)
or, instead of params/ (`fmt="safetensors"`, the Hugging Face convention for a model repository):
    model.safetensors   one tensor per parameter, named by its path with dots ("backbone.q")
It is written into a temp directory and renamed into place, so a killed save leaves no half model
(on an object store, gs:// or s3://, it is staged locally and uploaded with config.json last:
valle_jax/atomic.py). Any of these may be read from an object store.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from flax import nnx

from valle_jax.atomic import as_path, object_store, staged_dir
from valle_jax.config import ModelConfig
from valle_jax.data.languages import REFERENCE_LANGS
from valle_jax.models import bitnet
from valle_jax.models.valle import abstract_model, model_from_params

FORMAT, VERSION = "valle_jax.model", 1
SAFETENSORS = "model.safetensors"
MODEL_FORMATS = ("orbax", "safetensors")


class CheckpointError(ValueError):
    pass


def params_of(model) -> dict:
    """The model's parameters as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_params(cfg: ModelConfig, params: Mapping) -> None:
    """Raises CheckpointError unless `params` has exactly the structure and shapes of VALLE(cfg)."""
    own = params_of(abstract_model(cfg))
    own_flat = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(own)[0]}
    new_flat = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if own_flat != new_flat:
        missing, extra = sorted(set(own_flat) - set(new_flat)), sorted(set(new_flat) - set(own_flat))
        bad = sorted(k for k in set(own_flat) & set(new_flat) if own_flat[k] != new_flat[k])
        raise CheckpointError(
            f"parameters do not fit the model: missing {missing}, unexpected {extra}, "
            f"mis-shaped {[(k, new_flat[k], own_flat[k]) for k in bad]}"
        )


def model_with_params(cfg: ModelConfig, params: Mapping):
    """A VALLE(cfg) holding `params`, checked for structure and shapes."""
    check_params(cfg, params)
    return model_from_params(cfg, params)


def save_model(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: Mapping,
    symmap: Mapping[str, int],
    stats: Mapping | None = None,
    overwrite: bool = False,
    langs: Mapping[str, int] | None = None,
    fmt: str = "orbax",
) -> Path:
    """Writes a model directory; `fmt` "orbax" (params/) or "safetensors" (model.safetensors). `langs`:
    language code -> row of the model's language table (None: the reference's en=0, ja=1)."""
    if fmt not in MODEL_FORMATS:
        raise CheckpointError(f"model format must be one of {MODEL_FORMATS}, got {fmt!r}")
    out = as_path(directory)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if bitnet.is_packed(cfg):
        params = bitnet.pack_params(abstract_model(cfg).backbone, params)
    with staged_dir(out, "config.json") as tmp:
        if fmt == "safetensors":
            safetensors.numpy.save_file(flatten(params), tmp / SAFETENSORS, metadata={"format": FORMAT})
        else:
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(tmp / "params", jax.tree.map(np.asarray, dict(params)))
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "model": dataclasses.asdict(cfg),
                    "stats": dict(stats or {}),
                    "langs": dict(langs or REFERENCE_LANGS),
                },
                indent=1,
            )
        )
        (tmp / "symmap.json").write_text(json.dumps(dict(symmap), ensure_ascii=False))
    return out


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
    path = as_path(directory)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a valle_jax model directory (no config.json)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {meta.get('format')} v{meta.get('version')}, expected {FORMAT} v{VERSION}"
        )
    return ModelConfig(**meta["model"]), json.loads((path / "symmap.json").read_text("utf-8")), meta.get("stats", {})


def read_langs(directory: str | os.PathLike) -> dict[str, int]:
    """The language map of a model directory (those written before it had one: the reference's)."""
    meta = json.loads((as_path(directory) / "config.json").read_text())
    return dict(meta.get("langs") or REFERENCE_LANGS)


def flatten(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """{"backbone.q": array, ...}: a nested parameter dict as safetensors names it (contiguous float32)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = np.ascontiguousarray(np.asarray(v))
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """The inverse of `flatten`."""
    out: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def read_params(directory: str | os.PathLike, cfg: ModelConfig) -> dict:
    """The parameters of a model directory (either format), checked against `cfg`; a BitNet's packed
    weights unpacked to the latents the model holds."""
    path = as_path(directory)
    abstract = abstract_model(cfg)
    packed = bitnet.is_packed(cfg)
    if (path / SAFETENSORS).is_file():
        try:
            params = unflatten(_load_safetensors(path / SAFETENSORS))
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            raise CheckpointError(f"{path / SAFETENSORS}: not a readable safetensors file ({e})") from e
        params = bitnet.unpack_params(abstract.backbone, params) if packed else params
        check_params(cfg, params)
        return params
    if not (path / "params").is_dir():
        raise CheckpointError(f"{path}: neither params/ nor {SAFETENSORS} holds the parameters")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_of(abstract))
    if packed:
        target = bitnet.packed_shapes(abstract.backbone, target)
    # restoring into `target` already checks the structure and shapes against the config
    params = ocp.StandardCheckpointer().restore(path / "params", target)
    return bitnet.unpack_params(abstract.backbone, params) if packed else params


def _load_safetensors(path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors: memory-mapped from a local file, read whole from an object store."""
    if object_store(path):
        return safetensors.numpy.load(path.read_bytes())
    return safetensors.numpy.load_file(path)


def load_model(directory: str | os.PathLike, **overrides):
    """(model, config, symmap) from a model directory; `overrides` change runtime fields (dtype, ...)."""
    cfg, symmap, _ = read_config(directory)
    cfg = dataclasses.replace(cfg, **overrides)
    return model_from_params(cfg, read_params(directory, cfg)), cfg, symmap
