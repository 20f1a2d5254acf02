"""The speech metrics on espeak-ng speech: speaker similarity separates voices, PocketSphinx
transcribes espeak sentences, MCD is 0 for identical audio and grows with noise, best-of-N picks the
clean candidate; and the pieces (normaliser, intervals, ranking) on constructed values."""

import importlib.util
import itertools
import logging
import sys

import numpy as np
import pytest

from valle_jax.audio import SAMPLE_RATE, load_audio
from valle_jax.metrics import (
    Candidate,
    MetricUnavailable,
    Sample,
    best_candidate,
    interval,
    make_metric,
    mean_ar_logprob,
    rank_candidates,
    score_candidates,
    summarize,
)
from valle_jax.metrics.intelligibility import error_rates, make_asr, normalize
from valle_jax.metrics.signal import distortion, trimmed_seconds

needs_eval = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("jiwer", "pocketsphinx", "resemblyzer", "pyworld", "librosa")),
    reason="the eval extra is not installed: pip install -e .[eval]",
)


# ---- constructed values ------------------------------------------------------------------------
def test_normalize_and_error_rates():
    assert normalize("Hello, World! It's 'quoted' -- twenty-one/two.") == "hello world it's quoted twenty one two"
    pytest.importorskip("jiwer")
    r = error_rates("The cat sat.", "the cat sat on")
    assert r["wer"] == pytest.approx(1 / 3) and r["errors"] == 1 and r["words"] == 3
    assert error_rates("A b c", "a b c")["wer"] == 0.0 and error_rates("A b c", "a b c")["cer"] == 0.0
    assert np.isnan(error_rates("...", "anything")["wer"])  # nothing to say: no score


def test_interval_is_the_t_interval_and_skips_nan():
    s = interval([1.0, 2.0, 3.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == 2.0
    assert s["hi"] - s["mean"] == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)  # t(0.975, 2)
    assert interval([5.0])["n"] == 1 and np.isnan(interval([5.0])["lo"]) and interval([])["n"] == 0
    rows = [{"a": 1.0, "b": "x"}, {"a": 3.0, "b": True}, {}]
    got = summarize(rows, ["a", "b"])
    assert got["a"] == interval([1.0, 3.0]) and got["b"]["n"] == 0 and np.isnan(got["b"]["mean"])


def test_ranking_by_wer_then_similarity_else_logprob():
    c = [Candidate(0.2, 0.9, -1.0), Candidate(0.0, 0.5, -3.0), Candidate(0.0, 0.8, -2.0)]
    assert rank_candidates(c) == [2, 1, 0]
    no_asr = [Candidate(None, 0.5, -1.0), Candidate(None, 0.7, -2.0)]
    assert best_candidate(no_asr) == 1
    only_lp = [Candidate(logprob=-2.5), Candidate(logprob=-0.5), Candidate(logprob=-1.0)]
    assert rank_candidates(only_lp) == [1, 2, 0]
    partial = [Candidate(0.1, logprob=-1.0), Candidate(float("nan"), logprob=-0.1)]  # WER unknown for one
    assert best_candidate(partial) == 1
    with pytest.raises(ValueError):
        best_candidate([])


def test_mean_ar_logprob_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    got = mean_ar_logprob(logits, tokens, np.array([3, 0]))
    lp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
    assert got[0] == pytest.approx(np.mean([lp[t, tokens[0, t]] for t in range(3)]), rel=1e-6)
    assert np.isnan(got[1])


def test_unknown_metric_and_missing_whisper_are_one_line_errors():
    with pytest.raises(MetricUnavailable, match="unknown metric 'nope'; known: mcd, sim, wer"):
        make_metric("nope")
    with pytest.raises(MetricUnavailable, match="unknown ASR backend"):
        make_asr("kaldi")
    if importlib.util.find_spec("faster_whisper") or importlib.util.find_spec("whisper"):
        pytest.skip("a whisper package is installed")
    with pytest.raises(MetricUnavailable) as e:
        make_metric("wer", asr="whisper")
    assert "\n" not in str(e.value) and "pip install faster-whisper" in str(e.value)


# ---- espeak-ng speech --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech(corpus):
    """{speaker: [(wav, text)]}: the shared 4-voice espeak corpus, loaded once."""
    out = {}
    for wav in sorted(corpus.rglob("*.wav")):
        out.setdefault(wav.parent.name, []).append((load_audio(wav), wav.with_suffix(".txt").read_text().strip()))
    return out


@pytest.fixture(scope="module")
def sim():
    return make_metric("sim")


@pytest.fixture(scope="module")
def wer():
    return make_metric("wer", asr="pocketsphinx")


@needs_eval
@pytest.mark.needs_espeak
def test_same_voice_is_more_similar_than_different_voices(speech, sim):
    emb = {(s, i): sim.verifier.embed(w, SAMPLE_RATE) for s, utts in speech.items() for i, (w, _) in enumerate(utts)}
    same, diff = [], []
    for (a, ea), (b, eb) in itertools.combinations(emb.items(), 2):
        cos = float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb))
        (same if a[0] == b[0] else diff).append(cos)
    same, diff = np.array(same), np.array(diff)
    print(f"\nresemblyzer cosine, same espeak voice ({len(same)} pairs): {np.round(np.sort(same), 3)}")
    print(f"different voices ({len(diff)} pairs): {np.round(np.sort(diff), 3)}")
    print(f"means {same.mean():.3f} vs {diff.mean():.3f}; min same {same.min():.3f}, max different {diff.max():.3f}")
    assert same.mean() - diff.mean() > 0.1
    assert np.percentile(same, 10) > np.percentile(diff, 90)
    # the metric itself: prompt and ground truth of the same voice score the output higher than another voice's
    (a0, _), (a1, _) = speech[sorted(speech)[0]][:2]
    other = speech[sorted(speech)[1]][0][0]
    r = sim(Sample(a0, prompt=a1, truth=a1))
    r_other = sim(Sample(a0, prompt=other, truth=None))
    assert r["sim_prompt"] == r["sim_truth"] > r_other["sim_prompt"] and np.isnan(r_other["sim_truth"])


