"""Exports a training run's parameters (no optimizer state) for synthesis or for the reference.

    python -m valle_jax.export --workdir DIR --out OUT [--step N] [--format auto|valle_jax|safetensors|reference]
        [--merge-lora] [--overwrite] [--push-to-hub OWNER/REPO [--private]]

A LoRA run (model.lora) exports its adapter directory (valle_jax.adapters: synthesis applies it to
the base with --lora), or with --merge-lora the base model with the adapters merged in.
OUT is a valle_jax model directory (config.json, symmap.json, params/: what synthesis loads; with
--format safetensors, model.safetensors instead of params/, the Hugging Face layout), or, with
--format reference or an OUT ending in .pth, the reference's `fp32.pth` layout
{"module": state dict, "stats": {...}, "userdata": {"symmap": ...}} for going back to PyTorch.
Both are written to a temp path and renamed, so a killed export leaves nothing half-written. DIR and
OUT may be gs://, s3://... paths (docs/cloud.md).
--push-to-hub uploads the model directory to a Hugging Face repository (created if missing;
--private makes a new one private); the token is huggingface_hub's (HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from valle_jax import adapters, hub
from valle_jax.atomic import as_path, atomic_path, is_uri
from valle_jax.checkpointing import save_model
from valle_jax.config import ModelConfig
from valle_jax.extras import require_torch
from valle_jax.models.convert import to_reference
from valle_jax.runs import load_params
from valle_jax.sources import load_weights

log = logging.getLogger(__name__)


def write_reference(
    out: Path, params: Mapping, cfg: ModelConfig, symmap: Mapping, stats: Mapping, overwrite: bool = False
) -> Path:
    torch = require_torch(f"writing {out.name} (a PyTorch state dict)")

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    state = {
        k: torch.from_numpy(np.array(v, np.float32)) for k, v in to_reference(params, cfg, with_unused=True).items()
    }
    payload = {
        "module": state,
        "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
        "userdata": {"symmap": dict(symmap)},
    }
    with atomic_path(out, suffix=".pth") as tmp:
        torch.save(payload, tmp)
    return out


def export(
    params: Mapping,
    cfg: ModelConfig,
    symmap: Mapping,
    stats: Mapping,
    out: str | Path,
    fmt: str = "auto",
    overwrite: bool = False,
    langs: Mapping | None = None,
) -> Path:
    """`langs`: the model's language map (a model directory keeps it; the reference's .pth has no
    place for one, its readers assume en=0, ja=1)."""
    out = as_path(out)
    if fmt == "auto":
        fmt = "reference" if out.suffix == ".pth" else "valle_jax"
    if fmt == "reference" and cfg.arch == "bitnet":
        raise ValueError(
            "arch bitnet has no reference layout to export to: the reference built it from the unpinned "
            "`bitnet` package (docs/deviations.md); export to a valle_jax model directory instead"
        )
    params = _to_numpy(params)
    if fmt == "reference":
        return write_reference(out, params, cfg, symmap, stats, overwrite)
    model_fmt = "safetensors" if fmt == "safetensors" else "orbax"
    return save_model(out, cfg, params, symmap, stats, overwrite=overwrite, langs=langs, fmt=model_fmt)


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def export_run(
    workdir: str | Path,
    out: str | Path,
    step: int | None = None,
    fmt: str = "auto",
    overwrite: bool = False,
    merge_lora: bool = False,
) -> tuple[Path, int]:
    """Exports checkpoint `step` (default: the latest complete one) of a training workdir. A LoRA
    run exports its adapter directory, or with `merge_lora` the base with the adapters merged in."""
    if adapters.run_lora(workdir).enabled:
        adapter, base, step = adapters.load_run(workdir, step, lambda path, s: load_weights(path, s))
        if not merge_lora:
            if fmt not in ("auto", "valle_jax"):
                raise ValueError(f"a LoRA run exports an adapter directory; pass --merge-lora for a {fmt} model")
            return adapters.save(out, adapter, overwrite), step
        params = adapters.merged(base.params, adapter, base.model)
        return export(params, base.model, base.symmap, adapter.stats, out, fmt, overwrite), step
    if merge_lora:
        raise ValueError(f"{workdir} is not a LoRA run (model.lora.rank is 0): --merge-lora has nothing to merge")
    run = load_params(workdir, step)
    return export(run.params, run.model, run.symmap, run.stats, out, fmt, overwrite, run.langs), run.step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m valle_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training directory (python -m valle_jax.train)")
    p.add_argument("--out", required=True, help="model directory, or FILE.pth for the reference layout")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--format", choices=("auto", "valle_jax", "safetensors", "reference"), default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--merge-lora", action="store_true", help="a LoRA run: write the base with the adapters merged in")
    p.add_argument("--push-to-hub", metavar="OWNER/REPO", default=None, help="upload the model directory")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.private and not args.push_to_hub:
        print("error: --private needs --push-to-hub", file=sys.stderr)
        return 2
    if args.push_to_hub and is_uri(args.out):  # huggingface_hub uploads a local folder
        print("error: --push-to-hub needs a local --out", file=sys.stderr)
        return 2
    try:
        out, step = export_run(args.workdir, args.out, args.step, args.format, args.overwrite, args.merge_lora)
        print(f"exported step {step} of {args.workdir} to {out}")
        if args.push_to_hub:
            url = hub.push(out, args.push_to_hub, private=args.private)
            print(f"pushed {out} to {args.push_to_hub}: {url}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # HubError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
