"""The PyTorch reference's decoding cost on this machine: the baseline for decode.py.

    python benchmarks/reference_decode.py [--sizes half] [--prompt-seconds 3] [--audio-seconds 5] [--samples 6]

Needs HF transformers 4.40 (see reference_train_step.py, whose model it uses: the reference's AR_NAR
llama, checked against the golden logits by tests/test_reference_baseline.py). As the reference
decodes (reference.md §4.4-§4.5), every AR step is a full forward pass over text + prompt + the frames so
far (no cache), batch 1, under torch.inference_mode; the 7 NAR levels are 7 full passes. The AR is
timed at --samples response lengths spread over 0..R-1 (R = audio_seconds x 75), each the best of
two passes, and its total is the sum over all R steps of the interpolated per-step time; the NAR
levels are timed whole. Text: decode.py's TEXT_LEN phonemes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from decode import TEXT_LEN


def child(args) -> dict:
    import numpy as np
    import torch
    from reference_train_step import N_LEVELS, N_TOKENS, build

    torch.manual_seed(0)
    model = build(args.size, torch, torch.nn).eval()
    r_total, p_len = int(round(75 * args.audio_seconds)), int(round(75 * args.prompt_seconds))
    rng = np.random.default_rng(0)
    text = torch.from_numpy(rng.integers(3, 200, TEXT_LEN)).long()
    lang = torch.zeros(1, dtype=torch.long)
    prom = torch.from_numpy(rng.integers(0, N_TOKENS, (p_len, N_LEVELS))).long()
    resp = torch.from_numpy(rng.integers(0, N_TOKENS, (r_total, N_LEVELS))).long()

    def timed(fn):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    with torch.inference_mode():
        model.inference_logits(text, lang, prom, resp[:8], 0)  # warm-up
        lengths = np.linspace(0, r_total - 1, args.samples).round().astype(int)
        step_s = [
            timed(lambda n=n: model.inference_logits(text, lang, prom, resp[:n], 0)[-1].argmax()) for n in lengths
        ]
        ar_s = float(np.interp(np.arange(r_total), lengths, step_s).sum())
        t0 = time.perf_counter()
        for level in range(1, N_LEVELS):
            model.inference_logits(text, lang, prom, resp[:, :level], level)[-r_total:].argmax(-1)
        nar_s = time.perf_counter() - t0
    return {
        "impl": "reference (PyTorch, HF LlamaModel, no cache)",
        "size": args.size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ar_steps": r_total,
        "prompt_frames": p_len,
        "text": TEXT_LEN,
        "sampled_lengths": lengths.tolist(),
        "step_s": [round(t, 4) for t in step_s],
        "ar_s": ar_s,
        "ar_steps_per_s": r_total / ar_s,
        "nar_s": nar_s,
        "rtf": (ar_s + nar_s) / args.audio_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def spawn(size: str, prompt_seconds: float, audio_seconds: float, samples: int = 6) -> dict:
    from child import run_child

    return run_child(
        __file__,
        [
            "--size",
            size,
            "--prompt-seconds",
            str(prompt_seconds),
            "--audio-seconds",
            str(audio_seconds),
            "--samples",
            str(samples),
        ],
        f"reference decoding ({size})",
        tcmalloc=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="half")
    p.add_argument("--size", default="half", help=argparse.SUPPRESS)
    p.add_argument("--prompt-seconds", type=float, default=3.0)
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--samples", type=int, default=6, help="AR step lengths timed (interpolated in between)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    for size in args.sizes.split(","):
        r = spawn(size, args.prompt_seconds, args.audio_seconds, args.samples)
        print(
            f"reference {size}: AR {r['ar_s']:.1f} s for {r['ar_steps']} steps ({r['ar_steps_per_s']:.2f} steps/s; "
            f"{1e3 * r['step_s'][0]:.0f} -> {1e3 * r['step_s'][-1]:.0f} ms per step), NAR {r['nar_s']:.2f} s for 7 "
            f"levels, RTF {r['rtf']:.1f} ({args.audio_seconds:g} s of audio, {args.prompt_seconds:g} s prompt)"
        )
        print("  " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
