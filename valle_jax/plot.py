"""Plots a training run's metrics (WORKDIR/metrics.jsonl) against steps or tokens.

    python -m valle_jax.plot --workdir DIR [--xs step|tokens] [--ys loss,acc,...] [--smooth 10] --out FILE.png

Short names: loss, acc, grad_norm, lr, val_loss, val_acc, loss_level0..7, tokens_per_s, mfu; any
full name in metrics.jsonl (train/loss, perf/step_time_s, ...) works too. Each curve is drawn raw
(faint) and smoothed with an exponentially weighted mean (com = --smooth, as the reference's plot).
After a resume, the latest value logged for a step wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from valle_jax import appending
from valle_jax.atomic import as_path, atomic_path

ALIASES = {
    "loss": "train/loss",
    "acc": "train/acc_top10",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "val_loss": "val/loss",
    "val_acc": "val/acc_top10",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "step_time": "perf/step_time_s",
    **{f"loss_level{i}": f"train/loss_level{i}" for i in range(8)},
}
XS = {"step": "step", "tokens": "stats/tokens_processed"}


def read_metrics(workdir: Path) -> dict[str, dict[int, float]]:
    """{metric name: {step: value}} (later lines override earlier ones for the same step)."""
    path = as_path(workdir) / "metrics.jsonl"
    if not appending.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training directory that has logged?")
    out: dict[str, dict[int, float]] = {}
    for line in appending.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        step = int(row.pop("step"))
        for k, v in row.items():
            if isinstance(v, (int, float)):
                out.setdefault(k, {})[step] = float(v)
    return out


def ewm(values: list[float], com: float) -> list[float]:
    if com <= 0:
        return list(values)
    alpha, out, acc = 1.0 / (1.0 + com), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot(
    workdir: Path, out: Path, xs: str = "step", ys: tuple[str, ...] = ("loss", "acc"), smooth: float = 10.0
) -> Path:
    import matplotlib  # noqa: PLC0415 - optional heavy dependency: matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional heavy dependency: matplotlib

    metrics = read_metrics(workdir)
    names = [ALIASES.get(y, y) for y in ys]
    missing = [y for y, n in zip(ys, names) if n not in metrics]
    if missing:
        raise KeyError(f"no metric {missing} in {workdir}/metrics.jsonl; it has {sorted(metrics)}")
    x_of = (lambda s: s) if xs == "step" else (lambda s: metrics[XS[xs]].get(s))
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = sorted((x_of(s), v) for s, v in metrics[name].items() if x_of(s) is not None)
        x, y = [p[0] for p in points], [p[1] for p in points]
        ax.plot(x, y, alpha=0.3, color="C0")
        ax.plot(x, ewm(y, smooth), color="C0")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(XS[xs])
    fig.suptitle(str(workdir))
    fig.tight_layout()
    with atomic_path(out, suffix=out.suffix or ".png") as tmp:
        fig.savefig(tmp, dpi=100, format=(out.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m valle_jax.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training directory (local, or gs://..., s3://...)")
    p.add_argument("--xs", choices=sorted(XS), default="step")
    p.add_argument("--ys", default="loss,acc", help="comma-separated metric names")
    p.add_argument("--smooth", type=float, default=10.0, help="EWM centre of mass (0 = raw only)")
    p.add_argument("--out", type=Path, required=True, help="image file (.png, .svg, .pdf)")
    args = p.parse_args(argv)
    try:
        out = plot(args.workdir, args.out, args.xs, tuple(y for y in args.ys.split(",") if y), args.smooth)
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
