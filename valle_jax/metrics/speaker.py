"""Speaker similarity: the cosine of two utterances' speaker embeddings.

Verifiers (VERIFIERS, by name), each an object with `embed(wav, sr) -> vector`:
- `resemblyzer` (default): Resemblyzer's GE2E d-vector encoder (256-d, LSTM over 40-band mels at
  16 kHz), whose weights ship in its wheel: offline, CPU, about 20 ms per second of audio. Its
  cosines run higher than the WavLM-TDNN verifier of the papers (same-speaker pairs near
  0.8-0.95), so compare systems with it, not with published SIM figures.
- `wavlm`: a WavLM x-vector verifier through `transformers` (WavLMForXVector, default checkpoint
  "microsoft/wavlm-base-plus-sv", a hub name or local folder). Closer to the papers' verifier;
  needs `pip install transformers` and the weights.
Add one with `@register_verifier("name")` on a class whose constructor takes keyword options.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from valle_jax.audio import resample
from valle_jax.metrics.base import MetricUnavailable, Sample, nan, register_metric, require

VERIFIERS: dict[str, Callable[..., object]] = {}


def register_verifier(name: str):
    def add(factory):
        VERIFIERS[name] = factory
        return factory

    return add


def make_verifier(name: str = "resemblyzer", **options):
    if name not in VERIFIERS:
        raise MetricUnavailable(f"unknown speaker verifier {name!r}; known: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[name](**options)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return nan()
    return float(np.dot(a, b) / (na * nb))


@register_verifier("resemblyzer")
class Resemblyzer:
    rate = 16_000

    def __init__(self, device: str = "cpu", threads: int = 1):
        rz = require("resemblyzer", "resemblyzer --no-deps librosa webrtcvad (or pip install -e .[eval])")
        self.rz, self.torch, self.threads = rz, require("torch", "torch"), threads
        self.encoder = rz.VoiceEncoder(device, verbose=False)

    def embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        x = resample(np.asarray(wav, np.float32), sr, self.rate)
        if len(x) == 0:
            return np.zeros(256, np.float32)
        kept = self.rz.preprocess_wav(x)  # volume normalisation, long silences cut (webrtcvad)
        if len(kept) < self.rate // 2:  # the VAD found (almost) no speech: embed what there is
            kept = x
        # its small LSTM runs fastest on one thread: with JAX loaded in the process, torch's
        # default pool (one thread per core) made each embedding 3-4x slower (0.26 -> 0.08 s on 2 cores)
        before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads or before)
        try:
            return self.encoder.embed_utterance(kept)
        finally:
            self.torch.set_num_threads(before)


@register_verifier("wavlm")
class WavLM:
    rate = 16_000

    def __init__(self, model: str = "microsoft/wavlm-base-plus-sv", device: str = "cpu"):
        tf = require("transformers", "transformers")
        self.torch = require("torch", "torch")
        self.features = tf.AutoFeatureExtractor.from_pretrained(model)
        self.model = tf.WavLMForXVector.from_pretrained(model).to(device).eval()
        self.device = device

    def embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        x = resample(np.asarray(wav, np.float32), sr, self.rate)
        inputs = self.features(x, sampling_rate=self.rate, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            return self.model(**inputs).embeddings[0].cpu().numpy()


@register_metric("sim")
class SpeakerSimilarity:
    """sim_prompt: cos(prompt, output); sim_truth: cos(ground truth, output). The output is the
    part the model generated (`Sample.generated`): a continuation's given seconds are the prompt's
    own audio and would score themselves."""

    keys = ("sim_prompt", "sim_truth")

    def __init__(self, verifier: str = "resemblyzer", **options):
        self.verifier = make_verifier(verifier, **options)

    def similarity(self, a: np.ndarray, b: np.ndarray, sr: int) -> float:
        if len(a) == 0 or len(b) == 0:
            return nan()
        return cosine(self.verifier.embed(a, sr), self.verifier.embed(b, sr))

    def __call__(self, sample: Sample) -> dict:
        hyp = self.verifier.embed(sample.generated, sample.sr) if len(sample.generated) else None
        out = {}
        for key, other in (("sim_prompt", sample.prompt), ("sim_truth", sample.truth)):
            if hyp is None or other is None or len(other) == 0:
                out[key] = nan()
            else:
                out[key] = cosine(hyp, self.verifier.embed(other, sample.sr))
        return out
