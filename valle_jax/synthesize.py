"""Text to speech from the command line.

    python -m valle_jax.synthesize TEXT REFERENCE[;REFERENCE...] --out OUT.wav --checkpoint PATH [flags]
    python -m valle_jax.synthesize REFERENCE --text-file LINES.txt --out OUT_DIR --checkpoint PATH [flags]

PATH is a model directory (valle_jax.export, tools.convert_reference), a training directory (its
latest checkpoint) or a reference checkpoint (.pth). The sampling flags are the reference's
(reference.md §4.8), with the same defaults. A multi-line TEXT is synthesised line by line and the lines
are concatenated into OUT.wav; --text-file writes one wav per non-empty line, named by its line
number (0001.wav, ...), into OUT_DIR, decoding --batch-size lines together; a line that cannot be
phonemised is reported and skipped (exit status 1). A line for which the AR produced no frames is
reported and gets no wav (exit status 1): with TEXT, OUT.wav holds the other lines, and is not
written when none has audio. Files are written atomically. Usage errors (exit status 2) are found
before the model loads.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from valle_jax import sources
from valle_jax.audio import SAMPLE_RATE, AudioError, write_wav
from valle_jax.checkpointing import CheckpointError
from valle_jax.data.text import TextError
from valle_jax.decoding import DecodeError, Settings
from valle_jax.hub import HubError
from valle_jax.models.convert import ConversionError
from valle_jax.runtime import use_cpu_xla_flags
from valle_jax.tts import TTS, EmptyAudioWarning

# flag -> (Settings field, type, help); defaults come from Settings itself
SAMPLING_FLAGS = {
    "--max-ar-steps": ("max_ar_steps", int, "AR frames at most (75 per second)"),
    "--max-nar-levels": ("max_nar_levels", int, "NAR levels after the AR (0: all, as the reference)"),
    "--max-ar-context": ("max_ar_context", int, "> 0: the AR sees only its last N frames"),
    "--ar-temp": ("ar_temp", float, "AR temperature (0: greedy)"),
    "--nar-temp": ("nar_temp", float, "NAR temperature (0: greedy)"),
    "--min-ar-temp": ("min_ar_temp", float, ">= 0: dynamic AR temperature down to this"),
    "--min-nar-temp": ("min_nar_temp", float, ">= 0: dynamic NAR temperature down to this"),
    "--top-p": ("top_p", float, "nucleus sampling (1: off)"),
    "--top-k": ("top_k", int, "top-k sampling (0: off)"),
    "--min-p": ("min_p", float, "min-p sampling (0: off)"),
    "--repetition-penalty": ("repetition_penalty", float, "(1: off)"),
    "--repetition-penalty-decay": ("repetition_penalty_decay", float, "penalty grows with distance^decay"),
    "--length-penalty": ("length_penalty", float, "penalises stopping early (0: off)"),
    "--min-ar-steps": (
        "min_ar_steps",
        int,
        "AR frames before the stop token may end an utterance (-1: 1.25 per phoneme of its text; 0: off)",
    ),
    "--beam-width": ("beam_width", int, "> 1: beam search for the AR"),
    "--length-normalization": (
        "length_normalization",
        float,
        "beams rank by summed log-probability / tokens**this (0: the reference's plain sums)",
    ),
    "--mirostat-tau": ("mirostat_tau", float, "> 0: mirostat for the AR, target surprise in bits"),
    "--mirostat-eta": ("mirostat_eta", float, "mirostat learning rate"),
    "--ras-window": ("ras_window", int, "repetition-aware sampling window (frames)"),
    "--ras-threshold": ("ras_threshold", float, "repetition-aware sampling threshold"),
    "--seed": ("seed", int, "random seed"),
}


def parser() -> argparse.ArgumentParser:
    defaults = Settings()
    p = argparse.ArgumentParser(
        prog="python -m valle_jax.synthesize",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "positional",
        nargs="+",
        metavar="TEXT REFERENCE",
        help="the text and the reference audio (';'-separated files, or a voice file of python -m valle_jax.voice); "
        "with --text-file only REFERENCE",
    )
    p.add_argument(
        "--out", "--out-path", dest="out", type=Path, required=True, help="output wav (or directory, with --text-file)"
    )
    p.add_argument(
        "--checkpoint",
        "--ar-ckpt",
        dest="checkpoint",
        type=str,
        required=True,
        help="model directory, training directory, reference .pth or hf://OWNER/REPO[/PATH][@REV]",
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a training directory (default: latest)")
    p.add_argument("--lora", default=None, help="a LoRA adapter directory (valle_jax.export of a LoRA run) to apply")
    p.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads of a reference .pth whose width is not a reference preset",
    )
    p.add_argument(
        "--codec-dir",
        type=Path,
        default=None,
        help="EnCodec weights folder (default: the encodec package's pretrained weights)",
    )
    p.add_argument("--text-file", type=Path, default=None, help="one utterance per line, one wav each")
    p.add_argument("--batch-size", type=int, default=8, help="utterances decoded together")
    p.add_argument("--language", default="en")
    p.add_argument("--input-prompt-length", type=float, default=3.0, help="seconds of reference kept (0: all)")
    p.add_argument(
        "--no-trim",
        action="store_true",
        help="encode the reference as it is (default: trim its silences and normalise its loudness first)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute and weight dtype")
    p.add_argument(
        "--kv-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="the AR's key/value cache (default: the model's dtype; bfloat16 halves what each step reads "
        "from it, which matters from batch 8 on)",
    )
    for flag, (field, typ, text) in SAMPLING_FLAGS.items():
        p.add_argument(
            flag,
            dest=field,
            type=typ,
            default=getattr(defaults, field),
            help=f"{text} (default {getattr(defaults, field)})",
        )
    p.add_argument("--repetition-aware", action="store_true", help="VALL-E 2 repetition-aware sampling (AR)")
    p.add_argument(
        "--sign-blind-penalties",
        action="store_true",
        help="the reference's penalties, which can make negative logits likelier",
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the warning machinery for in-process callers
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=EmptyAudioWarning)  # run() names the file and line instead
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr, flush=True)
        return run(args)


def usage_error(args: argparse.Namespace, sampling: dict, text: str | None) -> str | None:
    """What makes the command line unusable, found before any model, codec or audio loads (None:
    nothing): every sampling setting (finite, in range), the prompt length, the language, the sizes,
    the paths."""
    try:
        Settings(**sampling)
        TTS.check_prompt_length(args.input_prompt_length)
        TTS.check_language(args.language)
    except (DecodeError, AudioError, TextError) as e:
        return str(e)
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.step is not None and args.step < 0:
        return f"--step must be >= 0, got {args.step}"
    if args.heads is not None and args.heads < 1:
        return f"--heads must be >= 1, got {args.heads}"
    if text is not None and not text.strip():
        return "empty text: nothing to synthesise"
    if not sources.exists(args.checkpoint):
        return f"{args.checkpoint}: checkpoint not found"
    if args.text_file is not None and not args.text_file.is_file():
        return f"{args.text_file}: text file not found"
    return None


def run(args: argparse.Namespace) -> int:
    from valle_jax.codec import CodecUnavailable  # noqa: PLC0415 - optional heavy dependency: torch (codec)

    if args.text_file is not None:
        if len(args.positional) != 1:
            print("error: with --text-file give only REFERENCE", file=sys.stderr)
            return 2
        reference = args.positional[0]
    elif len(args.positional) != 2:
        print("error: expected TEXT REFERENCE", file=sys.stderr)
        return 2
    else:
        text, reference = args.positional
    sampling = {field: getattr(args, field) for field, _, _ in SAMPLING_FLAGS.values()}
    sampling.update(repetition_aware=args.repetition_aware, sign_aware_penalties=not args.sign_blind_penalties)
    problem = usage_error(args, sampling, None if args.text_file is not None else text)
    if problem:  # a usage error: exit status 2, before anything heavy loads
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.text_file is not None:  # (line number, text) of the non-empty lines
            lines = [
                (n, line.strip())
                for n, line in enumerate(args.text_file.read_text("utf-8").splitlines(), 1)
                if line.strip()
            ]
            if not lines:
                raise TextError(f"{args.text_file}: no text")
        # the voice's files, checked before the model loads
        TTS.read_references(reference, args.input_prompt_length, trim=not args.no_trim)
        t0 = time.perf_counter()
        tts = TTS.load(
            args.checkpoint,
            codec_dir=args.codec_dir,
            dtype=args.dtype,
            step=args.step,
            heads=args.heads,
            kv_dtype=args.kv_dtype,
            lora=args.lora,
        )
        tts.trim = not args.no_trim
        voice = tts.prompt(reference, args.input_prompt_length)
        print(
            f"model {args.checkpoint} ({tts.cfg.arch}, d={tts.cfg.d_model}, {tts.cfg.n_layers} layers); "
            f"voice {voice.seconds:.2f} s",
            flush=True,
        )
        t1 = time.perf_counter()
        skipped = 0
        if args.text_file is not None:
            good = []
            for n, line in lines:  # a line that cannot be phonemised is reported and skipped
                try:
                    tts.text_ids(line, args.language)
                    good.append((n, line))
                except TextError as e:
                    print(f"error: {args.text_file} line {n}: {e} (skipped)", file=sys.stderr)
            skipped = len(lines) - len(good)
            if not good:
                raise TextError(f"{args.text_file}: no line could be synthesised")
            args.out.mkdir(parents=True, exist_ok=True)
            texts = [line for _, line in good]
            names = [f"{args.text_file} line {n}" for n, _ in good]
        else:
            texts = TTS.lines(text)
            names = [f"TEXT line {k}" for k in range(1, len(texts) + 1)] if len(texts) > 1 else ["TEXT"]
        parts = tts.synthesize_batch(
            texts,
            [voice] * len(texts),
            language=args.language,
            input_prompt_length=0.0,  # the voice is already trimmed
            batch_size=args.batch_size,
            **sampling,
        )
        seconds = time.perf_counter() - t1
        empty = [name for name, wav in zip(names, parts) if len(wav) == 0]
        for name in empty:  # never a silent empty wav: the line is reported and gets none
            print(
                f"warning: {name}: the AR produced no frames (the stop token came first); "
                + ("no wav written for it" if args.text_file is not None else f"nothing of it in {args.out}"),
                file=sys.stderr,
            )
        if args.text_file is not None:
            written = [(args.out / f"{n:04d}.wav", wav) for (n, _), wav in zip(good, parts) if len(wav)]
        else:
            kept = [wav for wav in parts if len(wav)]
            written = [(args.out, np.concatenate(kept))] if kept else []
            if not kept:
                print(f"error: no audio was generated: {args.out} not written", file=sys.stderr)
        for path, wav in written:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, wav)
        audio = sum(len(w) for _, w in written) / SAMPLE_RATE
        print(
            f"wrote {len(written)} file(s), {audio:.2f} s of audio, in {seconds:.2f} s including compilation "
            f"(load {t1 - t0:.1f} s; real-time factor {seconds / max(audio, 1e-9):.2f}): "
            f"{args.out}"
            + (f"; {skipped} line(s) skipped" if skipped else "")
            + (f"; {len(empty)} line(s) without audio" if empty else "")
        )
        return 1 if skipped or empty else 0
    except (
        TextError,
        AudioError,
        DecodeError,
        CheckpointError,
        ConversionError,
        HubError,
        CodecUnavailable,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    use_cpu_xla_flags()  # before JAX starts (see valle_jax/runtime.py)
    sys.exit(main())
