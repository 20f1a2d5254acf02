"""Pipeline throughput: batches per second out of the grain pipeline.

    python benchmarks/pipeline_throughput.py [--store demo_out/store] [--batches 200] [--workers 0]

Two settings: (1) configs/demo.py on the demo store (built by `make demo`; skipped if absent),
(2) a synthetic store of 10 s utterances (random codes, 750 frames x 8, 150 phonemes, 64
speakers) at batch 16, the heavy case. Compare with the train step time: the pipeline should
deliver batches at least 10x faster than the step consumes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_store(path: Path, n: int = 1024, speakers: int = 64) -> Path:
    from valle_jax.data.store import StoreWriter
    from valle_jax.data.text import LANG_SYMMAP, reference_symmap

    rng = np.random.default_rng(0)
    w = StoreWriter(path, reference_symmap(), LANG_SYMMAP)
    for i in range(n):
        frames = int(rng.integers(700, 751))
        w.add(
            f"s{i % speakers}/{i}",
            f"g_s{i % speakers}",
            "g",
            "en",
            rng.integers(0, 1024, (frames, 8)).astype(np.int16),
            rng.integers(1, 200, 150).astype(np.int16),
        )
    return w.close()


def measure(store, cfg, batches: int, repeats: int = 3) -> tuple[float, float]:
    from valle_jax.data.pipeline import make_iterator

    rates, first = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        it = make_iterator(store, cfg)
        next(it)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches / (time.perf_counter() - start))
    return statistics.median(rates), statistics.median(first)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store", type=Path, default=Path("demo_out/store"))
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()

    from configs import base, demo
    from valle_jax.config import data_config

    if (args.store / "index.json").exists():
        cfg = dataclasses.replace(data_config(demo.get_config()), store=str(args.store), num_workers=args.workers)
        rate, first = measure(args.store, cfg, args.batches)
        print(
            f"demo config (batch {cfg.batch_size}, {args.store}): {rate:7.1f} batches/s "
            f"({rate * cfg.batch_size:.0f} utterances/s), first batch after {first:.2f} s"
        )
    else:
        print(f"no store at {args.store}: run `make demo` first for the demo-config figure")

    path = synthetic_store(Path(tempfile.mkdtemp(prefix="bench_pipeline_")) / "store")
    cfg = dataclasses.replace(
        data_config(base.get_config()), store=str(path), batch_size=16, sample_type="speaker", num_workers=args.workers
    )
    rate, first = measure(path, cfg, args.batches)
    print(
        f"batch 16 x 10 s utterances (prompt {cfg.prompt_duration:g} s):  {rate:7.1f} batches/s "
        f"({rate * 16 * 10:.0f} s of audio/s), first batch after {first:.2f} s"
    )


if __name__ == "__main__":
    main()
