"""What best-of-N and the continuation task cost in decoding time (randomly initialised model, stop
token banned, so every row runs its full length).

    python benchmarks/best_of.py [--size quarter] [--arch llama] [--best-of 1,2,4,8]
        [--prompt-seconds 3] [--audio-seconds 2] [--repeats 2]

- best-of N: the AR + NAR of one utterance repeated N times in one batch (what `--best-of N`
  decodes before scoring), against N = 1: the ratio is what N candidates cost over one.
- continuation: the AR with the prompt's frames as the response's start (decoding.Continuation:
  prefilled in one pass, and stepped one frame per step as `prefill_given=False` does) against the
  same generated length without them: the ratios are what the evaluation's continuation protocol
  pays for the prompt's frames either way.
Times are the best of --repeats runs after a compiling run; compilation is left out.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from valle_jax.config import SIZES, ModelConfig
from valle_jax.decoding import Decoder, Settings, make_continuation, make_inputs
from valle_jax.models import init_model

TEXT_LEN = 60


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="quarter", choices=sorted(SIZES))
    p.add_argument("--arch", default="llama")
    p.add_argument("--best-of", default="1,2,4,8")
    p.add_argument("--prompt-seconds", type=float, default=3.0)
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    d, h, n = SIZES[args.size]
    cfg = ModelConfig(arch=args.arch, d_model=d, n_heads=h, n_layers=n)
    model = init_model(cfg, 0)
    model.classifier_bias[...] = model.classifier_bias[...].at[cfg.stop_token].set(-1e9)
    dec = Decoder(model)
    rng = np.random.default_rng(0)
    text = list(rng.integers(1, 200, TEXT_LEN))
    prompt = rng.integers(0, 1024, (int(75 * args.prompt_seconds), 8))
    steps = int(75 * args.audio_seconds)
    settings = Settings(max_ar_steps=steps, min_ar_steps=0)
    print(f"{args.size} {args.arch} (d={d}, {n} layers), {args.prompt_seconds:g} s prompt, {steps} frames generated")

    def decode(batch: int, keep_logits: bool):
        inputs = make_inputs([text] * batch, [prompt] * batch, [0] * batch, 8)

        def run():
            ar = dec.ar(inputs, settings, keep_logits=keep_logits)
            return dec.nar(inputs, ar, settings)

        return run

    base = None
    for k in [int(x) for x in args.best_of.split(",")]:
        t = best_time(decode(k, keep_logits=k > 1), args.repeats)
        base = base or t
        print(f"best-of {k}: AR + NAR {t:.2f} s ({t / base:.2f}x best-of 1)")

    inputs = make_inputs([text], [prompt], [0], 8)
    cont = make_continuation([prompt], cfg.n_resp_levels)
    plain = best_time(lambda: dec.ar(inputs, settings).tokens, args.repeats)
    given = best_time(lambda: dec.ar(inputs, settings, continuation=cont).tokens, args.repeats)
    stepped = best_time(lambda: dec.ar(inputs, settings, continuation=cont, prefill_given=False).tokens, args.repeats)
    print(
        f"continuation: AR {given:.2f} s with the {len(prompt)} prompt frames prefilled in one pass first, "
        f"{stepped:.2f} s with them stepped, vs {plain:.2f} s without ({given / plain:.2f}x and "
        f"{stepped / plain:.2f}x) for the same {steps} generated frames"
    )


if __name__ == "__main__":
    main()
