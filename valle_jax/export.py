"""Exports a training run's parameters (no optimizer state) for synthesis or for the reference.

    python -m valle_jax.export --workdir DIR --out OUT [--step N] [--format auto|valle_jax|reference] [--overwrite]

OUT is a valle_jax model directory (config.json, symmap.json, params/: what synthesis loads), or,
with --format reference or an OUT ending in .pth, the reference's `fp32.pth` layout
{"module": state dict, "stats": {...}, "userdata": {"symmap": ...}} for going back to PyTorch.
Both are written to a temp path and renamed, so a killed export leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from valle_jax.atomic import atomic_path
from valle_jax.config import ModelConfig

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # written by training into its workdir: model config, symmap, full config


def read_run(workdir: Path) -> tuple[ModelConfig, dict, dict]:
    """(model config, symmap, full config dict) a training run recorded in its workdir."""
    path = Path(workdir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a valle_jax training directory (no {RUN_FILE})")
    run = json.loads(path.read_text("utf-8"))
    return ModelConfig(**run["model"]), run["symmap"], run["config"]


def write_reference(
    out: Path, params: Mapping, cfg: ModelConfig, symmap: Mapping, stats: Mapping, overwrite: bool = False
) -> Path:
    import torch

    from valle_jax.models.convert import to_reference

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in to_reference(params, cfg).items()}
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
) -> Path:
    from valle_jax.checkpointing import save_model

    out = Path(out)
    if fmt == "auto":
        fmt = "reference" if out.suffix == ".pth" else "valle_jax"
    params = _to_numpy(params)
    if fmt == "reference":
        return write_reference(out, params, cfg, symmap, stats, overwrite)
    return save_model(out, cfg, params, symmap, stats, overwrite=overwrite)


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def run_params(workdir: str | Path, step: int | None = None) -> tuple[dict, ModelConfig, dict, dict, int]:
    """(params, model config, symmap, stats, step) of checkpoint `step` (default: the latest
    complete one) of a training workdir, on the first device."""
    import jax

    from valle_jax.checkpointing import params_of
    from valle_jax.training.checkpoint import Checkpoints
    from valle_jax.training.step import abstract_model

    workdir = Path(workdir)
    cfg, symmap, _ = read_run(workdir)
    ckpts = Checkpoints(workdir / "checkpoints", async_save=False)
    try:
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
            ),
            params_of(abstract_model(cfg)),
        )
        params, meta, step = ckpts.restore_params(step, target)
    finally:
        ckpts.close()
    return params, cfg, symmap, run_stats(meta), step


def export_run(
    workdir: str | Path, out: str | Path, step: int | None = None, fmt: str = "auto", overwrite: bool = False
) -> tuple[Path, int]:
    """Exports checkpoint `step` (default: the latest complete one) of a training workdir."""
    params, cfg, symmap, stats, step = run_params(workdir, step)
    return export(params, cfg, symmap, stats, out, fmt, overwrite), step


def run_stats(meta: Mapping) -> dict:
    """Training statistics for an export, under our names and the reference's (SPEC §7.8)."""
    stats = dict(meta.get("stats", {}))
    stats.update(
        step=meta["step"],
        global_step=meta["step"],
        micro_step=meta.get("micro_step", meta["step"]),
        global_samples=stats.get("samples", 0),
    )
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m valle_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="the training directory (python -m valle_jax.train)")
    p.add_argument("--out", type=Path, required=True, help="model directory, or FILE.pth for the reference layout")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--format", choices=("auto", "valle_jax", "reference"), default="auto")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        out, step = export_run(args.workdir, args.out, args.step, args.format, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
