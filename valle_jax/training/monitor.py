"""What a run reports: TensorBoard events, a metrics.jsonl the plot command reads, console lines,
and the device peak that MFU is measured against. Only process 0 writes. On an object store the
workdir's metrics.jsonl is a series of parts (valle_jax.appending), uploaded at most every
FLUSH_SECS and at each checkpoint (`sync`)."""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from valle_jax.appending import AppendFile
from valle_jax.tensorboard import summary_writer

FLUSH_SECS = 10.0  # TensorBoard's flush interval, and metrics.jsonl's on an object store

# dense bf16 peak FLOP/s per device (vendor figures; the MFU denominator when train.peak_flops is 0)
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def measure_matmul_peak(n: int = 2048, reps: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of a square matmul on the default device, best of `reps` (what this machine can do)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from)."""
    if configured > 0:
        return configured, "train.peak_flops"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{kind} bf16 spec"
    return measure_matmul_peak(), f"measured float32 matmul on {kind}"


class MetricsWriter:
    """TensorBoard scalars under WORKDIR/tb and one JSON object per line in WORKDIR/metrics.jsonl."""

    def __init__(self, workdir: epath.Path, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            self.tb = summary_writer(workdir / "tb", flush_secs=FLUSH_SECS)
            self.jsonl = AppendFile(workdir / "metrics.jsonl", flush_secs=FLUSH_SECS)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **{k: _plain(v) for k, v in scalars.items()}}) + "\n")
        self.jsonl.flush()

    def write_audio(self, step: int, tag: str, wav: np.ndarray, sample_rate: int, text: str = "") -> None:
        """An audio clip in TensorBoard's Audio tab, with `text` (its transcript) in the Text tab
        under the same tag, so a listener sees what it should say."""
        if not self.enabled:
            return
        clip = np.clip(np.asarray(wav, np.float32), -1.0, 1.0)
        self.tb.add_audio(tag, clip, step, sample_rate=sample_rate)  # [samples]: mono
        if text:
            self.tb.add_text(tag, text, step)

    def sync(self) -> None:
        """On an object store, everything logged so far reaches the workdir now (at each checkpoint);
        locally the writers' own flushing is kept as it was."""
        if self.enabled and self.jsonl.remote:
            self.tb.flush()
            self.jsonl.sync()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def _plain(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(step: int, total: int, m: dict) -> str:
    parts = [
        f"step {step}/{total}",
        f"loss {m['train/loss']:.4f}",
        # an MoE's load-balancing term (part of the loss; reference.md §2.9): rising means a router collapsing
        *([f"router aux {m['train/router_aux']:.3g}"] if "train/router_aux" in m else []),
        f"acc {m['train/acc_top10']:.3f}",
        f"lr {m['train/lr']:.3g}",
        f"gnorm {m['train/grad_norm']:.3g}",
        f"{m['perf/tokens_per_s'] / 1e3:.1f}k tok/s",
        f"{m['perf/step_time_s']:.3f} s/step",
    ]
    if "perf/mfu" in m:
        parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
    parts.append(f"ETA {format_duration(m['perf/step_time_s'] * (total - step))}")
    return " | ".join(parts)


class Averager:
    """Host-side sums of per-step metrics between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.n, self.sums = 0, {}

    def add(self, metrics: dict) -> None:
        self.n += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + np.asarray(v, np.float64)

    def mean(self, k: str):
        return self.sums[k] / max(self.n, 1)
