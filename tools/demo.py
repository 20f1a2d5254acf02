"""The quick-start job (`make demo`): from nothing to batches, on a small built-in corpus.

    python -m tools.demo [--out demo_out] [--voices 8] [--sentences 12]

1. synthesise a multi-speaker corpus with espeak-ng (tools.make_demo_corpus);
2. load EnCodec: the pretrained weights when they can be had, else a random codec built from the
   corpus (said plainly: its audio is not speech);
3. quantize, phonemize and pack it into a store;
4. draw batches through the grain pipeline with configs/demo.py;
5. train the tiny demo model on it for a few minutes (python -m valle_jax.train), then plot its loss;
6. synthesise a sentence in a held-out voice (python -m valle_jax.synthesize).
Every step reuses what an earlier run finished (training resumes), so running it again is quick.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tools import make_demo_corpus, pack, phonemize, quantize
from tools.common import find_files, setup_logging
from valle_jax.audio import load_audio

BANNER = "=" * 78
DEMO_TEXT = "The little boat drifted toward the harbor."


def step(title: str) -> None:
    print(f"\n{BANNER}\n{title}\n{BANNER}", flush=True)


def get_codec(out: Path, corpus: Path, codec_dir: Path | None = None):
    """(codec, its directory or None for the pretrained weights)."""
    from valle_jax.codec import Codec, CodecUnavailable, build_random_codec  # noqa: PLC0415 - optional heavy dependency: torch (codec)

    if codec_dir is not None:
        return Codec.load(codec_dir), codec_dir
    codec_dir = out / "codec"
    if (codec_dir / "codec_info.json").exists():
        print(f"reusing the random codec in {codec_dir}")
        return Codec.load(codec_dir), codec_dir
    try:
        codec = Codec.load(None)
        print("using the pretrained EnCodec 24 kHz weights")
        return codec, None
    except CodecUnavailable as e:
        print(f"pretrained EnCodec unavailable: {e}\n")
    wavs = [load_audio(f) for f in find_files(corpus, (".wav",))[::6][:16]]
    build_random_codec(wavs, codec_dir)
    print(
        f"NOTE: built a RANDOM EnCodec in {codec_dir} (no network for the pretrained weights).\n"
        "      Its codes are real and varied, but any audio decoded with it will NOT be speech."
    )
    return Codec.load(codec_dir), codec_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--voices", type=int, default=8)
    p.add_argument("--sentences", type=int, default=12)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.py's)")
    p.add_argument(
        "--codec-dir",
        type=Path,
        default=None,
        help="EnCodec weights folder (default: pretrained if reachable, else a random codec)",
    )
    args = p.parse_args(argv)
    setup_logging()
    corpus, store = args.out / "corpus", args.out / "store"
    t0 = time.perf_counter()

    step(f"1/6 demo corpus: {args.voices} espeak-ng voices x {args.sentences} sentences -> {corpus}")
    if make_demo_corpus.build(corpus, args.voices, args.sentences).finish():
        return 1

    step("2/6 quantize (EnCodec 24 kHz, 8 levels, 75 frames/s)")
    codec, codec_dir = get_codec(args.out, corpus, args.codec_dir)
    if quantize.quantize_dir(corpus, corpus, codec).finish():
        return 1

    step("3/6 phonemize (espeak-ng) and pack into a store")
    if phonemize.phonemize_dir(corpus, corpus).finish():
        return 1
    if pack.pack([corpus], store, overwrite=True).finish():
        return 1

    step("4/6 draw batches through the grain pipeline (configs/demo.py)")
    rc = subprocess.call(
        [
            sys.executable,
            "-m",
            "tools.draw_batches",
            "--config",
            "configs/demo.py",
            f"--config.data.store={store}",
            "--batches",
            "16",
            "--alsologtostderr=false",
        ]
    )
    if rc:
        return rc

    run = args.out / "run"
    step(f"5/6 train the tiny model (python -m valle_jax.train --config configs/demo.py --workdir {run})")
    train = [
        sys.executable,
        "-m",
        "valle_jax.train",
        "--config",
        "configs/demo.py",
        f"--workdir={run}",
        f"--config.data.store={store}",
        "--commands=off",
    ]
    if args.steps is not None:
        train.append(f"--config.train.steps={args.steps}")
    if codec_dir is not None:  # the evaluation's audio samples decode with the same codec
        train.append(f"--config.train.eval_codec_dir={codec_dir}")
    rc = subprocess.call(train)
    if rc:
        return rc
    from valle_jax.plot import plot  # noqa: PLC0415 - optional heavy dependency: matplotlib (plot)

    png = plot(run, run / "loss.png", ys=("loss", "acc", "val_loss"), smooth=2.0)

    voice = make_demo_corpus.held_out_voice(args.out / "held_out_voice.wav", args.voices)
    speech = args.out / "demo_speech.wav"
    synth = [
        sys.executable,
        "-m",
        "valle_jax.synthesize",
        DEMO_TEXT,
        str(voice),
        "--checkpoint",
        str(run),
        "--out",
        str(speech),
        "--max-ar-steps",
        "300",
        "--ar-temp",
        "0.9",
        "--nar-temp",
        "0.5",
    ]
    if codec_dir is not None:
        synth += ["--codec-dir", str(codec_dir)]
    step(
        f"6/6 synthesise in a held-out voice ({voice}):\n    python -m valle_jax.synthesize "
        + " ".join(f'"{a}"' if " " in a else a for a in synth[3:])
    )
    rc = subprocess.call(synth)
    if rc:
        return rc
    print(
        f"\ndemo finished in {time.perf_counter() - t0:.0f} s: corpus {corpus}, store {store}, run {run}\n"
        f"  speech:       {speech} (held-out voice {voice}; the tiny model trained for minutes mumbles)\n"
        f"  loss plot:    {png}\n"
        f"  eval samples: {run / 'samples'} (validation texts synthesised during training)\n"
        f"  TensorBoard:  .venv/bin/tensorboard --logdir {run / 'tb'}\n"
        f"  metrics:      {run / 'metrics.jsonl'}"
        f" (python -m valle_jax.plot --workdir {run} --ys loss,acc --out FILE.png)\n"
        f"  export:       python -m valle_jax.export --workdir {run} --out {args.out / 'model'}"
        + (
            "\nreminder: the codec is RANDOM here; audio decoded from these codes is not speech"
            if codec.is_random
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
