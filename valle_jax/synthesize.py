"""Text to speech from the command line.

    python -m valle_jax.synthesize TEXT REFERENCE[;REFERENCE...] --out OUT.wav --checkpoint PATH [flags]
    python -m valle_jax.synthesize REFERENCE --text-file LINES.txt --out OUT_DIR --checkpoint PATH [flags]

PATH is a model directory (valle_jax.export, tools.convert_reference), a training directory (its
latest checkpoint) or a reference checkpoint (.pth). The sampling flags are the reference's
(reference.md §4.8), with the same defaults. TEXT is split into sentences of at most --max-phonemes
phonemes, decoded as one batch in the same voice and joined with --pause seconds of silence into
OUT (--no-split: one utterance per line). OUT's suffix picks the format (.wav, .flac, .ogg, .opus,
.mp3); `--out -` writes WAV to stdout and everything else to stderr. --text-file writes one file
per non-empty line (each split the same way), named by its line number (0001.wav, ...; --format),
into OUT_DIR, decoding --batch-size pieces together behind a progress bar; a line that cannot be
phonemised is reported and skipped (exit status 1). A piece for which the AR produced no frames is
reported and adds no audio (exit status 1); a file with no audio at all is not written. Files are
written atomically. Usage errors (exit status 2) are found before the model loads. --best-of N keeps
the best of N candidates per piece (valle_jax.best_of); --verbose prints every candidate's scores.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from valle_jax import audio_io, sources, text_split
from valle_jax import best_of as B
from valle_jax.audio import SAMPLE_RATE, AudioError
from valle_jax.checkpointing import CheckpointError
from valle_jax.data.text import TextError
from valle_jax.decoding import DecodeError, Settings
from valle_jax.hub import HubError
from valle_jax.models.convert import ConversionError
from valle_jax.runtime import use_cpu_xla_flags
from valle_jax.tts import TTS, VOCODERS, EmptyAudioWarning

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
        "--out",
        "--out-path",
        dest="out",
        type=Path,
        required=True,
        help="output audio file, its format from the suffix, or - for WAV on stdout (a directory with --text-file)",
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
    add_vocoder_flags(p)
    p.add_argument("--text-file", type=Path, default=None, help="one utterance per line, one wav each")
    p.add_argument(
        "--format",
        choices=[s.lstrip(".") for s in audio_io.OUTPUT_FORMATS],
        default="wav",
        help="file format of --text-file's outputs (default wav)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pieces decoded together (default: all of TEXT's; 8 with --text-file)",
    )
    p.add_argument("--no-split", dest="split", action="store_false", help="one utterance per line, not per sentence")
    p.add_argument(
        "--max-phonemes",
        type=int,
        default=text_split.DEFAULT_MAX_PHONEMES,
        help=f"phonemes per piece at most when splitting (default {text_split.DEFAULT_MAX_PHONEMES})",
    )
    p.add_argument(
        "--pause",
        type=float,
        default=audio_io.DEFAULT_PAUSE,
        help=f"seconds of silence between pieces (default {audio_io.DEFAULT_PAUSE})",
    )
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
    p.add_argument(
        "--best-of", type=int, default=1, help="decode N candidates per line in one batch, keep the best (default 1)"
    )
    p.add_argument(
        "--best-of-asr",
        default="pocketsphinx",
        help="ranks --best-of candidates by WER with this ASR (pocketsphinx, whisper), then speaker similarity; "
        "none: by mean AR log-probability",
    )
    p.add_argument("--verbose", action="store_true", help="print every --best-of candidate's scores")
    p.add_argument("--repetition-aware", action="store_true", help="VALL-E 2 repetition-aware sampling (AR)")
    p.add_argument(
        "--sign-blind-penalties",
        action="store_true",
        help="the reference's penalties, which can make negative logits likelier",
    )
    return p


def add_vocoder_flags(p: argparse.ArgumentParser) -> None:
    """--vocoder, --vocoder-dir, --codec-device (the synthesis command, the server and the web UI)."""
    p.add_argument(
        "--vocoder",
        choices=VOCODERS,
        default="encodec",
        help="codes to audio: EnCodec's decoder, or Vocos (the reference's default; valle_jax.vocoder)",
    )
    p.add_argument(
        "--vocoder-dir",
        type=Path,
        default=None,
        help="folder holding config.yaml and pytorch_model.bin of charactr/vocos-encodec-24khz "
        "(default: the Hugging Face cache)",
    )
    p.add_argument("--codec-device", default="cpu", help="torch device of the codec and vocoder (e.g. cuda)")


def vocoder_options(args: argparse.Namespace) -> dict:
    return dict(vocoder=args.vocoder, vocoder_dir=args.vocoder_dir, codec_device=args.codec_device)


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
        B.check_best_of(args.best_of, Settings(**sampling), args.best_of_asr)
        TTS.check_prompt_length(args.input_prompt_length)
        TTS.check_language(args.language)
    except (DecodeError, AudioError, TextError) as e:
        return str(e)
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.max_phonemes < 1:
        return f"--max-phonemes must be >= 1, got {args.max_phonemes}"
    if not (0 <= args.pause < float("inf")):
        return f"--pause must be a finite number of seconds >= 0, got {args.pause}"
    if args.text_file is not None and str(args.out) == audio_io.STDOUT:
        return "--out - (stdout) takes one TEXT, not --text-file (whose --out is a directory)"
    if args.text_file is None:
        try:
            audio_io.output_format(args.out)
        except AudioError as e:
            return str(e)
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
    from valle_jax.vocoder import VocoderUnavailable  # noqa: PLC0415 - optional heavy dependency: torch

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
    to_stdout = str(args.out) == audio_io.STDOUT
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
            **vocoder_options(args),
        )
        tts.trim = not args.no_trim
        if args.vocoder == "vocos":
            tts.vocos  # noqa: B018 - loaded now: missing weights are an error before any decoding
        voice = tts.prompt(reference, args.input_prompt_length)
        info = sys.stderr if to_stdout else sys.stdout  # stdout carries only the WAV then
        print(
            f"model {args.checkpoint} ({tts.cfg.arch}, d={tts.cfg.d_model}, {tts.cfg.n_layers} layers); "
            f"voice {voice.seconds:.2f} s",
            file=info,
            flush=True,
        )
        t1 = time.perf_counter()

        def pieces_of(text: str) -> list[str]:
            return tts.split(text, args.language, args.max_phonemes) if args.split else TTS.lines(text)

        if args.text_file is not None:
            good = []  # (line number, its pieces)
            for n, line in lines:  # a line that cannot be phonemised is reported and skipped
                try:
                    pieces = pieces_of(line)
                    for piece in pieces:
                        tts.text_ids(piece, args.language)
                    good.append((n, pieces))
                except TextError as e:
                    print(f"error: {args.text_file} line {n}: {e} (skipped)", file=sys.stderr)
            skipped = len(lines) - len(good)
            if not good:
                raise TextError(f"{args.text_file}: no line could be synthesised")
            args.out.mkdir(parents=True, exist_ok=True)
            suffix = f".{args.format}"
            outputs = [(args.out / f"{n:04d}{suffix}", pieces) for n, pieces in good]
            named = [f"{args.text_file} line {n}" for n, _ in good]
        else:
            skipped = 0
            outputs = [(args.out, pieces_of(text))]
            named = ["TEXT"]
        texts = [piece for _, pieces in outputs for piece in pieces]
        names = [
            f"{name} piece {k} ({piece[:30]!r})" if len(pieces) > 1 else name
            for name, (_, pieces) in zip(named, outputs)
            for k, piece in enumerate(pieces, 1)
        ]
        batch_size = args.batch_size or (8 if args.text_file is not None else len(texts))
        if args.best_of > 1:
            parts = best_of_parts(tts, texts, names, voice, args, sampling, info)
        else:
            with tqdm(
                total=len(texts), unit="piece", desc="synthesising", disable=args.text_file is None, file=sys.stderr
            ) as bar:
                parts = tts.synthesize_batch(
                    texts,
                    [voice] * len(texts),
                    language=args.language,
                    input_prompt_length=0.0,  # the voice is already trimmed
                    batch_size=batch_size,
                    progress=bar.update,
                    **sampling,
                )
        seconds = time.perf_counter() - t1
        empty = [name for name, wav in zip(names, parts) if len(wav) == 0]
        for name in empty:  # never a silent empty file: the piece is reported and adds nothing
            print(f"warning: {name}: the AR produced no frames (the stop token came first)", file=sys.stderr)
        written, start = [], 0
        for path, pieces in outputs:
            wav = audio_io.join(parts[start : start + len(pieces)], args.pause, tts.sample_rate)
            start += len(pieces)
            if len(wav):
                written.append((path, wav))
            elif args.text_file is not None:
                print(f"warning: {path.name}: no audio, so no {args.format} written for it", file=sys.stderr)
            else:
                print(f"error: no audio was generated: {path} not written", file=sys.stderr)
        for path, wav in written:
            if str(path) != audio_io.STDOUT:
                path.parent.mkdir(parents=True, exist_ok=True)
            tts.save(path, wav)
        audio = sum(len(w) for _, w in written) / SAMPLE_RATE
        print(
            f"wrote {len(written)} file(s), {audio:.2f} s of audio, in {seconds:.2f} s including compilation "
            f"(load {t1 - t0:.1f} s; real-time factor {seconds / max(audio, 1e-9):.2f}): "
            f"{'stdout' if to_stdout else args.out}"
            + (f"; {skipped} line(s) skipped" if skipped else "")
            + (f"; {len(empty)} piece(s) without audio" if empty else ""),
            file=info,
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
        VocoderUnavailable,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def best_of_parts(tts: TTS, texts: list[str], names: list[str], voice, args, sampling: dict, info) -> list:
    """Each piece's best of --best-of candidates (--verbose: every candidate's scores on `info`, stdout
    unless the audio goes there)."""
    parts = []
    for name, text in zip(names, texts):
        (pick,) = tts.best_of(
            text, voice, args.best_of, asr=args.best_of_asr, language=args.language, input_prompt_length=0.0, **sampling
        )
        if args.verbose:
            print(f"{name}: " + "\n".join(pick.report()), file=info, flush=True)
        parts.append(pick.wav)
    return parts


if __name__ == "__main__":
    use_cpu_xla_flags()  # before JAX starts (see valle_jax/runtime.py)
    sys.exit(main())
