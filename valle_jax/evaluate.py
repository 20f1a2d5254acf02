"""Measuring a model's zero-shot speech on a test list (VALL-E's two protocols).

    python -m valle_jax.evaluate --checkpoint RUN_OR_MODEL --test-list test.jsonl --protocol cross \
        [--out DIR] [--asr pocketsphinx|whisper] [--batch-size 8] [--seed 0]

- `continuation`: as in the VALL-E paper, the first --prompt-seconds (3) of the utterance are the
  prompt and the text is its whole transcript; the model continues the prompt's own codes
  (decoding.Continuation: the response starts with the prompt frames, the AR takes them as its
  own output, in one pass, and samples from there on; this model family also takes them as its prompt
  input). The scored audio is the whole response, the prompt's seconds (re-synthesised from their
  codes, decoded together with the continuation) then the continuation: WER is against the whole
  transcript, MCD and the duration ratio against the whole ground truth, and speaker similarity is
  of the continuation alone (the prompt part would score itself). RTF counts generated audio only.
- `cross`: the prompt is the first --prompt-seconds of another utterance of the same speaker,
  chosen deterministically from the seed and the utterance's id.
- `--ground-truth`: no model: the test list's own recordings are scored as the output (a ceiling
  for SIM and WER; MCD 0).

Synthesis runs in batches of --batch-size with the seed `--seed + first index of the batch`,
through the public pieces of `valle_jax.TTS` (its text ids, prompts, decoder and codec), so that
the AR, NAR and codec are timed apart; compilation time (JAX's compile events) is left out of the
timings and reported on its own. OUT gets `wavs/ID.wav`, `utterances.jsonl` (one row per
utterance: scores, transcript, timing), `summary.json` and `summary.md` (mean and 95% interval per
metric) and TensorBoard scalars under `tb/` (tag `eval_PROTOCOL/METRIC`). docs/evaluation.md has
the list format, the metrics and their backends.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import soundfile as sf

from valle_jax import metrics
from valle_jax.atomic import as_path, write_text
from valle_jax.audio import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, AudioError, load_audio, write_wav
from valle_jax.checkpointing import CheckpointError
from valle_jax.codec import CodecUnavailable
from valle_jax.config import ConfigError
from valle_jax.data.text import TextError
from valle_jax.decoding import DecodeError, Knobs, Settings, make_continuation, make_inputs
from valle_jax.metrics import MetricUnavailable, Sample
from valle_jax.tensorboard import summary_writer
from valle_jax.tts import TTS

log = logging.getLogger("valle_jax.evaluate")
PROTOCOLS = ("continuation", "cross")
TIMING_KEYS = ("rtf", "ar_steps_per_s", "ar_frames_per_s")


class EvalError(ValueError):
    """A test list, an option or an input the evaluation cannot use."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    text: str
    speaker: str
    duration: float | None = None


@dataclasses.dataclass(frozen=True)
class Item:
    """One utterance to synthesise: its text and ground truth (`utt`) in the voice of `prompt`."""

    utt: Utterance
    prompt: Utterance


