"""Voices the server knows, keyed by the hash of their content.

A voice's id is the sha256 of what was uploaded (audio or codes) and the prompt length it was trimmed to, so
the same upload gets the same id on every replica: a replica that has not seen an id answers 404 and the
client uploads again, or replicas share `voice_dir`, where each voice is written once as `<id>.npy` (codes).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from valle_jax.atomic import atomic_path
from valle_jax.audio import FRAME_RATE, SAMPLE_RATE, AudioError, load_audio
from valle_jax.tts import TTS, Prompt

NPY_MAGIC = b"\x93NUMPY"  # a voice file: codes int [frames, levels] saved with numpy


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
        """Encodes an uploaded wav (any format soundfile reads) or voice file (.npy codes) once; returns
        (id, voice). Raises AudioError (unusable) or TooLong."""
        vid = voice_id(data, input_prompt_length)
        try:
            return vid, self.get(vid)
        except UnknownVoice:
            pass
        if data.startswith(NPY_MAGIC):
            try:
                codes = np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as e:
                raise AudioError(f"the voice file is not a numpy array of codes ({e})") from e
            if not np.issubdtype(codes.dtype, np.integer) or codes.ndim != 2:
                raise AudioError(f"a voice file holds int codes [frames, levels], got {codes.dtype} {codes.shape}")
            if codes.min(initial=0) < 0 or codes.max(initial=0) >= 1024:
                raise AudioError("a voice file's codes must lie in [0, 1024)")
            voice = self.tts.prompt(codes, input_prompt_length)
        else:
            with tempfile.NamedTemporaryFile(suffix=".audio") as f:
                f.write(data)
                f.flush()
                seconds = len(load_audio(f.name)) / SAMPLE_RATE  # AudioError when unreadable
                if seconds > self.max_audio_seconds:
                    raise TooLong(f"the reference audio lasts {seconds:.1f} s; at most {self.max_audio_seconds:g} s")
                wavs, _ = TTS.read_references(f.name, input_prompt_length)
            voice = self.tts.prompt(np.concatenate(self.tts.codec.encode_batch(wavs)), input_prompt_length)
        voice = Prompt(voice.codes, (vid,))
        self._remember(vid, voice)
        if self.voice_dir and not (self.voice_dir / f"{vid}.npy").is_file():
            with atomic_path(self.voice_dir / f"{vid}.npy", suffix=".npy") as tmp:
                np.save(tmp, voice.codes)
        return vid, voice

    def get(self, vid: str) -> Prompt:
        with self._lock:
            if vid in self._voices:
                self._voices.move_to_end(vid)
                return self._voices[vid]
        path = self.voice_dir / f"{vid}.npy" if self.voice_dir and vid.isalnum() else None
        if path is None or not path.is_file():
            raise UnknownVoice(vid)
        voice = Prompt(np.load(path, allow_pickle=False), (vid,))
        self._remember(vid, voice)
        return voice

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
            for p in self.voice_dir.glob("*.npy"):
                if p.stem not in known:
                    known[p.stem] = len(np.load(p, mmap_mode="r")) / FRAME_RATE
        return [{"id": k, "seconds": round(s, 3)} for k, s in sorted(known.items())]
