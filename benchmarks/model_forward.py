"""Compile time and forward time of the model at a preset size (default: half, batch 8).

    python benchmarks/model_forward.py [--arch llama|transformer] [--size half] [--batch 8]
        [--text 60] [--prompt 225] [--resp 375] [--dtype float32] [--repeats 5]

Prints the compile time, the median forward (teacher-forced logits of a mixed-level batch) and the
achieved FLOP rate next to a float32 matmul peak measured in the same run on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="llama")
    p.add_argument("--size", default="half")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text", type=int, default=60)
    p.add_argument("--prompt", type=int, default=225)
    p.add_argument("--resp", type=int, default=375)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from valle_jax.config import SIZES, ModelConfig
    from valle_jax.data.batch import pad_batch
    from valle_jax.models import init_model, jit_forward

    d, h, n = SIZES[args.size]
    cfg = ModelConfig(arch=args.arch, d_model=d, n_heads=h, n_layers=n, dtype=args.dtype)
    model = init_model(cfg)
    rng = np.random.default_rng(0)
    b = args.batch
    batch = pad_batch(
        [rng.integers(1, 200, args.text) for _ in range(b)],
        [0] * b,
        [rng.integers(0, 1024, (args.prompt, 8)) for _ in range(b)],
        [rng.integers(0, 1024, (args.resp, 8)) for _ in range(b)],
    )
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    levels = jnp.arange(b) % 8
    forward = jit_forward(model)
    t = time.perf_counter()
    jax.block_until_ready(forward(batch, levels))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(forward(batch, levels))
        times.append(time.perf_counter() - t)
    fwd = statistics.median(times)
    s = args.text + args.prompt + args.resp + 5
    dense = (4 + 3 * cfg.ffn_mult if args.arch == "llama" else 4 + 2 * cfg.ffn_mult) * d * d * n  # per token
    flops = 2 * b * s * (dense + d * cfg.n_classes) + 4 * b * n * s * s * d  # + attention (QK and PV)
    peak = matmul_peak()
    print(
        f"{args.arch} {args.size} ({d}/{h}/{n}), batch {b} x {s} positions, {args.dtype}, {jax.devices()[0].platform}:"
    )
    print(
        f"  compile + first call {compile_s:.1f} s"
        f"; forward median {fwd * 1000:.0f} ms (runs {[round(x * 1000) for x in times]})"
    )
    print(
        f"  {flops / fwd / 1e9:.0f} GFLOP/s achieved vs {peak:.0f} GFLOP/s float32 matmul peak measured now "
        f"({100 * flops / fwd / 1e9 / peak:.0f}%)"
    )


if __name__ == "__main__":
    main()
