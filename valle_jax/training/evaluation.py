"""Evaluation during training: validation loss and accuracy, and audio samples (reference.md §7.6).

Validation reads `train.eval_batches` batches of the validation store in order, with levels drawn
from a fixed key per batch, so successive evaluations are comparable. Audio samples synthesise the
first `train.eval_audio` utterances of the first validation batch with the current parameters
(WORKDIR/samples/STEP/*.wav, and TensorBoard's Audio tab with their phonemes in the Text tab) and,
when the codec is a real (pretrained) one, score them with the evaluation's metrics
(valle_jax.metrics; `eval_audio/*` scalars): speaker similarity of the output to the prompt and to
the reference, WER of the output's ASR transcript against the reference's (the batch holds phonemes,
not the text), MCD with DTW, log-F0 RMSE and the duration ratio against the reference. With a random
codec (its audio is not speech) or without the metrics' libraries (the `eval` extra) it says once
that it skips them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valle_jax.audio import SAMPLE_RATE, write_wav
from valle_jax.config import DataConfig, ModelConfig
from valle_jax.data.pipeline import make_iterator
from valle_jax.data.store import Store
from valle_jax.decoding import Decoder, Inputs, Settings
from valle_jax.metrics import MetricUnavailable, Sample, make_metric
from valle_jax.metrics.intelligibility import error_rates
from valle_jax.models.valle import model_from_params
from valle_jax.training import monitor
from valle_jax.training.sharding import gather_to_host

log = logging.getLogger("valle_jax.train")


class AudioSamples:
    """Writes hypothesis, reference and prompt wavs of a few validation utterances per evaluation."""

    def __init__(
        self,
        train_cfg,
        model_cfg: ModelConfig,
        workdir: Path,
        primary: bool,
        writer: monitor.MetricsWriter | None = None,
        symmap: dict | None = None,
    ):
        self.train_cfg, self.workdir, self.primary = train_cfg, workdir, primary
        self.writer, self.symmap = writer, symmap or {}  # TensorBoard audio; phoneme ids -> symbols
        self.model_cfg = dataclasses.replace(model_cfg, dtype="float32")
        self.codec = self.decoder = None  # made on first use
        self.off = False  # set when the codec cannot be loaded
        self.scores = SpeechScores()

    def _ready(self) -> bool:
        """Loads the codec once; without one, says so once and keeps training."""
        if self.codec is None and not self.off:
            from valle_jax.codec import Codec  # noqa: PLC0415 - optional heavy dependency: torch (codec)

            try:
                self.codec = Codec.load(self.train_cfg.eval_codec_dir or None)
            except Exception as e:  # no codec: say so once and keep training (other hosts still gather)
                log.warning("eval audio disabled: %s", e)
                self.off = True
        return not self.off

    def __call__(self, params: dict, batch: dict, step: int) -> dict:
        """Writes the samples; returns their speech scores (empty when they are skipped)."""
        params = gather_to_host(params)  # every process takes part (a collective); the primary writes
        t0 = time.perf_counter()
        if not self.primary or not self._ready():
            return {}
        if self.decoder is None:
            self.decoder = Decoder(model_from_params(self.model_cfg, params))
        else:
            self.decoder.params = nnx.state(model_from_params(self.decoder.cfg, params))
        n = min(self.train_cfg.eval_audio, len(batch["text_len"]))
        inputs = Inputs(*(np.asarray(batch[k][:n]) for k in ("text", "text_len", "lang", "prompt", "prompt_len")))
        settings = Settings(max_ar_steps=self.train_cfg.eval_audio_steps, ar_temp=0.95, nar_temp=0.5, seed=step)
        out = self.decoder.generate(inputs, settings)
        folder = self.workdir / "samples" / f"{step:08d}"
        decode = self.codec.decode
        samples = []
        for i, codes in enumerate(out.codes):
            hyp = decode(codes) if len(codes) else np.zeros(1, np.float32)
            ref = decode(batch["resp"][i, : batch["resp_len"][i]])
            prompt = decode(batch["prompt"][i, : batch["prompt_len"][i]])
            write_wav(folder / f"{i}_hyp.wav", hyp)
            write_wav(folder / f"{i}_ref.wav", ref)
            write_wav(folder / f"{i}_prompt.wav", prompt)
            samples.append(Sample(hyp, prompt=prompt, truth=ref))
            if self.writer is not None:
                text = phoneme_text(batch["text"][i, : batch["text_len"][i]], self.symmap)
                for kind, wav in (("hyp", hyp), ("ref", ref), ("prompt", prompt)):
                    self.writer.write_audio(step, f"eval_audio/{i}_{kind}", wav, SAMPLE_RATE, text)
        log.info("eval audio at step %d: %d samples in %s (%.1f s)", step, n, folder, time.perf_counter() - t0)
        return self.scores(samples, self.codec.is_random, step)


def phoneme_text(ids, symmap: dict) -> str:
    """The phonemes of a batch row's text ids (what the sample should say; the batch has no
    spelling), `<s>` and `</s>` left out; an id the map lacks shows as `<id>`."""
    inverse: dict[int, str] = {}
    for sym, i in symmap.items():
        inverse.setdefault(int(i), sym)
    syms = [inverse.get(int(i), f"<{int(i)}>") for i in ids]
    return "".join(s for s in syms if s not in ("<s>", "</s>"))


class SpeechScores:
    """The evaluation's metrics over a few samples: {"eval_audio/NAME": mean over the samples}."""

    def __init__(self):
        self.sim = self.asr = self.mcd = None
        self.said = False  # the reason for skipping has been logged
        self.off = False

    def _skip(self, why: str) -> dict:
        if not self.said:
            log.info("eval audio metrics skipped: %s", why)
            self.said = True
        return {}

    def __call__(self, samples: list[Sample], codec_is_random: bool, step: int) -> dict:
        if codec_is_random:
            return self._skip("the codec is random (its audio is not speech)")
        if self.off:
            return {}
        t0 = time.perf_counter()
        try:
            if self.sim is None:
                self.sim, self.asr, self.mcd = make_metric("sim"), make_metric("wer"), make_metric("mcd")
        except MetricUnavailable as e:
            self.off = True
            return self._skip(f"{e} (or pip install -e .[eval])")
        rows = []
        for s in samples:
            row = {**self.sim(s), **self.mcd(s)}
            said, meant = self.asr.transcribe(s.hyp, s.sr), self.asr.transcribe(s.truth, s.sr)
            row["wer_vs_ref_asr"] = error_rates(meant, said)["wer"]
            rows.append(row)
        scalars = {}
        for k in rows[0] if rows else ():
            vals = np.array([r[k] for r in rows], np.float64)
            if np.isfinite(vals).any():
                scalars[f"eval_audio/{k}"] = float(np.nanmean(vals))
        log.info(
            "eval audio metrics at step %d: %s (%.1f s)",
            step,
            ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in scalars.items()),
            time.perf_counter() - t0,
        )
        return scalars