def read_test_list(path: str | Path) -> list[Utterance]:
    """The JSONL test list: {"audio", "text", "speaker"} per line (+ optional "id", "duration");
    audio paths relative to the list's folder."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: test list not found")
    out, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            audio, text, speaker = e["audio"], str(e["text"]), str(e["speaker"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise EvalError(f"{path}:{n}: expected a JSON object with audio, text and speaker ({err})") from None
        file = (path.parent / audio).resolve()
        if not file.is_file():
            raise EvalError(f"{path}:{n}: audio {file} not found")
        if not text.strip():
            raise EvalError(f"{path}:{n}: empty text")
        uid = str(e.get("id") or Path(audio).name.split(".")[0])
        if uid in seen:
            raise EvalError(f"{path}:{n}: id {uid!r} appears twice")
        seen.add(uid)
        out.append(Utterance(uid, file, text.strip(), speaker, e.get("duration")))
    if not out:
        raise EvalError(f"{path}: the test list is empty")
    return out


def duration(utt: Utterance) -> float:
    if utt.duration is not None:
        return float(utt.duration)
    return sf.info(str(utt.audio)).duration


def pair_prompts(utts: list[Utterance], protocol: str, seed: int, prompt_seconds: float) -> tuple[list[Item], list]:
    """(items, [(id, why skipped)]): each utterance with its prompt under `protocol`."""
    items, skipped = [], []
    by_speaker: dict[str, list[Utterance]] = {}
    for u in utts:
        by_speaker.setdefault(u.speaker, []).append(u)
    for u in utts:
        if protocol == "continuation":
            if duration(u) < prompt_seconds + TTS.MIN_PROMPT_SECONDS:
                skipped.append((u.id, f"shorter than the {prompt_seconds:g} s prompt + {TTS.MIN_PROMPT_SECONDS:g} s"))
                continue
            items.append(Item(u, u))
        else:
            others = sorted((o for o in by_speaker[u.speaker] if o.id != u.id), key=lambda o: o.id)
            if not others:
                skipped.append((u.id, f"speaker {u.speaker} has no other utterance to prompt with"))
                continue
            rng = np.random.default_rng([seed, zlib.crc32(u.id.encode())])
            items.append(Item(u, others[int(rng.integers(len(others)))]))
    return items, skipped


class CompileClock:
    """Seconds JAX spends tracing and compiling (its compile events), summed while installed."""

    def __init__(self):
        self.total = 0.0

    def __call__(self, event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):
            self.total += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *_):
        jax.monitoring.unregister_event_duration_listener(self)


@dataclasses.dataclass
class Synthesis:
    wav: np.ndarray  # continuation: the prompt's frames, then the generated ones
    stopped: bool
    frames: int  # generated frames (after the prompt's, in a continuation)
    timing: dict  # the batch's: rtf, ar_steps_per_s, ...
    given_frames: int = 0  # the continuation's prompt frames at the start of `wav`


def synthesize(
    tts: TTS,
    items: list[Item],
    settings: Settings,
    batch_size: int,
    prompt_seconds: float,
    max_length_ratio: float = 2.0,
    language: str = "en",
    continuation: bool = False,
) -> tuple[list[Synthesis], dict]:
    """Every item's waveform, in batches sorted by text length; (results, totals). `continuation`:
    each response starts with its prompt's frames (VALL-E's continuation task)."""
    lang = tts.language_id(language)
    ids = [tts.text_ids(it.utt.text, language) for it in items]
    voices: dict[Path, object] = {}
    for it in items:
        if it.prompt.audio not in voices:
            voices[it.prompt.audio] = tts.prompt(str(it.prompt.audio), prompt_seconds)
    if continuation and tts.cfg.n_prom_levels < tts.cfg.n_resp_levels:
        raise EvalError(
            f"continuation needs prompt codes of every response level ({tts.cfg.n_resp_levels}); this model's "
            f"prompts have {tts.cfg.n_prom_levels}"
        )
    given = [len(voices[it.prompt.audio].codes) if continuation else 0 for it in items]
    limits = [  # generated frames at most: the ground truth's length x ratio, less the given frames
        min(settings.max_ar_steps, max(1, math.ceil(max_length_ratio * duration(it.utt) * FRAME_RATE) - k))
        if max_length_ratio > 0
        else settings.max_ar_steps
        for it, k in zip(items, given)
    ]
    levels = 1 + settings.nar_levels(tts.cfg.n_resp_levels)
    order = sorted(range(len(items)), key=lambda i: (len(ids[i]), i))
    out: list[Synthesis | None] = [None] * len(items)
    totals = dict(compute_s=0.0, compile_s=0.0, audio_s=0.0, ar_s=0.0, nar_s=0.0, decode_s=0.0, batches=0)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = make_inputs(
            [ids[i] for i in rows],
            [voices[items[i].prompt.audio].codes for i in rows],
            [lang] * len(rows),
            tts.cfg.n_prom_levels,
        )
        s = dataclasses.replace(settings, seed=settings.seed + start)
        knobs = Knobs.of(s, len(rows))._replace(max_steps=np.array([limits[i] for i in rows], np.int32))
        cont = (
            make_continuation([voices[items[i].prompt.audio].codes for i in rows], tts.cfg.n_resp_levels)
            if continuation
            else None
        )
        k_rows = np.array([given[i] for i in rows], np.int64)  # each row's given frames
        with CompileClock() as clock:
            t0 = time.perf_counter()
            ar = tts.decoder.ar(inputs, s, knobs=knobs, continuation=cont)
            length, stopped = np.asarray(ar.length), np.asarray(ar.stopped)
            t1, c1 = time.perf_counter(), clock.total
            if int(length.max()) > 0:
                codes = np.asarray(tts.decoder.nar(inputs, ar, s, cont))
            else:
                codes = np.zeros((len(rows), 0, tts.cfg.n_resp_levels), np.int32)
            t2, c2 = time.perf_counter(), clock.total
        # a continuation's prompt frames are decoded with what follows them: one waveform, no seam
        wavs = [tts.decode(codes[j, : length[j], :levels]) for j in range(len(rows))]
        t3 = time.perf_counter()
        ar_s, nar_s, decode_s = max(t1 - t0 - c1, 1e-9), max(t2 - t1 - (c2 - c1), 1e-9), t3 - t2
        audio_s = float((length - k_rows).sum()) / FRAME_RATE
        compute = ar_s + nar_s + decode_s
        timing = {
            "rtf": compute / audio_s if audio_s > 0 else float("nan"),
            "ar_steps_per_s": int((length - k_rows).max()) / ar_s,  # given frames: one pass, not steps
            "ar_frames_per_s": int(length.sum()) / ar_s,
            "batch": start // batch_size,
            "batch_size": len(rows),
            "compile_s": c2,
        }
        for k, v in (("compute_s", compute), ("compile_s", c2), ("audio_s", audio_s), ("ar_s", ar_s)):
            totals[k] += v
        totals["nar_s"] += nar_s
        totals["decode_s"] += decode_s
        totals["batches"] += 1
        for j, i in enumerate(rows):
            out[i] = Synthesis(wavs[j], bool(stopped[j]), int(length[j] - k_rows[j]), timing, int(k_rows[j]))
        log.info(
            "batch %d: %d utterances, %.1f s of audio in %.1f s (AR %.1f, NAR %.1f, codec %.1f; compile %.1f s more)",
            start // batch_size,
            len(rows),
            audio_s,
            compute,
            ar_s,
            nar_s,
            decode_s,
            c2,
        )
    totals["rtf"] = totals["compute_s"] / totals["audio_s"] if totals["audio_s"] > 0 else float("nan")
    return out, totals  # type: ignore[return-value]


def build_metrics(names: list[str], asr: str, asr_model: str | None, verifier: str) -> dict:
    options = {"wer": {"asr": asr, **({"model": asr_model} if asr_model else {})}, "sim": {"verifier": verifier}}
    return {n: metrics.make_metric(n, **options.get(n, {})) for n in names}


def score(
    items: list[Item],
    hyps: list[np.ndarray],
    scorers: dict,
    prompt_seconds: float,
    generated_from: list[int] | None = None,
) -> tuple[list, dict]:
    """(a row of scores per item, seconds each metric took per utterance). `generated_from`: the
    sample where each hyp's generated part starts (continuation: after the prompt's seconds)."""
    rows, spent = [], dict.fromkeys(scorers, 0.0)
    prompts: dict[Path, np.ndarray] = {}
    for n, (it, hyp) in enumerate(zip(items, hyps)):
        truth = load_audio(it.utt.audio)
        if it.prompt.audio not in prompts:
            prompts[it.prompt.audio] = load_audio(it.prompt.audio)[: int(prompt_seconds * SAMPLE_RATE)]
        start = generated_from[n] if generated_from else 0
        sample = Sample(hyp, text=it.utt.text, prompt=prompts[it.prompt.audio], truth=truth, generated_from=start)
        row = {
            "id": it.utt.id,
            "speaker": it.utt.speaker,
            "text": it.utt.text,
            "prompt": str(it.prompt.audio),
            "seconds": len(hyp) / SAMPLE_RATE,
            "generated_from_s": start / SAMPLE_RATE,
            "truth_seconds": len(truth) / SAMPLE_RATE,
        }
        for name, metric in scorers.items():
            t0 = time.perf_counter()
            row.update(metric(sample))
            spent[name] += time.perf_counter() - t0
        rows.append(row)
    return rows, {k: v / max(len(items), 1) for k, v in spent.items()}


def markdown(summary: dict) -> str:
    lines = [
        f"# Evaluation: {summary['protocol']} ({summary['n']} utterances, {summary['source']})",
        "",
        "| metric | mean | 95% interval | n |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, s in summary["metrics"].items():
        ci = "-" if math.isnan(s["lo"]) else f"[{s['lo']:.4g}, {s['hi']:.4g}]"
        lines.append(f"| {k} | {s['mean']:.4g} | {ci} | {s['n']} |")
    if summary.get("wer_corpus") is not None:
        lines += ["", f"Corpus WER (all errors / all words): {summary['wer_corpus']:.4f}"]
    t = summary.get("timing")
    if t:
        lines += [
            "",
            f"Synthesis: {t['audio_s']:.1f} s of audio in {t['compute_s']:.1f} s (RTF {t['rtf']:.3f}; AR "
            f"{t['ar_s']:.1f} s, NAR {t['nar_s']:.1f} s, codec {t['decode_s']:.1f} s), plus {t['compile_s']:.1f} s "
            f"of compilation; {summary['not_stopped']} utterance(s) reached the step limit without a stop token.",
        ]
    cost = ", ".join(f"{k} {v:.3f} s" for k, v in summary["metric_seconds_per_utterance"].items())
    lines += ["", f"Metric cost per utterance: {cost}. Wall time: {summary['wall_s']:.1f} s.", ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], summary: dict, step: int) -> None:
    write_text(out / "utterances.jsonl", "".join(json.dumps(r, default=_plain) + "\n" for r in rows))
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=_plain) + "\n")
    write_text(out / "summary.md", markdown(summary))
    tb = summary_writer(str(out / "tb"))
    for k, s in summary["metrics"].items():
        if not math.isnan(s["mean"]):
            tb.add_scalar(f"eval_{summary['protocol']}/{k}", s["mean"], step)
    if summary.get("wer_corpus") is not None:
        tb.add_scalar(f"eval_{summary['protocol']}/wer_corpus", summary["wer_corpus"], step)
    tb.close()


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"cannot write {type(v).__name__} as JSON")


def run(args) -> dict:
    t_start = time.perf_counter()
    if args.protocol not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {PROTOCOLS}, got {args.protocol!r}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.ground_truth and not args.checkpoint:
        raise EvalError("--checkpoint is required (or --ground-truth to score the test list's own audio)")
    TTS.check_prompt_length(args.prompt_seconds)
    if args.prompt_seconds == 0:
        raise EvalError("--prompt-seconds must be > 0")
    utts = read_test_list(args.test_list)
    items, skipped = pair_prompts(utts, args.protocol, args.seed, args.prompt_seconds)  # prompts from the whole list
    if args.limit and len(items) > args.limit:  # the first N that can be evaluated; skips up to there
        ids = [u.id for u in utts]
        upto = set(ids[: ids.index(items[args.limit - 1].utt.id) + 1])
        items, skipped = items[: args.limit], [(u, w) for u, w in skipped if u in upto]
    for uid, why in skipped:
        log.warning("skipped %s: %s", uid, why)
    if not items:
        raise EvalError(f"no utterance of {args.test_list} can be evaluated under the {args.protocol} protocol")
    names = [m for m in args.metrics.split(",") if m]
    scorers = build_metrics(names, args.asr, args.asr_model, args.verifier)  # fails before any synthesis
    out = as_path(args.out)  # local, or a bucket (docs/cloud.md)
    timing, stopped = None, [True] * len(items)
    continuation = args.protocol == "continuation"
    if args.ground_truth:
        hyps = [load_audio(it.utt.audio) for it in items]
        # as a model's continuation is scored: speaker similarity of what follows the prompt's seconds
        generated_from = [int(args.prompt_seconds * SAMPLE_RATE) if continuation else 0] * len(items)
        source = "ground truth"
    else:
        tts = TTS.load(args.checkpoint, codec_dir=args.codec_dir, dtype=args.dtype, step=args.step)
        settings = Settings(
            max_ar_steps=args.max_ar_steps,
            ar_temp=args.ar_temp,
            nar_temp=args.nar_temp,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        if tts.codec.is_random:
            log.warning("the codec is randomly initialised: its audio is noise, the scores say nothing about speech")
        results, timing = synthesize(
            tts,
            items,
            settings,
            args.batch_size,
            args.prompt_seconds,
            args.max_length_ratio,
            args.language,
            continuation,
        )
        hyps = [r.wav for r in results]
        generated_from = [r.given_frames * HOP_LENGTH for r in results]
        stopped = [r.stopped for r in results]
        source = str(args.checkpoint)
    log.info("scoring %d utterances with %s", len(items), ", ".join(names))
    rows, cost = score(items, hyps, scorers, args.prompt_seconds, generated_from)
    for i, (it, row) in enumerate(zip(items, rows)):
        wav_path = out / "wavs" / f"{it.utt.id}.wav"
        if not args.ground_truth:
            write_wav(wav_path, hyps[i])
            row.update({k: v for k, v in results[i].timing.items()}, stopped=stopped[i], audio=f"wavs/{it.utt.id}.wav")
        else:
            row["audio"] = str(it.utt.audio)
    keys = [k for m in scorers.values() for k in m.keys] + (list(TIMING_KEYS) if timing else [])
    words = sum(r.get("words", 0) for r in rows)
    summary = {
        "protocol": args.protocol,
        "source": source,
        "test_list": str(args.test_list),
        "n": len(items),
        "skipped": [{"id": u, "why": w} for u, w in skipped],
        "seed": args.seed,
        "prompt_seconds": args.prompt_seconds,
        "asr": args.asr if "wer" in scorers else None,
        "verifier": args.verifier if "sim" in scorers else None,
        "metrics": metrics.summarize(rows, keys),
        "wer_corpus": sum(r.get("errors", 0) for r in rows) / words if words else None,
        "not_stopped": int(sum(not s for s in stopped)),
        "timing": timing,
        "metric_seconds_per_utterance": cost,
    }
    summary["wall_s"] = time.perf_counter() - t_start
    write_outputs(out, rows, summary, args.step or 0)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m valle_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="model directory, training workdir or reference .pth")
    p.add_argument("--test-list", required=True, type=Path, help="JSONL: audio, text, speaker (docs/evaluation.md)")
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--out", default=None, help="output folder, local or gs://... (default: eval/PROTOCOL)")
    p.add_argument("--asr", default="pocketsphinx", help="ASR backend for WER: pocketsphinx (offline) or whisper")
    p.add_argument("--asr-model", default=None, help="the ASR's model (whisper: size or folder; default base.en)")
    p.add_argument("--verifier", default="resemblyzer", help="speaker verifier for SIM: resemblyzer or wavlm")
    p.add_argument("--metrics", default="sim,wer,mcd", help="comma-separated: sim, wer, mcd (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-seconds", type=float, default=3.0, help="seconds of prompt audio (VALL-E: 3)")
    p.add_argument("--limit", type=int, default=0, help="only the first N utterances that can be evaluated (0: all)")
    p.add_argument("--ground-truth", action="store_true", help="score the list's own recordings (no model)")
    p.add_argument("--codec-dir", default=None, help="EnCodec weights folder (default: the pretrained weights)")
    p.add_argument("--dtype", default=None, help="model dtype for synthesis (float32, bfloat16)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a training workdir (default: latest)")
    p.add_argument("--language", default="en")
    p.add_argument("--max-ar-steps", type=int, default=1350, help="AR frames at most (75 per second)")
    p.add_argument(
        "--max-length-ratio",
        type=float,
        default=2.0,
        help="an utterance's AR frames at most, as a multiple of its ground truth's length (0: off)",
    )
    p.add_argument("--ar-temp", type=float, default=1.0)
    p.add_argument("--nar-temp", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.out = args.out or Path("eval") / args.protocol
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (
        EvalError,
        MetricUnavailable,
        AudioError,
        TextError,
        DecodeError,
        CheckpointError,
        CodecUnavailable,
        ConfigError,
    ) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(markdown(summary))
    print(
        f"wrote {args.out}/summary.md, summary.json, utterances.jsonl, tb/" + ("" if args.ground_truth else ", wavs/")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
