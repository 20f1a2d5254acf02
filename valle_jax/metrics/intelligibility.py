"""Intelligibility: an ASR transcript of the audio against its text, as WER and CER (jiwer).

ASR backends (ASR_BACKENDS, by name), each `backend(wav, sr) -> transcript`:
- `pocketsphinx` (default): CMU PocketSphinx 5 with the US-English acoustic model, language
  model and dictionary its wheel ships; offline, CPU, about 0.45 s per second of audio. Far
  weaker than a neural ASR (on clean espeak-ng speech its WER is 0.4-0.7 depending on the voice):
  a coarse, relative figure; compare systems with it, not with numbers from papers.
- `whisper`: faster-whisper (CTranslate2) when installed, else openai-whisper; `model` names the
  checkpoint (default "base.en", a hub name or a local folder; downloaded once where the network
  allows). The papers' numbers use a neural ASR (VALL-E: a HuBERT-CTC model; later work Whisper).

Text is normalised the same way on both sides before scoring (`normalize`): lower case,
hyphens and slashes as spaces, other punctuation dropped (apostrophes kept inside words), spaces
collapsed. Digits are not spelled out: Whisper writes "7" where the text says "seven" (a known
source of spurious errors; the demo corpus and LibriSpeech spell numbers out).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from valle_jax.audio import resample
from valle_jax.metrics.base import MetricUnavailable, Sample, nan, register_metric, require

ASR_RATE = 16_000
_SPACES = re.compile(r"[-‐‑–—/_]+")
_DROP = re.compile(r"[^a-z0-9' ]+")
_QUOTES = re.compile(r"(^|\s)'+|'+(\s|$)")


def normalize(text: str) -> str:
    t = text.lower().replace("’", "'").replace("‘", "'")
    t = _DROP.sub(" ", _SPACES.sub(" ", t))
    t = _QUOTES.sub(" ", t)  # quotes, not apostrophes: "'hello'" -> hello, "don't" stays
    return " ".join(t.split())


def error_rates(reference: str, hypothesis: str) -> dict:
    """{"wer", "cer"} of normalised texts (NaN for an empty reference), and the word counts
    ("errors", "words") from which a corpus-level WER is summed."""
    jiwer = require("jiwer", "jiwer")
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return {"wer": nan(), "cer": nan(), "errors": 0, "words": 0}
    words = jiwer.process_words(ref, hyp)
    errors = words.substitutions + words.deletions + words.insertions
    return {
        "wer": float(words.wer),
        "cer": float(jiwer.cer(ref, hyp)),
        "errors": int(errors),
        "words": len(ref.split()),
    }


ASR_BACKENDS: dict[str, Callable[..., Callable[[np.ndarray, int], str]]] = {}


def register_asr(name: str):
    def add(factory):
        ASR_BACKENDS[name] = factory
        return factory

    return add


def make_asr(name: str = "pocketsphinx", **options) -> Callable[[np.ndarray, int], str]:
    if name not in ASR_BACKENDS:
        raise MetricUnavailable(f"unknown ASR backend {name!r}; known: {', '.join(sorted(ASR_BACKENDS))}")
    return ASR_BACKENDS[name](**options)


PAD_SECONDS = 0.3  # silence added at both ends
DITHER_DB = -35.0  # seeded Gaussian noise, relative to the audio's RMS


def _pcm16(wav: np.ndarray, sr: int) -> np.ndarray:
    """16 kHz int16 as PocketSphinx wants it, padded with PAD_SECONDS of silence at both ends and
    dithered at DITHER_DB below the audio's RMS (seeded: the same audio gives the same transcript).
    Digital silence (espeak-ng's, a codec's) upsets PocketSphinx's cepstral mean normalisation: on
    12 espeak-ng sentences in 3 voices the padding and dither took its WER from 0.79 / 0.41 / 0.93
    to 0.56 / 0.38 / 0.72."""
    x = resample(np.asarray(wav, np.float32), sr, ASR_RATE)
    pad = np.zeros(int(PAD_SECONDS * ASR_RATE), np.float32)
    x = np.concatenate([pad, x, pad])
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1e-4
    x = x + rms * 10 ** (DITHER_DB / 20) * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


@register_asr("pocketsphinx")
class PocketSphinx:
    """The en-us model shipped in the pocketsphinx wheel (acoustic model, 3-gram LM, CMU dict)."""

    def __init__(self, **config):
        ps = require("pocketsphinx", "pocketsphinx")
        self.decoder = ps.Decoder(samprate=ASR_RATE, loglevel="FATAL", **config)

    def __call__(self, wav: np.ndarray, sr: int) -> str:
        d = self.decoder
        d.reinit_feat()  # fresh feature state (CMN): else a transcript depends on the utterances before it
        d.start_utt()
        d.process_raw(_pcm16(wav, sr).tobytes(), full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        return hyp.hypstr if hyp is not None else ""


@register_asr("whisper")
class Whisper:
    """faster-whisper if installed, else openai-whisper; greedy English decoding."""

    def __init__(self, model: str = "base.en", device: str = "cpu"):
        try:
            fw = require("faster_whisper", "faster-whisper")
            self.model = fw.WhisperModel(model, device=device, compute_type="int8" if device == "cpu" else "float16")
            self.kind = "faster"
        except MetricUnavailable:
            try:
                ow = require("whisper", "openai-whisper")
            except MetricUnavailable:
                raise MetricUnavailable(
                    "the whisper ASR needs faster-whisper or openai-whisper: pip install faster-whisper"
                ) from None
            self.model = ow.load_model(model, device=device)
            self.kind = "openai"

    def __call__(self, wav: np.ndarray, sr: int) -> str:
        audio = resample(np.asarray(wav, np.float32), sr, ASR_RATE)
        if self.kind == "faster":
            segments, _ = self.model.transcribe(audio, language="en", beam_size=1)
            return " ".join(s.text.strip() for s in segments)
        return self.model.transcribe(audio, language="en", fp16=False, temperature=0.0)["text"]


@register_metric("wer")
class Intelligibility:
    """WER and CER of `asr`'s transcript of the audio against the sample's text."""

    keys = ("wer", "cer")

    def __init__(self, asr: str = "pocketsphinx", **asr_options):
        self.asr = make_asr(asr, **asr_options)

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        if len(wav) == 0:
            return ""
        return self.asr(wav, sr)

    def __call__(self, sample: Sample) -> dict:
        if sample.text is None:
            return {"wer": nan(), "cer": nan()}
        transcript = self.transcribe(sample.hyp, sample.sr)
        return {**error_rates(sample.text, transcript), "transcript": transcript}