class Evaluator:
    """evaluate(params, step) -> the validation scalars it wrote (and audio samples, if asked)."""

    def __init__(
        self,
        eval_step: Callable,
        global_batch: Callable[[dict], dict],
        data_cfg: DataConfig,
        train_cfg,
        seed: int,
        writer: monitor.MetricsWriter,
        audio: AudioSamples,
    ):
        self.eval_step, self.global_batch, self.train_cfg = eval_step, global_batch, train_cfg
        self.data_cfg = dataclasses.replace(data_cfg, store=train_cfg.eval_store or data_cfg.store, num_workers=0)
        self.open_store = Store  # path -> Store (a run with a merged phoneme map remaps its ids)
        self.key = jax.random.key(seed + 2)  # the levels of validation batch i: fold_in(key, i)
        self.writer, self.audio = writer, audio

    def check_store(self) -> None:
        """Opens the validation store once at start-up, so that one the run cannot read (symbols the
        run's phoneme map lacks) fails before step 0 rather than at the first evaluation."""
        self.open_store(self.data_cfg.store)

    def _batches(self):
        cfg = self.data_cfg
        it = make_iterator(
            self.open_store(cfg.store),
            cfg,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_epochs=1,
            shuffle=False,
            drop_remainder=False,
        )
        return zip(range(self.train_cfg.eval_batches), it)

    def __call__(self, params: dict, step: int) -> dict:
        sums, first = None, None
        t0 = time.perf_counter()
        for i, local in self._batches():
            first = local if first is None else first
            key = jax.random.key_data(jax.random.fold_in(self.key, i))
            out = self.eval_step(params, self.global_batch(local), key)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if sums is None:
            return {}
        scalars = validation_scalars(jax.device_get(sums))
        self.writer.write(step, scalars)
        log.info(
            "eval at step %d: loss %.4f, top-10 accuracy %.3f (%.1f s)",
            step,
            scalars["val/loss"],
            scalars["val/acc_top10"],
            time.perf_counter() - t0,
        )
        if self.train_cfg.eval_audio > 0:
            speech = self.audio(params, first, step)
            if speech:
                self.writer.write(step, speech)
                scalars.update(speech)
        return scalars


def validation_scalars(sums: dict) -> dict:
    """Token-weighted loss and top-10 accuracy, overall and per level, from summed eval metrics."""
    n = max(float(sums["tokens"]), 1.0)
    scalars = {"val/loss": float(sums["nll"]) / n, "val/acc_top10": float(sums["top10"]) / n}
    for lv, (nll, tok) in enumerate(zip(sums["nll_per_level"], sums["tokens_per_level"])):
        if tok > 0:
            scalars[f"val/loss_level{lv}"] = float(nll / tok)
    return scalars
