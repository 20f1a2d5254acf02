"""BitNet decoding from packed ternary weights against float32 and bfloat16 weights of the same size:
batch-1 AR steps/s, and the bytes of layer weights one step streams.

    python benchmarks/bitnet_decode.py [--sizes quarter,half] [--arch llama] [--steps 150] [--repeats 3]
        [--xla-dot] [--batches 1]

For each size, in one process: the `--arch` model in float32, in bfloat16, and with model.bitnet
(every backbone matmul BitLinear: 2-bit packed weights, one scale per matrix, 8-bit activations),
all randomly initialised with the stop token banned so every run takes exactly --steps steps; the
three decoders alternate, --repeats times, and the best run of each is reported. On the CPU the
steps run valle_jax.kernels' rows_linear (float32, bfloat16 or ternary panels) unless --xla-dot;
on a GPU/TPU, XLA (the ternary weights unpacked inside each step's jitted product).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from valle_jax.config import ARCHS, SIZES, ModelConfig
from valle_jax.decoding import Decoder, Settings, make_inputs
from valle_jax.models import init_model

TEXT_LEN, PROMPT_FRAMES = 60, 225  # 3 s of prompt, as benchmarks/decode.py


def decoder(cfg: ModelConfig, xla_dot: bool) -> Decoder:
    model = init_model(cfg, 0)
    model.classifier_bias[...] = model.classifier_bias[...].at[cfg.stop_token].set(-1e9)
    return Decoder(model, cpu_kernels=not xla_dot)


def layer_bytes(dec: Decoder) -> int:
    """Bytes of the layer weights one AR step reads (as the decoder holds them for its steps)."""
    model_layers = dec.step_layers
    if model_layers is None:  # XLA's dot over the parameters, in the dtype they are held
        return sum(x.nbytes for x in jax.tree.leaves(dec.params["backbone"]) if x.ndim >= 2)
    return sum(x.nbytes for layer in model_layers for x in jax.tree.leaves(layer) if x.ndim >= 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="quarter,half")
    p.add_argument("--arch", default="llama", choices=[a for a in ARCHS if a != "mixtral"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--xla-dot", action="store_true", help="XLA's dot on the CPU too (no kernels)")
    args = p.parse_args()
    settings = Settings(max_ar_steps=args.steps, ar_temp=1.0, seed=0)
    rng = np.random.default_rng(0)
    print(f"platform {jax.default_backend()}, {jax.devices()[0].device_kind}")
    for size in args.sizes.split(","):
        d, h, n = SIZES[size]
        base = ModelConfig(arch=args.arch, d_model=d, n_heads=h, n_layers=n)
        variants = {
            "float32": base,
            "bfloat16": dataclasses.replace(base, dtype="bfloat16"),
            "bitnet": dataclasses.replace(base, bitnet=True),
        }
        decs = {k: decoder(c, args.xla_dot) for k, c in variants.items()}
        for b in args.batches:
            inputs = make_inputs(
                [list(rng.integers(3, 200, TEXT_LEN)) for _ in range(b)],
                [rng.integers(0, 1024, (PROMPT_FRAMES, 8)) for _ in range(b)],
                [0] * b,
                8,
            )
            best = {}
            for k, dec in decs.items():  # compile, and the step layers packed once
                jax.block_until_ready(dec.ar(inputs, settings).tokens)
            for _ in range(args.repeats):
                for k, dec in decs.items():
                    t0 = time.perf_counter()
                    out = jax.block_until_ready(dec.ar(inputs, settings))
                    best[k] = min(best.get(k, np.inf), time.perf_counter() - t0)
                    assert int(np.min(out.length)) == args.steps, np.asarray(out.length)
            result = {
                k: {
                    "steps_per_s": args.steps / best[k],
                    "layer_weight_mb": layer_bytes(decs[k]) / 1e6,
                    "kernels": decs[k].cpu_kernels,
                }
                for k in decs
            }
            line = "  ".join(
                f"{k}: {v['steps_per_s']:.1f} steps/s ({v['layer_weight_mb']:.1f} MB of layer weights)"
                for k, v in result.items()
            )
            ratio = result["bitnet"]["steps_per_s"] / result["float32"]["steps_per_s"]
            ratio_bf = result["bitnet"]["steps_per_s"] / result["bfloat16"]["steps_per_s"]
            print(f"{size} {args.arch} batch {b}: {line}; bitnet/float32 {ratio:.2f}x, bitnet/bfloat16 {ratio_bf:.2f}x")
            print("  " + json.dumps({"size": size, "batch": b, **result}), flush=True)


if __name__ == "__main__":
    main()