WER_BOUND = 0.5  # PocketSphinx on espeak-ng's en-us voice (measured: see the printout)


@needs_eval
@pytest.mark.needs_espeak
def test_pocketsphinx_transcribes_espeak_sentences(speech, wer):
    us = speech[sorted(speech, key=lambda s: s != "m1_p50_s165")[0]]  # the en-us voice
    rows = [wer(Sample(w, text=t)) for w, t in us]
    for r, (_, t) in zip(rows, us):
        print(f"\n{r['wer']:.2f}  {t!r} -> {r['transcript']!r}", end="")
    corpus = sum(r["errors"] for r in rows) / sum(r["words"] for r in rows)
    print(f"\ncorpus WER {corpus:.3f} over {len(rows)} sentences")
    assert corpus < WER_BOUND
    assert wer(Sample(np.zeros(0, np.float32), text="hello"))["wer"] == 1.0  # nothing said: every word missed


@needs_eval
@pytest.mark.needs_espeak
def test_mcd_is_zero_for_identical_audio_and_grows_with_noise(speech):
    wav = speech[sorted(speech)[0]][0][0]
    same = distortion(wav, wav.copy(), SAMPLE_RATE)
    assert same["mcd"] == 0.0 and same["f0_rmse"] == 0.0 and same["duration_ratio"] == 1.0
    rng = np.random.default_rng(0)
    power = float(np.mean(wav**2))
    mcds = []
    for snr_db in (30, 15, 5):
        noise = rng.normal(size=wav.shape).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
        mcds.append(distortion(wav, wav + noise, SAMPLE_RATE)["mcd"])
    print(f"\nMCD at SNR 30/15/5 dB: {np.round(mcds, 2)}")
    assert 0 < mcds[0] < mcds[1] < mcds[2]
    other = distortion(wav, speech[sorted(speech)[1]][0][0], SAMPLE_RATE)
    assert other["mcd"] > mcds[0] and np.isfinite(other["f0_rmse"]) and other["duration_ratio"] > 0


