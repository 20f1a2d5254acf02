"""Quantize speed: seconds of audio encoded per second, tools.quantize vs EnCodec's own forward.

    python benchmarks/quantize_speed.py [--voices 8] [--sentences 12] [--codec-dir DIR]

Builds the demo corpus in a temp dir (or reuses --corpus), a random codec unless --codec-dir is
given (same network, same cost as the pretrained one), then times (a) the plain
`EncodecModel.encode` one file at a time, the ceiling the task set, and (b) `tools.quantize` end
to end (file reading, resampling, batching, writing). Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--voices", type=int, default=8)
    p.add_argument("--sentences", type=int, default=12)
    p.add_argument("--codec-dir", type=Path, default=None)
    p.add_argument("--batch-seconds", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from tools import make_demo_corpus, quantize
    from tools.common import find_files
    from valle_jax.audio import load_audio
    from valle_jax.codec import Codec, build_random_codec

    tmp = Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    corpus = args.corpus or tmp / "corpus"
    if args.corpus is None:
        make_demo_corpus.build(corpus, args.voices, args.sentences)
    files = find_files(corpus, (".wav",))
    wavs = [load_audio(f) for f in files]
    seconds = sum(len(w) for w in wavs) / 24000
    codec_dir = args.codec_dir or build_random_codec(wavs[::6][:16], tmp / "codec")
    codec = Codec.load(codec_dir)
    print(f"{len(files)} files, {seconds:.1f} s of audio; torch threads {torch.get_num_threads()}")

    raw = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            for w in wavs:
                codec.model.encode(torch.from_numpy(w)[None, None])
        raw.append(seconds / (time.perf_counter() - start))
    tool = []
    for r in range(args.repeats):
        out = tmp / f"codes{r}"
        start = time.perf_counter()
        report = quantize.quantize_dir(corpus, out, codec, args.batch_seconds, progress=False)
        tool.append(seconds / (time.perf_counter() - start))
        assert report.done == len(files) and not report.failed
    print(
        f"EnCodec encode, one file per call : {statistics.median(raw):6.1f}x real time"
        f" (runs {np.round(raw, 1).tolist()})"
    )
    print(
        f"tools.quantize (batch {args.batch_seconds:g} s)    : {statistics.median(tool):6.1f}x real time"
        f" (runs {np.round(tool, 1).tolist()})"
    )


if __name__ == "__main__":
    main()
