"""Training-step speed and memory: tokens/s, step time, peak memory, MFU and compile time per size.

    python benchmarks/train_step.py [--sizes tiny,quarter,half] [--arch llama|transformer|retnet] [--batch 8]
        [--shape 6s|reference] [--dtype float32] [--attention dense|blocked] [--remat] [--steps 4]
        [--devices-overhead] [--no-tcmalloc] [--cpu-async-dispatch] [--reference]

Shapes: "6s" = 6 s of response audio per sample (450 frames), a 3 s prompt (225 frames) and 72
phonemes; "reference" = text 60, prompt 225, response 375, the shapes at which the PyTorch reference
was timed (half llama, batch 8: 15.3 s per step, 11.8 GB peak on the issue's 2-core machine;
--reference times it here, in the same run: reference_train_step.py).
Each configuration runs in a fresh process (so peak memory is its own: the process's max RSS,
which on CPU holds parameters, optimizer state, activations and XLA's buffers) and XLA's own
account of the step's buffers (arguments + outputs + temporaries). MFU is model FLOPs
(valle_jax.training.step.train_flops) per second over a float32 2048x2048 matmul peak measured in
the same process (best of before and after the steps). --devices-overhead also times tiny on 8
fake devices (data parallel) against 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from batches import random_batch
from child import run_child

from valle_jax.config import ARCHS

SHAPES = {"6s": (72, 225, 450), "reference": (60, 225, 375)}


def child(args) -> dict:
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", args.cpu_async_dispatch)  # as python -m valle_jax.train
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from valle_jax.config import SIZES, MeshConfig, ModelConfig, OptimConfig
    from valle_jax.training.monitor import measure_matmul_peak
    from valle_jax.training.optim import make_optimizer
    from valle_jax.training.sharding import make_mesh
    from valle_jax.training.step import abstract_model, init_params, make_train_step, train_flops

    d, h, n = SIZES[args.size]
    cfg = ModelConfig(
        arch=args.arch,
        d_model=d,
        n_heads=h,
        n_layers=n,
        dtype=args.dtype,
        remat=args.remat,
        attention=args.attention,
        scan_unroll=args.scan_unroll,
    )
    t_len, p_len, r_len = SHAPES[args.shape]
    b = args.batch
    batch = random_batch(b, t_len, p_len, r_len)
    mesh = make_mesh(MeshConfig(shape=(-1, 1, 1)))
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    graph = nnx.graphdef(abstract_model(cfg))
    params = jax.jit(lambda: init_params(cfg, 0))()
    tx, _, _ = make_optimizer(OptimConfig(), params, 1000)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    step = jax.jit(make_train_step(graph, cfg, tx), donate_argnums=(0,))
    lr = np.float32(1.0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_gb = (
        (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        / 2**30
        if mem is not None
        else float("nan")
    )
    state, m = compiled(state, batch, lr)
    jax.block_until_ready(m["loss"])
    # the peak before and after the steps, the better of the two: on a shared machine a single
    # measurement taken while a neighbour is busy made MFU read above 100%
    peak_before = measure_matmul_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, lr)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    seq = t_len + p_len + r_len + 5
    flops = train_flops(cfg, b, seq)
    peak = max(peak_before, measure_matmul_peak())
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {
        "size": args.size,
        "arch": args.arch,
        "devices": jax.device_count(),
        "params_M": n_params / 1e6,
        "shape": [t_len, p_len, r_len],
        "batch": b,
        "compile_s": compile_s,
        "step_s": step_s,
        "steps": [round(t, 3) for t in times],
        "tokens_per_s": b * seq / step_s,
        "model_tflop": flops / 1e12,
        "achieved_gflops": flops / step_s / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": flops / step_s / (peak * jax.device_count()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "xla_step_gb": xla_gb,
        "loss": float(m["loss"]),
        "dtype": args.dtype,
        "remat": args.remat,
        "attention": args.attention,
        "scan_unroll": args.scan_unroll,
    }


def spawn(args, size: str, devices: int) -> dict:
    cmd = [
        "--size",
        size,
        "--arch",
        args.arch,
        "--batch",
        str(args.batch),
        "--shape",
        args.shape,
        "--dtype",
        args.dtype,
        "--attention",
        args.attention,
        "--steps",
        str(args.steps),
        "--scan-unroll",
        str(args.scan_unroll),
    ]
    if args.cpu_async_dispatch:
        cmd.append("--cpu-async-dispatch")
    if args.remat:
        cmd.append("--remat")
    return run_child(__file__, cmd, f"{size} on {devices} device(s)", devices, not args.no_tcmalloc, args.arch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,quarter,half")
    p.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shape", default="6s", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="dense", choices=("dense", "blocked"))
    p.add_argument("--remat", action="store_true")
    p.add_argument("--scan-unroll", type=int, default=0, help="layers per scan iteration (0 = fully unrolled)")
    p.add_argument("--steps", type=int, default=4, help="timed steps after a warm-up step")
    p.add_argument("--devices-overhead", action="store_true")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also time the PyTorch reference's step at the same shapes (llama; needs transformers, "
        "see reference_train_step.py) and print the speed-up",
    )
    p.add_argument("--no-tcmalloc", action="store_true", help="run with glibc malloc (see valle_jax/runtime.py)")
    p.add_argument("--cpu-async-dispatch", action="store_true", help="JAX's default; see valle_jax/train.py")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference and args.arch != "llama":
        p.error("--reference: the reference is timed with its llama backbone; use --arch llama")
    if args.child:
        print(json.dumps(child(args)))
        return
    print(
        f"{'size':8} {'params':>8} {'shape':>14} {'compile':>8} {'step':>8} {'tok/s':>8} {'GFLOP/s':>8} "
        f"{'peak':>8} {'MFU':>6} {'RSS GB':>7} {'XLA GB':>7}"
    )
    for size in args.sizes.split(","):
        r = spawn(args, size, 1)
        print(
            f"{size:8} {r['params_M']:7.1f}M {str(tuple(r['shape'])):>14} {r['compile_s']:7.1f}s {r['step_s']:7.2f}s "
            f"{r['tokens_per_s']:8.0f} {r['achieved_gflops']:8.1f} {r['matmul_peak_gflops']:8.1f} "
            f"{100 * r['mfu']:5.1f}% {r['peak_rss_gb']:7.2f} {r['xla_step_gb']:7.2f}",
            flush=True,
        )
        print("  " + json.dumps(r), flush=True)
        if args.reference:
            import reference_train_step

            ref = reference_train_step.spawn(size, args.shape, args.batch, args.steps)
            print(
                f"{'  ref':8} {ref['params_M']:7.1f}M {str(tuple(ref['shape'])):>14} {'':>8} {ref['step_s']:7.2f}s "
                f"{ref['tokens_per_s']:8.0f} {ref['achieved_gflops']:8.1f} {ref['matmul_peak_gflops']:8.1f} "
                f"{100 * ref['mfu']:5.1f}% {ref['peak_rss_gb']:7.2f} {'':>7}   (PyTorch reference: "
                f"ours is {ref['step_s'] / r['step_s']:.2f}x faster, {ref['peak_rss_gb'] / r['peak_rss_gb']:.2f}x "
                f"less resident memory)",
                flush=True,
            )
            print("  " + json.dumps(ref), flush=True)
    if args.devices_overhead:
        one, eight = spawn(args, "tiny", 1), spawn(args, "tiny", 8)
        print(
            f"8 fake devices vs 1 (tiny, batch {args.batch}): step {eight['step_s']:.3f} s vs {one['step_s']:.3f} s, "
            f"overhead ratio {eight['step_s'] / one['step_s']:.2f}"
        )


if __name__ == "__main__":
    main()