def test_trimmed_seconds_ignores_leading_and_trailing_silence():
    tone = np.sin(np.arange(SAMPLE_RATE) * 0.05).astype(np.float32)
    padded = np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), tone, np.zeros(SAMPLE_RATE, np.float32)])
    assert trimmed_seconds(padded, SAMPLE_RATE) == pytest.approx(1.0, abs=0.02)
    assert trimmed_seconds(np.zeros(100, np.float32), SAMPLE_RATE) == 0.0


@needs_eval
@pytest.mark.needs_espeak
def test_best_of_n_picks_the_clean_candidate(speech, sim, wer):
    utts = speech[sorted(speech, key=lambda s: s != "m1_p50_s165")[0]]
    (clean, text), (prompt, _) = utts[0], utts[1]
    rng = np.random.default_rng(1)
    scale = np.sqrt(np.mean(clean**2))
    noisy = [clean + g * scale * rng.normal(size=clean.shape).astype(np.float32) for g in (1.0, 2.0)]
    wavs = [noisy[0], clean, noisy[1]]
    cands = score_candidates(wavs, text, prompt, SAMPLE_RATE, wer=wer, sim=sim, logprobs=[-1.0, -2.0, -3.0])
    print("\n" + "\n".join(f"{c}" for c in cands))
    assert best_candidate(cands) == 1


@needs_eval
@pytest.mark.needs_espeak
def test_training_speech_scores_skip_a_random_codec_and_score_a_real_one(speech, caplog):
    from valle_jax.training.evaluation import SpeechScores

    scores = SpeechScores()
    a, b = speech[sorted(speech)[0]][0][0], speech[sorted(speech)[0]][1][0]
    samples = [Sample(a, prompt=b, truth=a)]
    with caplog.at_level(logging.INFO, logger="valle_jax.train"):
        assert scores(samples, True, 5) == {} and scores(samples, True, 10) == {}
    assert caplog.text.count("eval audio metrics skipped: the codec is random") == 1
    got = scores(samples, False, 10)
    assert set(got) == {
        "eval_audio/sim_prompt",
        "eval_audio/sim_truth",
        "eval_audio/mcd",
        "eval_audio/f0_rmse",
        "eval_audio/duration_ratio",
        "eval_audio/wer_vs_ref_asr",
    }
    assert (
        got["eval_audio/mcd"] == 0.0 and got["eval_audio/wer_vs_ref_asr"] == 0.0 and got["eval_audio/sim_truth"] > 0.99
    )


# ---- the optional backends, with fake libraries injected (no network, no weights) ---------------
class FakeFasterWhisper:
    """faster_whisper's surface: WhisperModel(name, device=, compute_type=).transcribe(audio, ...)."""

    def __init__(self):
        self.calls = []
        fake = self

        class WhisperModel:
            def __init__(self, name, device, compute_type):
                fake.calls.append(("load", name, device, compute_type))

            def transcribe(self, audio, language, beam_size):
                fake.calls.append(("transcribe", audio.dtype, len(audio), language, beam_size))
                segment = type("Segment", (), {"text": " Hello "})
                return iter([segment, type("Segment", (), {"text": "there. "})]), {"language": language}

        self.WhisperModel = WhisperModel


class FakeOpenaiWhisper:
    """openai-whisper's surface: load_model(name, device=).transcribe(audio, ...) -> {"text"}."""

    def __init__(self):
        self.calls = []
        fake = self

        class Model:
            def transcribe(self, audio, language, fp16, temperature):
                fake.calls.append(("transcribe", audio.dtype, len(audio), language, fp16, temperature))
                return {"text": " Hello there!"}

        def load_model(name, device):
            fake.calls.append(("load", name, device))
            return Model()

        self.load_model = load_model


