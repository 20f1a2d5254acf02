"""Decoding speed: AR steps/s at batch 1, 8 and 32, the NAR levels, real-time factor, compile time,
and the same model without the KV cache (full recomputation every step, as the reference does).

    python benchmarks/decode.py [--sizes tiny,quarter,half] [--arch llama|transformer|retnet]
        [--dtype float32|bfloat16] [--batches 1,8,32] [--prompt-seconds 3] [--audio-seconds 5]
        [--memory-seconds 10,30] [--no-tcmalloc] [--reference] [--xla-dot | --compare-xla-dot] [--repeats N]
        [--kv-dtype float32|bfloat16] [--bitnet]

The model is randomly initialised, with its stop logit banned, so every row runs exactly
audio_seconds * 75 AR steps (sampling at temperature 1 with the default filters, all inside the
loop). The uncached baseline runs 8 steps over the same padded length and is reported per step.
On the CPU the AR steps' matmuls run valle_jax.kernels (--xla-dot: XLA's dot instead;
--compare-xla-dot: both, per batch, alternating, in the same process; --repeats N: the best of N runs
(the AR per batch, and the NAR),
median beside it; VALLE_JAX_CPU_KERNELS=avx2 picks the kernels' AVX2 build on an AVX-512 CPU).
Each batch also runs 8 steps alone: what that takes (the prefill, mostly) is reported, and the loop's
own rate is the rest of the steps over the rest of the time. --kv-dtype: the AR's KV cache (default:
the model's dtype). The weight-streaming bound is the bytes a step
must read (every layer matrix, in the dtype the step reads it, and the classifier; an embedding is one
gathered row) / memory bandwidth, both measured in the same process (bandwidth: a matrix-vector
product over a 512 MB matrix). Memory at --memory-seconds of generated audio (batch 1): the bytes of the decoding
state the AR carries (a KV cache grows with the length; retnet's recurrent state does not) and XLA's
account of the compiled AR (arguments + outputs + temporaries). Each size runs in a fresh process
(TCMalloc preloaded when installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

from child import run_child

from valle_jax.config import ARCHS

TEXT_LEN = 60  # phoneme ids per utterance (reference_decode.py times the reference on the same)
FEW_STEPS = 8  # the short run that measures the prefill


def measure_bandwidth(mb: int = 512) -> float:
    """Bytes per second streamed by a jitted [1, 4096] x [4096, N] matrix-vector product over an
    `mb` MB matrix: the access pattern of a batch-1 step over its weights (a plain sum over the
    same array reads ~40% slower on CPU, a single-threaded reduction)."""
    import jax
    import jax.numpy as jnp

    w = jnp.ones((4096, mb * 2**20 // 4 // 4096), jnp.float32)
    v = jnp.ones((1, 4096), jnp.float32)
    f = jax.jit(lambda v, w: v @ w)
    f(v, w).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(v, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best


def timed(fn):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def child(args) -> dict:
    import jax
    import numpy as np

    from valle_jax.config import SIZES, ModelConfig
    from valle_jax.decoding import Decoder, Knobs, Settings, make_inputs
    from valle_jax.models import init_model

    d, h, n = SIZES[args.size]
    cfg = ModelConfig(arch=args.arch, d_model=d, n_heads=h, n_layers=n, dtype=args.dtype, bitnet=args.bitnet)
    model = init_model(cfg, 0)
    # a random model may still sample the stop token: ban it, so every row runs the full length
    model.classifier_bias[...] = model.classifier_bias[...].at[cfg.stop_token].set(-1e9)
    dec = Decoder(model, cpu_kernels=not args.xla_dot, kv_dtype=args.kv_dtype)
    xla_dec = Decoder(model, cpu_kernels=False, kv_dtype=args.kv_dtype) if args.compare_xla_dot else None
    # what a step streams: every layer matrix and the classifier (an embedding is one gathered row)
    layers = dec.step_layers if dec.step_layers is not None else model.backbone.unstack()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(layers)) + model.classifier[...].nbytes
    steps = int(round(75 * args.audio_seconds))
    settings = Settings(max_ar_steps=steps, ar_temp=1.0, nar_temp=1.0, seed=0)
    rng = np.random.default_rng(0)
    text_len, prompt_len = TEXT_LEN, int(round(75 * args.prompt_seconds))

    def inputs_for(b):
        return make_inputs(
            [list(rng.integers(3, 200, text_len)) for _ in range(b)],
            [rng.integers(0, 1024, (prompt_len, 8)) for _ in range(b)],
            [0] * b,
            8,
        )

    from valle_jax import kernels

    out = {
        "size": args.size,
        "arch": args.arch,
        "dtype": args.dtype,
        "kv_dtype": dec.kv_dtype,
        "kernels": kernels.isa() if dec.cpu_kernels else None,
        "params_M": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dec.params)) / 1e6,
        "ar_steps": steps,
        "batches": {},
    }
    for b in args.batches:
        inputs = inputs_for(b)
        _, first = timed(lambda: dec.ar(inputs, settings).tokens)
        if xla_dec is not None:
            timed(lambda: xla_dec.ar(inputs, settings).tokens)
        runs, xla_runs = [], []
        for _ in range(args.repeats):  # alternating, so that both see the same neighbours
            ar, run = timed(lambda: dec.ar(inputs, settings))
            runs.append(run)
            if xla_dec is not None:  # the same AR with XLA's dot for every matmul, in the same process
                xla_runs.append(timed(lambda: xla_dec.ar(inputs, settings).tokens)[1])
        assert int(np.min(ar.length)) == steps, np.asarray(ar.length)
        run = min(runs)
        few = dataclasses.replace(settings, max_ar_steps=FEW_STEPS)
        timed(lambda: dec.ar(inputs, few).tokens)
        start = min(timed(lambda: dec.ar(inputs, few).tokens)[1] for _ in range(max(args.repeats, 2)))
        out["batches"][b] = {
            "ar_s": run,
            "ar_steps_per_s": steps / run,
            "ar_tokens_per_s": b * steps / run,
            "ar_compile_s": first - run,
            "ar_median_tokens_per_s": b * steps / float(np.median(runs)),
            "start_s": start,
            "loop_tokens_per_s": b * (steps - FEW_STEPS) / max(run - start, 1e-9),
        }
        if xla_runs:
            out["batches"][b]["xla_dot_tokens_per_s"] = b * steps / min(xla_runs)
        if b == 1:
            _, nar_first = timed(lambda: dec.nar(inputs, dec.ar(inputs, settings), settings))
            ar = dec.ar(inputs, settings)
            jax.block_until_ready(ar.tokens)
            nars = [timed(lambda: dec.nar(inputs, ar, settings))[1] for _ in range(args.repeats)]
            nar = min(nars)  # best of --repeats, as for the AR
            out.update(
                nar_s=nar,
                nar_median_s=float(np.median(nars)),
                rtf=(run + nar) / args.audio_seconds,
                ar_step_ms=1e3 * run / steps,
            )
            # without the cache: 8 steps over the same padded length, per step
            knobs = Knobs.of(settings, 1)._replace(max_steps=np.full((1,), 8, np.int32))
            n_slots = ar.tokens.shape[1]
            _, unc_first = timed(lambda: dec.ar(inputs, settings, cached=False, knobs=knobs, n_slots=n_slots).tokens)
            _, unc = timed(lambda: dec.ar(inputs, settings, cached=False, knobs=knobs, n_slots=n_slots).tokens)
            out.update(
                uncached_step_ms=1e3 * unc / 8, uncached_steps_per_s=8 / unc, uncached_ar_s_estimate=unc / 8 * steps
            )
    for seconds in args.memory_seconds:  # compiled, not run: the shapes decide the memory
        inputs, n_slots = inputs_for(1), dec.n_slots(int(round(75 * seconds)))
        knobs = Knobs.of(settings, 1)
        run = dec.ar_call(settings, n_slots)
        state = jax.eval_shape(run, dec.params, inputs, knobs, jax.random.key(0)).state[0]
        mem = jax.jit(run).lower(dec.params, inputs, knobs, jax.random.key(0)).compile().memory_analysis()
        out.setdefault("memory", {})[f"{seconds:g}s"] = {
            "state_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 1e6,
            "xla_mb": None
            if mem is None
            else (
                mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
            )
            / 1e6,
        }
    try:  # EnCodec's decoder on the generated length (random weights: same cost as pretrained)
        import numpy as np

        from valle_jax.codec import Codec, _new_model

        codec = Codec(_new_model(pretrained=False))
        codes = np.zeros((steps, 8), np.int32)
        codec.decode(codes)
        t0 = time.perf_counter()
        codec.decode(codes)
        out["codec_decode_s"] = time.perf_counter() - t0
    except Exception as e:  # torch/encodec missing: report without it
        out["codec_decode_s"] = float("nan")
        out["codec_error"] = str(e)
    bw = measure_bandwidth()
    out.update(
        param_bytes=param_bytes,
        bandwidth_gbs=bw / 1e9,
        bound_steps_per_s=bw / param_bytes,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )
    return out


def spawn(args, size: str) -> dict:
    return run_child(
        __file__,
        [
            "--size",
            size,
            "--arch",
            args.arch,
            "--dtype",
            args.dtype,
            "--batches",
            ",".join(map(str, args.batches)),
            "--prompt-seconds",
            str(args.prompt_seconds),
            "--audio-seconds",
            str(args.audio_seconds),
            "--memory-seconds",
            ",".join(map(str, args.memory_seconds)),
        ]
        + ["--xla-dot"] * args.xla_dot
        + ["--compare-xla-dot"] * args.compare_xla_dot
        + ["--repeats", str(args.repeats)]
        + ["--kv-dtype", args.kv_dtype] * bool(args.kv_dtype)
        + ["--bitnet"] * args.bitnet,
        size,
        tcmalloc=not args.no_tcmalloc,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,quarter,half")
    p.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batches", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--prompt-seconds", type=float, default=3.0)
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--memory-seconds", default="10,30", type=lambda s: [float(x) for x in s.split(",") if x])
    p.add_argument("--no-tcmalloc", action="store_true")
    p.add_argument(
        "--kv-dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="the AR's KV cache (default: the model's dtype)",
    )
    p.add_argument(
        "--bitnet",
        action="store_true",
        help="model.bitnet: BitLinear matmuls decoded from 2-bit packed weights (see benchmarks/bitnet_decode.py)",
    )
    p.add_argument("--repeats", type=int, default=1, help="AR runs per batch; the best is reported (and the median)")
    p.add_argument("--xla-dot", action="store_true", help="XLA's dot for the AR steps too (no CPU kernels)")
    p.add_argument(
        "--compare-xla-dot",
        action="store_true",
        help="also time each batch's AR with XLA's dot instead of the CPU kernels, in the same process",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="also time the PyTorch reference's decoding (llama; needs transformers, see reference_decode.py)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference and args.arch != "llama":
        p.error("--reference: the reference is timed with its llama backbone; use --arch llama")
    if args.child:
        print(json.dumps(child(args)))
        return
    for size in args.sizes.split(","):
        r = spawn(args, size)
        per_batch = "  ".join(
            f"b{b}: {v['ar_tokens_per_s']:.0f} tok/s ("
            + (f"median {v['ar_median_tokens_per_s']:.0f}, " if args.repeats > 1 else "")
            + f"{v['ar_steps_per_s']:.1f} steps/s; loop {v['loop_tokens_per_s']:.0f} tok/s after "
            f"{v['start_s']:.2f} s for prefill + {FEW_STEPS} steps; compile {v['ar_compile_s']:.1f}s"
            + (f"; XLA dot {v['xla_dot_tokens_per_s']:.0f} tok/s" if "xla_dot_tokens_per_s" in v else "")
            + ")"
            for b, v in r["batches"].items()
        )
        print(
            f"{size} {args.arch}{' bitnet' * args.bitnet} {args.dtype} "
            f"(KV cache {r['kv_dtype']}, kernels {r['kernels'] or 'off'}; "
            f"{r['params_M']:.1f}M params): AR {per_batch}"
        )
        if "nar_s" in r:
            print(
                f"  batch 1: AR {r['ar_step_ms']:.2f} ms/step vs weight-streaming bound "
                f"{1e3 / r['bound_steps_per_s']:.2f} ms "
                f"({r['param_bytes'] / 1e6:.0f} MB at {r['bandwidth_gbs']:.1f} GB/s); "
                f"NAR {r['nar_s']:.2f} s for 7 levels; codec decode {r['codec_decode_s']:.2f} s; "
                f"RTF {r['rtf']:.2f} (AR+NAR, {args.audio_seconds:g} s of audio, {args.prompt_seconds:g} s prompt)"
            )
            print(
                f"  without the KV cache: {r['uncached_step_ms']:.1f} ms/step "
                f"({r['uncached_steps_per_s']:.1f} steps/s; "
                f"{r['uncached_ar_s_estimate']:.1f} s for the AR) -> cache speed-up "
                f"{r['uncached_step_ms'] / r['ar_step_ms']:.1f}x; peak RSS {r['peak_rss_gb']:.2f} GB"
            )
        for when, m in r.get("memory", {}).items():
            xla = "n/a" if m["xla_mb"] is None else f"{m['xla_mb']:.0f} MB"
            print(
                f"  memory at {when} of generated audio (batch 1): decoding state {m['state_mb']:.1f} MB, "
                f"compiled AR {xla} (arguments + outputs + temporaries)"
            )
        print("  " + json.dumps(r), flush=True)
        if args.reference and "nar_s" in r:
            import reference_decode

            ref = reference_decode.spawn(size, args.prompt_seconds, args.audio_seconds)
            ar_s = r["ar_step_ms"] * ref["ar_steps"] / 1e3
            print(
                f"  PyTorch reference (no cache, batch 1): AR {ref['ar_s']:.1f} s "
                f"({ref['ar_steps_per_s']:.2f} steps/s), "
                f"NAR {ref['nar_s']:.2f} s, RTF {ref['rtf']:.1f} -> ours: AR {ref['ar_s'] / ar_s:.0f}x, "
                f"NAR {ref['nar_s'] / r['nar_s']:.2f}x, RTF {ref['rtf'] / r['rtf']:.0f}x faster"
            )
            print("  " + json.dumps(ref), flush=True)


if __name__ == "__main__":
    main()
