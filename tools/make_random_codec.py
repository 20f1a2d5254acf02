"""Builds a usable, randomly initialised EnCodec 24 kHz for machines without the pretrained weights.

    python -m tools.make_random_codec OUT_DIR --audio AUDIO_DIR [--files N] [--seed S]

Its RVQ codebooks are filled with encoder frames of real audio (a fresh EnCodec maps everything to
code 0), so it yields varied codes and decodes to audio. That audio is NOT speech: use it for
tests and demos only. OUT_DIR then works as `--codec-dir` everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.common import find_files, setup_logging
from valle_jax.audio import AUDIO_SUFFIXES, AudioError, load_audio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_random_codec", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--audio", type=Path, required=True, help="folder of real audio to fill the codebooks from")
    p.add_argument("--files", type=int, default=16, help="audio files used (default 16, spread over the folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging()
    files = find_files(args.audio, AUDIO_SUFFIXES)
    if not files:
        p.error(f"no audio files under {args.audio}")
    step = max(1, len(files) // args.files)
    wavs = []
    for f in files[::step][: args.files]:
        try:
            wavs.append(load_audio(f))
        except AudioError as e:
            print(f"make_random_codec: skipped {e}", file=sys.stderr)
    from valle_jax.codec import build_random_codec  # noqa: PLC0415 - optional heavy dependency: torch (codec)

    out = build_random_codec(wavs, args.out_dir, args.seed)
    print(f"make_random_codec: random EnCodec written to {out} (from {len(wavs)} files); its audio is not speech")
    return 0


if __name__ == "__main__":
    sys.exit(main())
