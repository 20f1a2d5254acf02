"""Any checkpoint path -> parameters, config and phoneme map: the one reader that synthesis
(`tts.load_any`), `train.init_from` and the tools share.

Kinds, tried in this order:
    hf://OWNER/REPO[/PATH][@REV]   resolved through the hub cache (valle_jax.hub), then as below
    a model directory               config.json + params/ or model.safetensors (export, convert_reference)
    a training workdir              run.json + checkpoints/ (the newest good step, or `step`)
(model directories and workdirs may be on an object store: gs://BUCKET/..., s3://...; docs/cloud.md)
    a reference file                fp32.pth / state-dict .pth / .npz / .safetensors with the reference's keys
A reference file found on the hub is converted once into a model directory kept beside the hub
cache (hub.conversion_dir), so later loads skip the conversion.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from valle_jax import adapters, hub, runs
from valle_jax.atomic import as_path
from valle_jax.checkpointing import CheckpointError, read_config, read_params, save_model
from valle_jax.config import ModelConfig
from valle_jax.data.text import reference_symmap
from valle_jax.models.convert import ConversionError, from_reference, infer_config, read_source
from valle_jax.vocab import Vocab, grow

log = logging.getLogger(__name__)

REFERENCE_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Weights:
    """A checkpoint's parameters with what is needed to use them."""

    params: dict  # nested dict of arrays, as nnx.state(VALLE(model), nnx.Param)
    model: ModelConfig
    symmap: dict  # phoneme -> text id
    origin: str  # what was read, for logs ("step 200 of the run DIR", "model directory DIR", ...)
    step: int | None = None  # the training step, when the source knows it


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_weights(path: str | os.PathLike, step: int | None = None, heads: int | None = None) -> Weights:
    """The parameters of any checkpoint path (see the module docstring); `step` picks a training
    workdir's checkpoint, `heads` the head count of a reference file whose width is not a preset."""
    local = hub.resolve(path)
    if hub.is_hub_path(path):
        local = _cached_conversion(local, heads) or local
    if not local.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if is_model_dir(local):
        cfg, symmap, stats = read_config(local)
        return Weights(read_params(local, cfg), cfg, symmap, f"model directory {path}", stats.get("step"))
    if runs.is_run(local) and adapters.run_lora(local).enabled:  # a LoRA run: its adapters merged into its base
        adapter, base, step = adapters.load_run(local, step, lambda p, s: load_weights(p, s, heads))
        params = adapters.merged(base.params, adapter, base.model)
        return Weights(
            params, base.model, base.symmap, f"LoRA step {step} of the run {path} on the {base.origin}", step
        )
    if runs.is_run(local):
        run = runs.load_params(local, step)
        return Weights(run.params, run.model, run.symmap, f"step {run.step} of the training run {path}", run.step)
    if local.is_file() and local.suffix in REFERENCE_SUFFIXES:
        state, symmap, stats = read_source(local)
        cfg = infer_config(state, heads)
        return Weights(
            from_reference(state, cfg), cfg, symmap or reference_symmap(), f"reference checkpoint {path}", None
        )
    raise CheckpointError(
        f"{path}: not a model directory (config.json), a training directory ({runs.RUN_FILE}) or a "
        f"reference checkpoint ({' / '.join(REFERENCE_SUFFIXES)})"
    )


def with_adapter(weights: Weights, adapter_dir: str | os.PathLike) -> Weights:
    """`weights` with a LoRA adapter directory merged in (its vocabularies grown as the adapter's run grew them)."""
    adapter = adapters.load(hub.resolve(adapter_dir))
    n_langs = adapter.model.n_langs
    vocab = Vocab(adapter.symmap, tuple(s for s in adapter.symmap if s not in weights.symmap), None, n_langs)
    model = dataclasses.replace(weights.model, n_langs=max(n_langs, weights.model.n_langs))
    adapters.check_fits(adapter, model)
    params = grow(as_numpy(weights.params), weights.symmap, vocab, model.n_langs)
    params = adapters.merged(params, adapter, model)
    return Weights(params, model, dict(adapter.symmap), f"{weights.origin} with the LoRA adapter {adapter_dir}", None)


def _cached_conversion(local: Path, heads: int | None) -> Path | None:
    """For a hub path holding a reference checkpoint (the file, or a repository whose only model
    file it is): the converted model directory, made on first use."""
    if local.is_dir() and not is_model_dir(local) and not runs.is_run(local):
        files = [p for p in sorted(local.iterdir()) if p.suffix in REFERENCE_SUFFIXES]
        if len(files) != 1:
            return None
        local = files[0]
    if not (local.is_file() and local.suffix in REFERENCE_SUFFIXES):
        return None
    out = hub.conversion_dir(local)
    if not is_model_dir(out):
        state, symmap, stats = read_source(local)
        cfg = infer_config(state, heads)
        params = from_reference(state, cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(out, cfg, params, symmap or reference_symmap(), stats, overwrite=True)
        log.info("converted %s into %s (kept for later loads)", local, out)
    return out


def exists(path: str | os.PathLike) -> bool:
    """Whether a checkpoint path can be tried at all (hub paths are not looked up here)."""
    return hub.is_hub_path(path) or as_path(path).exists()


def as_numpy(params) -> dict:
    return {k: as_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in params.items()}


__all__ = ["Weights", "load_weights", "exists", "ConversionError", "CheckpointError"]
