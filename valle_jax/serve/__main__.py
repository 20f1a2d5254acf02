"""python -m valle_jax.serve --checkpoint PATH [--host --port --max-batch --max-wait-ms ...]

Loads the model once, compiles the default buckets (--warm-up), and serves the HTTP API of
valle_jax.serve.app with uvicorn. SIGTERM (or Ctrl-C) stops taking connections, answers the requests
already taken (the batcher drains its queue) and exits 0. Several machines: run one replica per machine
or accelerator behind a load balancer (docs/serving.md); voice ids are content hashes, and --voice-dir on
shared storage lets every replica find a voice another one encoded.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import torch
import uvicorn

from valle_jax import best_of as B
from valle_jax.checkpointing import CheckpointError
from valle_jax.codec import CodecUnavailable
from valle_jax.decoding import Settings
from valle_jax.runtime import use_cpu_xla_flags
from valle_jax.serve.app import Limits, Metrics, create_app
from valle_jax.serve.engine import VOCODER_THREADS, Engine
from valle_jax.serve.voices import VoiceStore
from valle_jax.synthesize import add_vocoder_flags, vocoder_options
from valle_jax.tts import TTS
from valle_jax.vocoder import VocoderUnavailable

log = logging.getLogger("valle_jax.serve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m valle_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="model directory, training directory or .pth")
    p.add_argument("--codec-dir", type=Path, default=None, help="EnCodec weights folder")
    add_vocoder_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a request waits for batch-mates")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests past which the server answers 429")
    p.add_argument("--max-text-chars", type=int, default=1000)
    p.add_argument("--max-audio-seconds", type=float, default=30.0, help="reference audio in, generated audio out")
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument(
        "--max-best-of", type=int, default=B.MAX_BEST_OF, help="candidates a best_of request may ask for at most"
    )
    p.add_argument(
        "--best-of-asr",
        default="pocketsphinx",
        help="what ranks best_of candidates: an ASR for WER then speaker similarity (pocketsphinx: offline, its "
        "model ships in its wheel; a missing library falls back with a warning), or none: the mean AR "
        "log-probability alone",
    )
    p.add_argument("--voice-dir", type=Path, default=None, help="where encoded voices are kept (shared by replicas)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--kv-dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument(
        "--warm-up",
        choices=("all", "none"),
        default="all",
        help="compile every batch bucket with the default settings before serving (all)",
    )
    p.add_argument(
        "--warm-up-steps",
        type=int,
        default=Settings().max_ar_steps,
        help="the max_ar_steps the warm-up compiles for (its step bucket; default: the default setting's)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="threads of the codec and vocoder (torch). 1: they run on the vocoder thread beside the decoder's "
        "XLA threads; more threads than cores spin against each other (2 cores, a loaded machine: an EnCodec "
        "decode of 2 s took 0.23 s with 1 thread, 1.5-2.1 s with 2)",
    )
    p.add_argument(
        "--vocoder-threads",
        type=int,
        default=VOCODER_THREADS,
        help=f"rows of a batch vocoded at once, each on its own --torch-threads (default {VOCODER_THREADS}: the "
        "tiny model's 16-row batches on 2 cores served 1.3x the requests/s of 1; docs/serving.md)",
    )
    p.add_argument("--drain-seconds", type=float, default=300.0, help="on SIGTERM, how long open requests may take")
    return p


def build(args: argparse.Namespace):
    """(app, seconds spent warming up) for the parsed command line."""
    if not 1 <= args.max_best_of <= B.MAX_BEST_OF:
        raise ValueError(f"--max-best-of must be from 1 to {B.MAX_BEST_OF}, got {args.max_best_of}")
    B.check_best_of(1, Settings(), args.best_of_asr)  # an unknown --best-of-asr: refused before the model loads
    if args.torch_threads < 1 or args.vocoder_threads < 1:
        raise ValueError(
            f"--torch-threads and --vocoder-threads must be >= 1, got {args.torch_threads}, {args.vocoder_threads}"
        )
    torch.set_num_threads(args.torch_threads)

    tts = TTS.load(
        args.checkpoint, codec_dir=args.codec_dir, dtype=args.dtype, kv_dtype=args.kv_dtype, **vocoder_options(args)
    )
    tts.codec  # noqa: B018 - loaded now: a missing codec is an error at start, not at the first request
    if args.vocoder == "vocos":
        tts.vocos  # noqa: B018
    judge = B.make_judge(args.best_of_asr)  # loaded now, not at the first best_of request
    log.info("best_of candidates are ranked by %s", judge.criteria)
    metrics = Metrics()
    limits = Limits(args.max_text_chars, args.max_audio_seconds, int(args.max_upload_mb * 2**20), args.max_best_of)
    engine = Engine(
        tts, args.max_batch, args.max_wait_ms, args.max_queue, metrics.observer(), judge, args.vocoder_threads
    )
    voices = VoiceStore(tts, args.voice_dir, max_audio_seconds=args.max_audio_seconds)
    warm = engine.warm_up(settings=Settings(max_ar_steps=args.warm_up_steps)) if args.warm_up == "all" else 0.0
    return create_app(engine, voices, limits, metrics), warm


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    try:
        app, warm = build(args)
    except (CheckpointError, CodecUnavailable, VocoderUnavailable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "ready in %.1f s (warm-up %.1f s); serving on http://%s:%d",
        time.perf_counter() - t0,
        warm,
        args.host,
        args.port,
    )
    # uvicorn answers SIGTERM by draining, then raises the signal again under the handler it found: with
    # Python's default that kills the process (status -15). Ours records it, so a drained server exits 0.
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stopped.append(number))
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.drain_seconds, log_level="warning")
    log.info("stopped%s; the queue is drained", f" by signal {stopped[0]}" if stopped else "")
    return 0


if __name__ == "__main__":
    use_cpu_xla_flags()  # before JAX starts (see valle_jax/runtime.py)
    sys.exit(main())
