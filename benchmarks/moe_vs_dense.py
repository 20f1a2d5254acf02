"""An MoE (mixtral: E experts, top-2) against the dense llama with the same active parameters (its
feed-forward 2x wider: k experts' worth), at one size: training-step time and peak memory, and AR
decoding steps/s at batch 1 and 8.

    python benchmarks/moe_vs_dense.py [--size half] [--experts 8] [--batch 2] [--shape 20,75,100]
        [--train-steps 2] [--decode-steps 60] [--batches 1,8] [--reps 1] [--dispatch dropless]

Each measurement runs in a fresh process (its peak RSS is its own: parameters, optimizer state,
activations and XLA's buffers for training; the model and the decoding state for decoding), and the
two arms alternate (dense, moe, dense, moe, ...) so that both see the same neighbours on a shared
machine; the ratios printed at the end are over the medians of the repetitions. Training: AdamW,
float32, the 'reference' layout of text/prompt/response lengths given by --shape, the median of
--train-steps steps after a warm-up step. Decoding: the Decoder's on-device AR loop at temperature 1
with the stop token banned (every row runs --decode-steps steps), float32 weights, after one run that
compiles, less a 4-step run (the prefill); the CPU kernels serve the dense model's matmuls and the
MoE's attention, the experts run as XLA grouped matmuls (valle_jax/models/backbones.py MixtralBackbone).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from batches import random_batch
from child import run_child

FEW_STEPS = 4  # a short AR run: its time is the prefill's, subtracted from the full run


def model_config(args, arm: str):
    from valle_jax.config import SIZES, ModelConfig

    d, h, n = SIZES[args.size]
    if arm == "moe":
        return ModelConfig(
            arch="mixtral", d_model=d, n_heads=h, n_layers=n, experts=args.experts, moe_dispatch=args.dispatch
        )
    return ModelConfig(arch="llama", d_model=d, n_heads=h, n_layers=n, ffn_mult=4 * 2)  # two experts' width


def train_child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from valle_jax.config import OptimConfig
    from valle_jax.models.valle import parameter_counts
    from valle_jax.training.optim import make_optimizer
    from valle_jax.training.step import abstract_model, init_params, make_train_step

    cfg = model_config(args, args.arm)
    t_len, p_len, r_len = args.shape
    batch = random_batch(args.batch, t_len, p_len, r_len)
    params = jax.jit(lambda: init_params(cfg, 0))()
    tx, _, _ = make_optimizer(OptimConfig(), params, 1000)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    state["rng"] = jax.random.key_data(jax.random.key(0))
    step = jax.jit(make_train_step(nnx.graphdef(abstract_model(cfg)), cfg, tx), donate_argnums=(0,))
    lr = np.float32(1.0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch, lr)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.train_steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, lr)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    total, active = parameter_counts(cfg)
    return {
        "arm": args.arm,
        "params_M": total / 1e6,
        "active_M": active / 1e6,
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "steps": [round(t, 3) for t in times],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": float(m["loss"]),
    }


def decode_child(args) -> dict:
    import jax
    import numpy as np

    from valle_jax.decoding import Decoder, Settings, make_inputs
    from valle_jax.models import init_model

    cfg = model_config(args, args.arm)
    model = init_model(cfg, 0)
    model.classifier_bias[...] = model.classifier_bias[...].at[cfg.stop_token].set(-1e9)  # every row runs all steps
    dec = Decoder(model)
    settings = Settings(max_ar_steps=args.decode_steps, ar_temp=1.0, seed=0)
    rng = np.random.default_rng(0)
    out = {"arm": args.arm, "batches": {}}
    for b in args.batches:
        texts = [list(rng.integers(3, 200, 60)) for _ in range(b)]
        inputs = make_inputs(texts, [rng.integers(0, 1024, (225, 8)) for _ in range(b)], [0] * b, 8)
        few = Settings(max_ar_steps=FEW_STEPS, ar_temp=1.0, seed=0)
        runs = {}
        for s in (settings, few, settings, few):  # each compiles on its first run; the second is timed
            t0 = time.perf_counter()
            jax.block_until_ready(dec.ar(inputs, s).tokens)
            runs[s.max_ar_steps] = time.perf_counter() - t0
        # the loop's own rate: the steps beyond the few, over the time beyond their run (the prefill's)
        out["batches"][b] = (args.decode_steps - FEW_STEPS) / (runs[args.decode_steps] - runs[FEW_STEPS])
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def spawn(args, mode: str, arm: str) -> dict:
    cmd = [
        f"--{mode}-child",
        "--arm",
        arm,
        "--size",
        args.size,
        "--experts",
        str(args.experts),
        "--dispatch",
        args.dispatch,
        "--batch",
        str(args.batch),
        "--shape",
        ",".join(map(str, args.shape)),
        "--train-steps",
        str(args.train_steps),
        "--decode-steps",
        str(args.decode_steps),
        "--batches",
        ",".join(map(str, args.batches)),
    ]
    return run_child(__file__, cmd, f"{mode} {arm}", training_arch="mixtral" if arm == "moe" else "llama")


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="half")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dispatch", default="dropless", choices=("dropless", "capacity"))
    p.add_argument("--batch", type=int, default=2, help="training batch")
    p.add_argument("--shape", type=ints, default=[20, 75, 100], help="text, prompt, response lengths")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=60)
    p.add_argument("--batches", type=ints, default=[1, 8], help="decoding batches")
    p.add_argument("--reps", type=int, default=1, help="alternating repetitions of both arms")
    p.add_argument("--skip", default="", help="'train' or 'decode': leave that part out")
    p.add_argument("--arm", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--train-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--decode-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run_child's; the modes say which
    args = p.parse_args()
    if args.train_child:
        print(json.dumps(train_child(args)))
        return
    if args.decode_child:
        print(json.dumps(decode_child(args)))
        return
    results = {(mode, arm): [] for mode in ("train", "decode") for arm in ("dense", "moe")}
    for mode in ("train", "decode"):
        if args.skip == mode:
            continue
        for rep in range(args.reps):
            for arm in ("dense", "moe"):
                r = spawn(args, mode, arm)
                results[(mode, arm)].append(r)
                print(f"{mode} {arm} rep {rep}: {json.dumps(r)}", flush=True)
    med = statistics.median
    if results[("train", "dense")]:
        d, m = results[("train", "dense")], results[("train", "moe")]
        sd, sm = med(r["step_s"] for r in d), med(r["step_s"] for r in m)
        rd, rm = med(r["peak_rss_gb"] for r in d), med(r["peak_rss_gb"] for r in m)
        print(
            f"training ({args.size}, batch {args.batch}, shape {tuple(args.shape)}): dense {d[0]['params_M']:.1f}M "
            f"{sd:.2f} s/step {rd:.2f} GB | moe E={args.experts} {m[0]['params_M']:.1f}M total "
            f"{m[0]['active_M']:.1f}M active {sm:.2f} s/step {rm:.2f} GB | moe/dense time {sm / sd:.2f}x, "
            f"peak RSS {rm / rd:.2f}x"
        )
    if results[("decode", "dense")]:
        d, m = results[("decode", "dense")], results[("decode", "moe")]
        for b in args.batches:
            vd, vm = med(r["batches"][str(b)] for r in d), med(r["batches"][str(b)] for r in m)
            print(
                f"decoding batch {b} ({args.decode_steps} steps): dense {vd:.1f} steps/s | moe {vm:.1f} steps/s "
                f"| moe/dense {vm / vd:.2f}x"
            )
        rd, rm = med(r["peak_rss_gb"] for r in d), med(r["peak_rss_gb"] for r in m)
        print(f"decoding peak RSS: dense {rd:.2f} GB | moe {rm:.2f} GB")


if __name__ == "__main__":
    main()
