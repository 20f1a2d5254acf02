"""Voices the server knows, keyed by the hash of their content.

A voice's id is the sha256 of what was uploaded (audio, or a voice file of `python -m valle_jax.voice make`)
and the prompt length it was trimmed to, so the same upload gets the same id on every replica: a replica that
has not seen an id answers 404 and the client uploads again, or replicas share `voice_dir`, where each voice
is written once as `<id>.npz`, in the project's voice file format (valle_jax.voice). A voice file made with
`python -m valle_jax.voice make ... --out NAME.npz` and copied into `voice_dir` is the voice `NAME`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from valle_jax import voice as voice_file
from valle_jax.audio import FRAME_RATE, SAMPLE_RATE, AudioError, load_audio
from valle_jax.tts import TTS, Prompt

VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a voice id: a file name in voice_dir, never a path


class UnknownVoice(KeyError):
    """A voice id this replica does not hold (upload the voice again)."""


class TooLong(ValueError):
    """Reference audio longer than the server accepts."""


def voice_id(data: bytes, input_prompt_length: float) -> str:
    return hashlib.sha256(data + f"|{input_prompt_length:g}".encode()).hexdigest()[:24]


class VoiceStore:
    """id -> Prompt, in memory (the `capacity` most recent) and in `voice_dir` when given."""

    def __init__(
        self, tts: TTS, voice_dir: str | os.PathLike | None = None, capacity: int = 256, max_audio_seconds: float = 30.0
    ):
        self.tts, self.capacity, self.max_audio_seconds = tts, capacity, max_audio_seconds
        self.voice_dir = Path(voice_dir) if voice_dir else None
        if self.voice_dir:
            self.voice_dir.mkdir(parents=True, exist_ok=True)
        self._voices: OrderedDict[str, Prompt] = OrderedDict()
        self._lock = threading.Lock()  # handlers run in a thread pool

    def add(self, data: bytes, input_prompt_length: float = 3.0) -> tuple[str, Prompt]:
        """Encodes an uploaded wav (any format soundfile reads) once, or reads an uploaded voice file
        (valle_jax.voice's .npz); returns (id, voice). Raises AudioError (unusable) or TooLong."""
        vid = voice_id(data, input_prompt_length)
        try:
            return vid, self.get(vid)
        except UnknownVoice:
            pass
        if voice_file.is_voice_data(data):
            codes, sources = voice_file.loads(data, "the uploaded voice file")
            voice = self.tts.prompt(codes, input_prompt_length)
            trimmed = None  # unknown here: the file's own record is kept
        else:
            with tempfile.NamedTemporaryFile(suffix=".audio") as f:
                f.write(data)
                f.flush()
                seconds = len(load_audio(f.name)) / SAMPLE_RATE  # AudioError when unreadable
                if seconds > self.max_audio_seconds:
                    raise TooLong(f"the reference audio lasts {seconds:.1f} s; at most {self.max_audio_seconds:g} s")
                wavs, _ = TTS.read_references(f.name, input_prompt_length, trim=self.tts.trim)
            voice = self.tts.prompt(voice_file.encode(self.tts.codec, wavs, trim_audio=False), input_prompt_length)
            sources, trimmed = (f"uploaded audio {vid}",), self.tts.trim
        voice = Prompt(voice.codes, (vid,))
        self._remember(vid, voice)
        path = self._path(vid)
        if path is not None and not path.is_file():
            voice_file.save(path, voice.codes, sources, trimmed)
        return vid, voice

    def get(self, vid: str) -> Prompt:
        with self._lock:
            if vid in self._voices:
                self._voices.move_to_end(vid)
                return self._voices[vid]
        path = self._path(vid)
        if path is None or not path.is_file():
            raise UnknownVoice(vid)
        codes, _ = voice_file.load(path)  # AudioError: a file there that is not a voice file
        voice = Prompt(self.tts.prompt(codes, 0.0).codes, (vid,))  # the model's levels; as long as it was saved
        self._remember(vid, voice)
        return voice

    def _path(self, vid: str) -> Path | None:
        return self.voice_dir / f"{vid}.npz" if self.voice_dir and VOICE_NAME.fullmatch(vid) else None

    def _remember(self, vid: str, voice: Prompt) -> None:
        with self._lock:
            self._voices[vid] = voice
            self._voices.move_to_end(vid)
            while len(self._voices) > self.capacity:
                self._voices.popitem(last=False)

    def list(self) -> list[dict]:
        with self._lock:
            known = {vid: v.seconds for vid, v in self._voices.items()}
        if self.voice_dir:
            for p in self.voice_dir.glob("*.npz"):
                if p.stem not in known and VOICE_NAME.fullmatch(p.stem):
                    try:
                        known[p.stem] = len(voice_file.load(p)[0]) / FRAME_RATE
                    except AudioError:  # not a voice file: not a voice
                        continue
        return [{"id": k, "seconds": round(s, 3)} for k, s in sorted(known.items())]
