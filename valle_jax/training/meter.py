"""Training metrics from the device to the log: fetched one step late, summed between log lines.

A step's metrics are fetched after the next step has been dispatched, so the host never waits on
the device just to log. Each log line covers the steps since the previous one (an interval):
token-weighted losses, throughput, MFU and the ETA.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax

from valle_jax.config import DataConfig, ModelConfig
from valle_jax.training import monitor
from valle_jax.training.step import train_flops

log = logging.getLogger("valle_jax.train")


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class Interval:
    """What is measured between two log lines besides the metrics themselves."""

    started: float  # time.perf_counter() at its start
    flops: float = 0.0  # model FLOPs dispatched
    steps: int = 0  # optimizer steps taken


@dataclasses.dataclass
class Pending:
    """The last dispatched step's metrics, still on the device."""

    step: int
    metrics: dict


def new_stats() -> dict:
    """Run totals saved with each checkpoint (meta["stats"]) and carried across restarts."""
    return {"samples": 0, "tokens_processed": 0, "positions": 0, "train_seconds": 0.0}


class Meter:
    def __init__(
        self,
        writer: monitor.MetricsWriter,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        train_cfg,
        peak_flops: float,
        lr_at: Callable[[int], float],
        primary: bool,
    ):
        self.writer, self.model_cfg, self.data_cfg, self.train_cfg = writer, model_cfg, data_cfg, train_cfg
        self.peak_flops, self.lr_at, self.primary = peak_flops, lr_at, primary
        self.stats = new_stats()
        self.averager = monitor.Averager()
        self.pending: Pending | None = None
        self.interval = Interval(time.perf_counter())

    def restart_clock(self) -> None:
        """The first interval starts with the loop, after restoring and setting up."""
        self.interval = Interval(time.perf_counter())

    def dispatched(self, step: int, metrics: dict, seq: int) -> None:
        """A micro-step of optimizer step `step` was dispatched; the one before it is fetched now."""
        self.interval.flops += train_flops(self.model_cfg, self.data_cfg.batch_size, seq)
        self.flush()
        self.pending = Pending(step, metrics)

    def step_done(self) -> None:
        self.interval.steps += 1

    def flush(self) -> None:
        """Fetches and adds the pending metrics (before a log line or a checkpoint's stats)."""
        if self.pending is not None:
            self._consume(self.pending)
            self.pending = None

    def _consume(self, pending: Pending) -> None:
        m = jax.device_get(pending.metrics)
        if not bool(m["finite"]):
            if self.train_cfg.nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss {float(m['loss'])} or gradient norm {float(m['grad_norm'])} "
                    f"at step {pending.step} (the update was not applied)"
                )
            log.warning("step %d: non-finite loss or gradient; update skipped", pending.step)
        m["nll_per_level"] = m["loss_per_level"] * m["tokens_per_level"]
        self.averager.add(m)
        self.stats["samples"] += self.data_cfg.batch_size
        self.stats["tokens_processed"] += int(m["ref_tokens"])
        self.stats["positions"] += int(m["positions"])

    def log(self, step: int) -> None:
        """Writes the interval ending at `step` (TensorBoard, metrics.jsonl, console) and starts the next."""
        self.flush()
        now = time.perf_counter()
        if self.averager.n:
            seconds = now - self.interval.started
            self.stats["train_seconds"] += seconds
            scalars = self._scalars(step, seconds)
            self.writer.write(step, scalars)
            if self.primary:
                log.info(monitor.console_line(step, self.train_cfg.steps, scalars))
        self.averager.reset()
        self.interval = Interval(now)

    def _scalars(self, step: int, seconds: float) -> dict:
        avg, flops, n_dev = self.averager, self.interval.flops, jax.device_count()
        scalars = {
            "train/loss": float(avg.mean("loss")),
            "train/acc_top10": float(avg.mean("acc_top10")),
            "train/grad_norm": float(avg.mean("grad_norm")),
            "train/lr": self.lr_at(step),
            "perf/step_time_s": seconds / max(self.interval.steps, 1),
            "perf/tokens_per_s": float(avg.sums["positions"]) / max(seconds, 1e-9),
            "perf/tflops_per_device": flops / max(seconds, 1e-9) / n_dev / 1e12,
            "perf/mfu": flops / max(seconds, 1e-9) / (self.peak_flops * n_dev),
            "stats/tokens_processed": float(self.stats["tokens_processed"]),
            "stats/samples": float(self.stats["samples"]),
        }
        if self.model_cfg.moe:  # the load-balancing term, apart from the loss it is part of
            scalars["train/router_aux"] = float(avg.mean("router_aux"))
            scalars["train/ce"] = float(avg.mean("ce"))
        for lv, (nll, tok) in enumerate(zip(avg.sums["nll_per_level"], avg.sums["tokens_per_level"])):
            if tok > 0:  # token-weighted over the interval, like the overall loss of each step
                scalars[f"train/loss_level{lv}"] = float(nll / tok)
        return scalars
