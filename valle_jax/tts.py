"""The Python API for synthesis.

    from valle_jax import TTS
    tts = TTS.load("models/ar+nar-llama", codec_dir=None)        # or a training workdir, or a reference .pth
    wav = tts.synthesize("Hello there.", "voice.wav", ar_temp=0.9, nar_temp=0.5)   # float32, 24 kHz
    voice = tts.prompt(["a.wav", "b.wav"])                          # encode a voice once, reuse it
    wavs = tts.synthesize_batch(["One.", "Two."], [voice, voice], top_k=50)
    tts.save("out.flac", wav)                                       # format from the suffix

Sampling keywords are the fields of `valle_jax.decoding.Settings` (the reference CLI's flags).
`synthesize` splits long text into sentences of at most `max_phonemes` phonemes (valle_jax.text_split),
decodes them as one batch in the same voice and joins them with `pause` seconds of silence.
Text is phonemised with espeak-ng; references are read, mixed to mono, resampled to 24 kHz,
EnCodec-encoded, concatenated in time (several files) and cut to their first
`input_prompt_length` seconds (0: whole). Utterances of a batch are decoded together, sorted by
length so that padding stays small.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from valle_jax import audio_io, hub, runs, text_split, voice
from valle_jax import best_of as B
from valle_jax.audio import FRAME_RATE, SAMPLE_RATE, AudioError, is_silent
from valle_jax.checkpointing import model_with_params, read_langs
from valle_jax.config import ModelConfig
from valle_jax.data import languages
from valle_jax.data.text import Phonemizer, TextError, encode
from valle_jax.decoding import DecodeError, Decoder, Settings, make_inputs
from valle_jax.sources import load_weights, with_adapter

VOCODERS = ("encodec", "vocos")  # what turns codes into audio (valle_jax.vocoder)

log = logging.getLogger(__name__)


class MaxStepsWarning(UserWarning):
    """The AR reached max_ar_steps without producing the stop token: the audio may be cut off."""


class EmptyAudioWarning(UserWarning):
    """The AR produced no frame for an utterance (the stop token came first): its codes and audio are
    empty. The API warns and keeps the batch's other utterances; `warnings.simplefilter("error",
    EmptyAudioWarning)` makes it an exception. The command writes no wav for such a line (exit 1)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A voice: reference codes int16 [frames, levels], already trimmed."""

    codes: np.ndarray
    sources: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return len(self.codes) / FRAME_RATE


Reference = str | os.PathLike | Sequence[str | os.PathLike] | Prompt | np.ndarray


def load_any(
    path: str | os.PathLike,
    dtype: str | None = None,
    step: int | None = None,
    heads: int | None = None,
    lora: str | os.PathLike | None = None,
):
    """(model, config, symmap) from any checkpoint path (valle_jax.sources): a model directory
    (export / convert_reference), a training workdir (its latest checkpoint, or `step`), a reference
    checkpoint file (.pth / .npz / .safetensors, whose head count is inferred for the reference's
    sizes, else taken from `heads`) or an hf://OWNER/REPO[/PATH][@REV] path to one of these; `lora`:
    a LoRA adapter directory merged into it."""
    weights = load_weights(path, step, heads)
    if lora:
        weights = with_adapter(weights, lora)
    cfg = dataclasses.replace(weights.model, dtype=dtype) if dtype else weights.model
    log.info("loaded the %s", weights.origin)
    return model_with_params(cfg, weights.params), cfg, weights.symmap


def languages_of(path: str | os.PathLike) -> dict[str, int]:
    """The language map of what `load_any` loads: a model directory's or a run's (written by
    training from its store), else the reference's en=0, ja=1 (reference .pth files)."""
    path = hub.resolve(path)
    if (path / "config.json").is_file():
        return read_langs(path)
    if runs.is_run(path):
        return dict(runs.read_run(path).langs)
    return dict(languages.REFERENCE_LANGS)


def settings_of(**sampling):
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(sampling) - names)
    if unknown:
        raise DecodeError(f"unknown sampling settings {unknown}; known: {sorted(names)}")
    return Settings(**sampling)


class TTS:
    MIN_PROMPT_SECONDS = 0.5  # shortest voice (after trimming to input_prompt_length) synthesis accepts

    def __init__(
        self,
        model,
        cfg: ModelConfig,
        symmap: dict,
        codec_dir: str | os.PathLike | None = None,
        chunk: int = 8,
        kv_dtype: str | None = None,
        vocoder: str = "encodec",
        vocoder_dir: str | os.PathLike | None = None,
        codec_device: str = "cpu",
        langs: dict[str, int] | None = None,
    ):
        """`vocoder`: what turns codes into audio, "encodec" (the codec's decoder) or "vocos"
        (valle_jax.vocoder; weights from `vocoder_dir` or the Hugging Face cache). `codec_device`: the
        torch device of the codec and the vocoder ("cuda" on a GPU machine)."""
        if vocoder not in VOCODERS:
            raise ValueError(f"vocoder must be one of {VOCODERS}, got {vocoder!r}")
        self.cfg, self.symmap = cfg, dict(symmap)
        self.langs = dict(langs or languages.REFERENCE_LANGS)  # language code -> row of the model's table
        self.decoder = Decoder(model, chunk=chunk, kv_dtype=kv_dtype)
        self.codec_dir = codec_dir
        self.vocoder, self.vocoder_dir, self.codec_device = vocoder, vocoder_dir, codec_device
        self.trim = True  # references are trimmed of silence and loudness-normalised before encoding (voice.clean)
        self._codec = self._vocos = None
        self._phonemizers: dict[str, Phonemizer] = {}
        self._ids: dict[tuple[str, str], list[int]] = {}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        codec_dir: str | os.PathLike | None = None,
        dtype: str | None = None,
        step: int | None = None,
        heads: int | None = None,
        kv_dtype: str | None = None,
        lora: str | os.PathLike | None = None,
        **decoding,
    ) -> TTS:
        """`kv_dtype`: the AR's KV cache ("bfloat16" halves what a step reads from it; None: the
        model's dtype, see decoding.Decoder). `lora`: a LoRA adapter directory to merge into the model.
        `decoding`: vocoder, vocoder_dir, codec_device (__init__)."""
        model, cfg, symmap = load_any(path, dtype, step, heads, lora)
        return cls(model, cfg, symmap, codec_dir, kv_dtype=kv_dtype, langs=languages_of(path), **decoding)

    @property
    def codec(self):
        if self._codec is None:
            from valle_jax.codec import Codec  # noqa: PLC0415 - optional heavy dependency: torch (codec)

            self._codec = Codec.load(self.codec_dir, device=self.codec_device)
            if self._codec.is_random:
                warnings.warn(f"the codec in {self.codec_dir} is randomly initialised: its audio is not speech")
        return self._codec

    @property
    def vocos(self):
        """The Vocos vocoder (loaded on first use; VocoderUnavailable names the missing weights)."""
        if self._vocos is None:
            from valle_jax.vocoder import Vocos  # noqa: PLC0415 - optional heavy dependency: torch (vocoder)

            self._vocos = Vocos.load(self.vocoder_dir, self.codec_device)
            if self._vocos.is_random:
                warnings.warn(f"the Vocos in {self.vocoder_dir} is randomly initialised: its audio is not speech")
        return self._vocos

    @property
    def sample_rate(self) -> int:
        """Hz of the waveforms this returns."""
        return SAMPLE_RATE

    def save(self, path: str | os.PathLike, audio: np.ndarray) -> None:
        """Writes `audio` to `path` in the format its suffix names (.wav, .flac, .ogg, .opus, .mp3;
        `-`: WAV on stdout), atomically."""
        audio_io.write_audio(path, audio, self.sample_rate)

    # ---- inputs -------------------------------------------------------------------------------
    def text_ids(self, text: str, language: str = "en") -> list[int]:
        """`<s> phonemes </s>` ids of one line of text."""
        if not text.strip():
            raise TextError("empty text: nothing to synthesise")
        if (text, language) not in self._ids:  # callers that check lines first do not phonemise twice
            self._ids[text, language] = encode(self.phonemizer(language).tokens([text])[0], self.symmap)
        return self._ids[text, language]

    def phonemizer(self, language: str) -> Phonemizer:
        if language not in self._phonemizers:
            self._phonemizers[language] = Phonemizer(language)
        return self._phonemizers[language]

    def split(self, text: str, language: str = "en", max_phonemes: int = text_split.DEFAULT_MAX_PHONEMES) -> list[str]:
        """`text` as the pieces `synthesize` decodes: sentences of at most `max_phonemes` phonemes."""
        phonemizer = self.phonemizer(language)
        pieces = text_split.split_text(text, lambda ts: [len(t) for t in phonemizer.tokens(ts)], max_phonemes)
        if not pieces:
            raise TextError("empty text: nothing to synthesise")
        return pieces

    @staticmethod
    def check_language(language: str) -> None:
        """A language espeak-ng speaks (no model needed; `language_id` checks the model's)."""
        languages.check(language)

    def language_id(self, language: str) -> int:
        self.check_language(language)
        return languages.language_id(language, self.langs, self.cfg.n_langs)

    def prompt(self, references: Reference, input_prompt_length: float = 3.0) -> Prompt:
        """A voice from one or more audio files (or `a.wav;b.wav`), codes [frames, levels] (used
        as they are), or a Prompt; trimmed to its first `input_prompt_length` seconds (0: whole)."""
        self.check_prompt_length(input_prompt_length)
        if isinstance(references, Prompt):
            codes, sources = references.codes, references.sources
        elif isinstance(references, np.ndarray):
            codes, sources = references, ()
        elif voice.is_voice_file(references):  # codes saved by python -m valle_jax.voice: no encoding
            codes, sources = voice.load(references)
        else:
            wavs, sources = self.read_references(references, input_prompt_length, trim=self.trim)
            codes = np.concatenate(self.codec.encode_batch(wavs), axis=0)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] < self.cfg.n_prom_levels or len(codes) == 0:
            raise AudioError(f"reference codes must be [frames, >= {self.cfg.n_prom_levels}], got {codes.shape}")
        if input_prompt_length > 0:
            codes = codes[: max(1, int(FRAME_RATE * input_prompt_length))]
        if len(codes) < int(FRAME_RATE * self.MIN_PROMPT_SECONDS):
            raise AudioError(
                f"the reference is {len(codes) / FRAME_RATE:.2f} s long after trimming; "
                f"at least {self.MIN_PROMPT_SECONDS:g} s is needed"
            )
        return Prompt(codes[:, : self.cfg.n_prom_levels].astype(np.int16), sources)

    @classmethod
    def check_prompt_length(cls, seconds: float) -> None:
        if not (seconds == 0 or cls.MIN_PROMPT_SECONDS <= seconds < float("inf")):  # NaN fails both
            raise AudioError(
                f"input prompt length must be 0 (the whole reference) or a finite number of seconds "
                f">= {cls.MIN_PROMPT_SECONDS:g}, got {seconds:g}"
            )

    @classmethod
    def read_references(
        cls,
        references: str | os.PathLike | Sequence[str | os.PathLike],
        input_prompt_length: float = 3.0,
        trim: bool = True,
    ) -> tuple[list[np.ndarray], tuple[str, ...]]:
        """(waveforms, paths) of reference audio (`a.wav;b.wav` or a list), checked before any
        encoding: each file exists, is readable and not silent, and what `input_prompt_length`
        seconds (0: all) keeps of them joined lasts MIN_PROMPT_SECONDS and is not silent. Needs no
        model or codec, so callers can check a voice before loading them."""
        cls.check_prompt_length(input_prompt_length)
        if voice.is_voice_file(references):  # a saved voice: checked by reading it, no audio to return
            voice.load(references)
            return [], (str(references),)
        paths = (
            [p for p in str(references).split(";") if p]
            if isinstance(references, (str, os.PathLike))
            else [str(p) for p in references]
        )
        wavs = [voice.clean(w) if trim else w for w in voice.read_audio(paths)]
        kept = np.concatenate(wavs)
        if input_prompt_length > 0:
            kept = kept[: int(SAMPLE_RATE * input_prompt_length)]
        name = ";".join(paths)
        if len(kept) < SAMPLE_RATE * cls.MIN_PROMPT_SECONDS:
            raise AudioError(
                f"{name}: the reference is {len(kept) / SAMPLE_RATE:.2f} s long after trimming; "
                f"at least {cls.MIN_PROMPT_SECONDS:g} s is needed"
            )
        if is_silent(kept):
            raise AudioError(
                f"{name}: the {len(kept) / SAMPLE_RATE:.2f} s kept as the voice (input prompt length "
                f"{input_prompt_length:g} s) are silent; at least {cls.MIN_PROMPT_SECONDS:g} s of sound is needed"
            )
        return wavs, tuple(paths)

    # ---- synthesis ----------------------------------------------------------------------------
    def generate_codes(
        self,
        texts: Sequence[str],
        references: Sequence[Reference],
        *,
        language: str = "en",
        input_prompt_length: float = 3.0,
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
        **sampling,
    ) -> list[np.ndarray]:
        """Codes int32 [frames, levels] per text; one reference per text. `progress(n)` is called
        after each decoded batch with its number of texts."""
        settings = settings_of(**sampling)
        if len(texts) != len(references):
            raise DecodeError(f"{len(texts)} texts but {len(references)} references")
        if batch_size < 1:
            raise DecodeError(f"batch_size must be >= 1, got {batch_size}")
        lang = self.language_id(language)
        ids = [self.text_ids(t, language) for t in texts]
        voices: dict = {}  # a voice used by many texts is encoded once
        prompts = []
        for r in references:
            key = str(r) if isinstance(r, (str, os.PathLike)) else id(r)
            if key not in voices:
                voices[key] = self.prompt(r, input_prompt_length)
            prompts.append(voices[key])
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), len(prompts[i].codes)))
        out: list[np.ndarray | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = make_inputs(
                [ids[i] for i in rows], [prompts[i].codes for i in rows], [lang] * len(rows), self.cfg.n_prom_levels
            )
            result = self.decoder.generate(inputs, dataclasses.replace(settings, seed=settings.seed + start))
            for j, i in enumerate(rows):
                out[i] = result.codes[j]
                if len(result.codes[j]) == 0:
                    warnings.warn(
                        f"utterance {i} ({texts[i][:40]!r}): the AR produced no frames (the stop token came "
                        "first): its audio is empty",
                        EmptyAudioWarning,
                        stacklevel=2,
                    )
                elif not result.stopped[j]:
                    warnings.warn(
                        f"utterance {i} ({texts[i][:40]!r}) reached max_ar_steps={settings.max_ar_steps} "
                        "without a stop token: its audio may be cut off (raise --max-ar-steps)",
                        MaxStepsWarning,
                        stacklevel=2,
                    )
            if progress is not None:
                progress(len(rows))
        return out  # type: ignore[return-value]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [frames, levels] -> float32 waveform at 24 kHz."""
        if len(codes) == 0:
            return np.zeros((0,), np.float32)
        return self.vocos.decode(codes) if self.vocoder == "vocos" else self.codec.decode(codes)

    def decode_rows(self, codes: Sequence[np.ndarray], map_rows: Callable = map) -> Iterator[np.ndarray]:
        """The waveforms of several rows of codes, in order, each as soon as it is made (EnCodec decodes
        them as one batch: Codec.decode_rows; Vocos one at a time). `map_rows` runs the per-row work: `map`
        on this thread, or an executor's `map` for several rows at once."""
        if self.vocoder == "vocos":
            return map_rows(self.decode, codes)
        return self.codec.decode_rows(codes, map_rows)

    def synthesize_batch(self, texts: Sequence[str], references: Sequence[Reference], **kwargs) -> list[np.ndarray]:
        return list(self.decode_rows(self.generate_codes(texts, references, **kwargs)))

    @staticmethod
    def lines(text: str) -> list[str]:
        """The non-empty lines of a text, which `synthesize` makes one utterance each."""
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            raise TextError("empty text: nothing to synthesise")
        return lines

    def synthesize(
        self,
        text: str,
        reference: Reference,
        *,
        split: bool = True,
        max_phonemes: int = text_split.DEFAULT_MAX_PHONEMES,
        pause: float = audio_io.DEFAULT_PAUSE,
        best_of: int = 1,
        **kwargs,
    ) -> np.ndarray:
        """One waveform. The text is split into sentences of at most `max_phonemes` phonemes
        (`split=False`: one utterance per line), decoded as one batch in the same voice, and the
        pieces joined in order with `pause` seconds of silence (a piece with no frames adds
        nothing, with an EmptyAudioWarning). `best_of` > 1: each line (not split further) is the
        best of that many candidates (`TTS.best_of`, whose `asr` and `verifier` keywords pass through)."""
        if best_of != 1:
            picks = self.best_of(text, reference, best_of, **kwargs)
            return audio_io.join([pick.wav for pick in picks], pause, self.sample_rate)
        pieces = self.split(text, kwargs.get("language", "en"), max_phonemes) if split else self.lines(text)
        voice = self.prompt(reference, kwargs.pop("input_prompt_length", 3.0))
        kwargs.setdefault("batch_size", len(pieces))
        wavs = self.synthesize_batch(pieces, [voice] * len(pieces), input_prompt_length=0.0, **kwargs)
        return audio_io.join(wavs, pause, self.sample_rate)

    def best_of(
        self,
        text: str,
        reference: Reference,
        n: int,
        *,
        asr: str = "pocketsphinx",
        verifier: str = "resemblyzer",
        judge: B.Judge | None = None,
        language: str = "en",
        input_prompt_length: float = 3.0,
        **sampling,
    ) -> list[B.BestOf]:
        """Per non-empty line of `text`, `n` candidates decoded as one batch and the best kept
        (valle_jax.best_of: by WER, then similarity to the voice, else by mean AR log-probability;
        asr "none": log-probability alone). `judge` replaces the metrics `asr`/`verifier` name."""
        settings = settings_of(**sampling)
        B.check_best_of(n, settings, asr, verifier)
        lang = self.language_id(language)
        voice = self.prompt(reference, input_prompt_length)
        judge = judge or B.make_judge(asr, verifier)
        voice_wav = self.decode(voice.codes) if judge.sim is not None else None
        picks = []
        for i, line in enumerate(self.lines(text)):
            s = dataclasses.replace(settings, seed=settings.seed + i)
            pick = B.pick_best(self, self.text_ids(line, language), lang, voice.codes, n, s, judge, line, voice_wav)
            if len(pick.codes) == 0:
                warnings.warn(f"line {i + 1} ({line[:40]!r}): no candidate has frames", EmptyAudioWarning, stacklevel=2)
            elif not pick.stopped[pick.chosen]:
                warnings.warn(
                    f"line {i + 1} ({line[:40]!r}): the chosen candidate reached max_ar_steps without a stop token",
                    MaxStepsWarning,
                    stacklevel=2,
                )
            picks.append(pick)
        return picks


__all__ = ["TTS", "Prompt", "MaxStepsWarning", "EmptyAudioWarning", "load_any"]
