"""LoRA against a full fine-tune: step time, optimizer-state bytes and peak RSS of one training step.

    python benchmarks/lora_vs_full.py [--size half] [--arch llama] [--rank 16] [--batch 8] [--steps 3]

The reference training shapes (text 60, prompt 225, response 375 frames; batch 8), adamw as
configured by default, float32. Each mode runs in a fresh process, so its peak RSS (parameters,
optimizer state, activations, XLA's buffers) is its own; "XLA peak" is the compiled step's own
account (memory_analysis: its arguments, outputs not aliased to them, and temporaries), which does
not depend on the allocator or on what else the process holds. LoRA: rank --rank on the attention and
FFN presets (models/lora.py), the base passed frozen beside the adapters as training does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from batches import random_batch
from child import run_child

SHAPE = (60, 225, 375)  # text, prompt, response: the shapes the reference was timed at


def child(args) -> dict:
    from valle_jax.runtime import start_training_process

    # as `python -m valle_jax.train` runs: with JAX's asynchronous CPU dispatch a step can start while
    # the last one's temporaries are alive, so peak RSS would count two steps' buffers on some runs
    start_training_process(args.arch)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from valle_jax.config import SIZES, ModelConfig, OptimConfig
    from valle_jax.models import lora as LR
    from valle_jax.training import lora_state
    from valle_jax.training.optim import make_optimizer
    from valle_jax.training.step import abstract_model, init_params, make_train_step

    d, h, n = SIZES[args.size]
    cfg = ModelConfig(arch=args.arch, d_model=d, n_heads=h, n_layers=n)
    t_len, p_len, r_len = SHAPE
    batch = random_batch(args.batch, t_len, p_len, r_len)
    abstract = abstract_model(cfg)
    graph = nnx.graphdef(abstract)
    params = jax.jit(lambda: init_params(cfg, 0))()
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    if args.mode == "lora":
        lcfg = LR.LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
        targets = LR.find_targets(abstract, lcfg)
        trained = jax.jit(lambda: LR.init_adapters(targets, lcfg, 0))()
        merge = lora_state.merge_fn(targets, lcfg)
        state["base"] = params
    else:
        trained, merge = params, None
    tx, _, _ = make_optimizer(OptimConfig(), trained, 1000)
    state.update(params=trained, opt_state=tx.init(trained))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))
    trained_n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained))
    step = jax.jit(make_train_step(graph, cfg, tx, (), merge), donate_argnums=(0,))
    lr = np.float32(1.0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()  # XLA's own account: deterministic, unlike RSS
    compiled_peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    compiled_peak += mem.temp_size_in_bytes
    state, m = compiled(state, batch, lr)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, lr)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return {
        "mode": args.mode,
        "trained_M": trained_n / 1e6,
        "opt_state_MB": opt_bytes / 2**20,
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "steps": [round(t, 2) for t in times],
        "temp_gb": mem.temp_size_in_bytes / 2**30,
        "compiled_peak_gb": compiled_peak / 2**30,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": float(m["loss"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="half")
    p.add_argument("--arch", default="llama")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    common = ["--size", args.size, "--arch", args.arch, "--rank", str(args.rank), "--batch", str(args.batch)]
    common += ["--steps", str(args.steps)]
    rows = [run_child(__file__, [*common, "--mode", mode], mode, 1, True, args.arch) for mode in ("full", "lora")]
    print(f"{args.arch}-{args.size}, batch {args.batch}, shapes {SHAPE}, LoRA rank {args.rank} on attention + FFN")
    head = f"{'mode':6} {'trained':>9} {'opt state':>10} {'compile':>8} {'step':>8} {'XLA temp':>9} {'XLA peak':>9}"
    print(f"{head} {'peak RSS':>9}  steps")
    for r in rows:
        print(
            f"{r['mode']:6} {r['trained_M']:8.2f}M {r['opt_state_MB']:8.1f}MB {r['compile_s']:7.1f}s "
            f"{r['step_s']:7.2f}s {r['temp_gb']:7.2f}GB {r['compiled_peak_gb']:7.2f}GB {r['peak_rss_gb']:7.2f}GB  "
            f"{r['steps']}"
        )
    full, lora = rows
    print(
        f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}, optimizer state "
        f"{lora['opt_state_MB'] / full['opt_state_MB']:.4f}, XLA peak (arguments + outputs + temporaries) "
        f"{lora['compiled_peak_gb'] / full['compiled_peak_gb']:.2f}, peak RSS "
        f"{lora['peak_rss_gb'] / full['peak_rss_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