def test_whisper_backends_by_flag_with_fake_libraries(monkeypatch):
    pytest.importorskip("jiwer")
    from valle_jax.evaluate import build_metrics

    one_second = np.zeros(SAMPLE_RATE, np.float32)
    faster, openai = FakeFasterWhisper(), FakeOpenaiWhisper()
    monkeypatch.setitem(sys.modules, "faster_whisper", faster)
    monkeypatch.setitem(sys.modules, "whisper", openai)
    wer = build_metrics(["wer"], "whisper", "tiny.en", "resemblyzer")["wer"]  # evaluate's --asr / --asr-model
    assert wer.asr.kind == "faster" and faster.calls == [("load", "tiny.en", "cpu", "int8")]
    r = wer(Sample(one_second, text="Hello there."))
    assert r["transcript"] == "Hello there." and r["wer"] == 0.0
    assert faster.calls[1] == ("transcribe", np.float32, 16_000, "en", 1)  # resampled to 16 kHz
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # not installed: openai-whisper is the fallback
    wer = make_metric("wer", asr="whisper")
    assert wer.asr.kind == "openai" and openai.calls == [("load", "base.en", "cpu")]
    assert wer(Sample(one_second, text="Hello there."))["wer"] == 0.0
    assert openai.calls[1] == ("transcribe", np.float32, 16_000, "en", False, 0.0) and not faster.calls[2:]
    monkeypatch.setitem(sys.modules, "whisper", None)  # neither: one clear line
    with pytest.raises(MetricUnavailable) as e:
        make_metric("wer", asr="whisper")
    assert str(e.value) == "the whisper ASR needs faster-whisper or openai-whisper: pip install faster-whisper"


class FakeTransformers:
    """transformers' surface for WavLM: AutoFeatureExtractor and WavLMForXVector.from_pretrained; the
    "embedding" is a few statistics of the waveform, so that different audio embeds differently."""

    def __init__(self, torch):
        self.loaded = []
        fake = self

        class Features(dict):
            def to(self, device):
                return self

        class Extractor:
            def __call__(self, x, sampling_rate, return_tensors):
                assert sampling_rate == 16_000 and return_tensors == "pt"
                return Features(input_values=torch.from_numpy(np.asarray(x, np.float32))[None])

        class Model:
            def to(self, device):
                return self

            def eval(self):
                return self

            def __call__(self, input_values):
                x = input_values[0]
                emb = torch.stack([x.abs().mean(), x.std(), (x[1:] * x[:-1]).mean() / x.var(), torch.tensor(0.1)])
                return type("Out", (), {"embeddings": emb[None]})

        class AutoFeatureExtractor:
            @staticmethod
            def from_pretrained(name):
                fake.loaded.append(("features", name))
                return Extractor()

        class WavLMForXVector:
            @staticmethod
            def from_pretrained(name):
                fake.loaded.append(("model", name))
                return Model()

        self.AutoFeatureExtractor, self.WavLMForXVector = AutoFeatureExtractor, WavLMForXVector


def test_wavlm_verifier_by_flag_with_a_fake_library(monkeypatch):
    torch = pytest.importorskip("torch")
    from valle_jax.evaluate import build_metrics

    fake = FakeTransformers(torch)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    sim = build_metrics(["sim"], "pocketsphinx", None, "wavlm")["sim"]  # evaluate's --verifier wavlm
    assert fake.loaded == [("features", "microsoft/wavlm-base-plus-sv"), ("model", "microsoft/wavlm-base-plus-sv")]
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    low, low2 = (np.sin(2 * np.pi * f * t).astype(np.float32) for f in (200, 210))
    noise = np.random.default_rng(0).normal(size=SAMPLE_RATE).astype(np.float32) * 0.5
    r = sim(Sample(low, prompt=low2, truth=noise))
    assert r["sim_prompt"] > 0.99 and r["sim_prompt"] > r["sim_truth"]
    assert make_metric("sim", verifier="wavlm", model="local/sv")(Sample(low, prompt=low))["sim_prompt"] > 0.999
    assert fake.loaded[-1] == ("model", "local/sv")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MetricUnavailable) as e:
        make_metric("sim", verifier="wavlm")
    assert "\n" not in str(e.value) and "pip install transformers" in str(e.value)
    with pytest.raises(MetricUnavailable, match="unknown speaker verifier 'ecapa'; known: resemblyzer, wavlm"):
        make_metric("sim", verifier="ecapa")
