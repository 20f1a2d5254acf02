"""Best-of-N synthesis through the API and the command, with a tiny random model and a random
codec: N sampled candidates in one batch, the best by WER then similarity (here from injected
metrics) or by mean AR log-probability, every candidate's scores reported; and the refusals.
(That the real metrics pick a clean candidate among noisy copies: test_metrics.py.)"""

import warnings

import numpy as np
import pytest
import soundfile as sf

from valle_jax import best_of as B
from valle_jax import synthesize
from valle_jax.decoding import DecodeError, Settings
from valle_jax.tts import TTS, MaxStepsWarning

pytestmark = pytest.mark.needs_espeak
TEXT = "Hello there."
SAMPLING = dict(max_ar_steps=8, seed=5)


@pytest.fixture(scope="module")
def voice(corpus):
    return sorted(corpus.rglob("*.wav"))[0]


class Scripted:
    """A metric returning the given values in call order (one per candidate)."""

    keys = ("wer",)

    def __init__(self, key, values):
        self.key, self.values = key, list(values)

    def __call__(self, sample):
        return {self.key: self.values.pop(0)}


def test_api_keeps_the_best_candidate(tiny_tts, voice):
    with pytest.warns(MaxStepsWarning):
        (by_lp,) = tiny_tts.best_of(TEXT, str(voice), 3, asr="none", **SAMPLING)
    lps = [c.logprob for c in by_lp.candidates]
    assert by_lp.criteria == "mean AR log-probability" and by_lp.chosen == int(np.argmax(lps))
    assert len(set(lps)) == 3 and all(c.wer is None and c.sim is None for c in by_lp.candidates)
    assert by_lp.codes.shape == (8, 8) and by_lp.frames == [8, 8, 8] and by_lp.stopped == [False] * 3
    # the candidates are vocoded as one batch (Codec.decode_rows): the same audio within float rounding
    np.testing.assert_allclose(by_lp.wav, tiny_tts.decode(by_lp.codes), atol=1e-5)
    # WER first (0 and 2 tie), then similarity: candidate 2, whatever the log-probabilities say
    judge = B.Judge(wer=Scripted("wer", [0.0, 0.5, 0.0]), sim=Scripted("sim_prompt", [0.2, 0.9, 0.7]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaxStepsWarning)
        (by_wer,) = tiny_tts.best_of(TEXT, str(voice), 3, judge=judge, **SAMPLING)
        wav = tiny_tts.synthesize(TEXT, str(voice), best_of=3, asr="none", **SAMPLING)
    assert by_wer.chosen == 2 and by_wer.criteria == "WER, then speaker similarity, then mean AR log-probability"
    assert [c.logprob for c in by_wer.candidates] == lps  # the same seed: the same candidates
    d = by_wer.as_dict()
    assert d["chosen"] == 2 and d["candidates"][1] == dict(wer=0.5, sim=0.9, logprob=lps[1], frames=8, stopped=False)
    np.testing.assert_array_equal(wav, by_lp.wav)  # synthesize(best_of=N) is the chosen candidate's audio
    # a candidate without frames never wins over one with some
    assert B.choose([B.Candidate(logprob=0.0), B.Candidate(logprob=-5.0)], [0, 3]) == 1


def test_best_of_requests_that_cannot_work_are_refused():
    for n, settings, asr, match in (
        (0, Settings(), "none", "best_of must be an integer from 1 to 64"),
        (2.5, Settings(), "none", "best_of must be an integer"),
        (2, Settings(beam_width=3), "none", "beam search would make the same candidate"),
        (2, Settings(ar_temp=0, nar_temp=0), "none", "both temperatures 0"),
        (2, Settings(), "kaldi", "unknown best-of ASR 'kaldi'; known: none, pocketsphinx, whisper"),
    ):
        with pytest.raises(DecodeError, match=match):
            B.check_best_of(n, settings, asr)
    B.check_best_of(1, Settings(beam_width=3, ar_temp=0, nar_temp=0))  # one candidate: anything goes


def test_cli_best_of_reports_every_candidate(tiny_tts, tiny_model_dir, codec_dir, voice, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TTS, "load", lambda *a, **k: tiny_tts)  # the API test's model, compiled for 3 candidates
    out = tmp_path / "o.wav"
    base = [TEXT, str(voice), "--out", str(out), "--checkpoint", str(tiny_model_dir), "--codec-dir", str(codec_dir)]
    assert synthesize.main(base + ["--best-of", "0"]) == 2
    assert synthesize.main(base + ["--best-of", "2", "--beam-width", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: best_of must be an integer from 1 to 64, got 0" in err and "beam search" in err
    args = base + ["--best-of", "3", "--best-of-asr", "none", "--verbose", "--max-ar-steps", "8", "--seed", "5"]
    assert synthesize.main(args) == 0
    printed = capsys.readouterr().out
    assert "TEXT: best of 3 by mean AR log-probability: candidate" in printed
    assert printed.count("  candidate ") == 3 and printed.count("<- chosen") == 1 and "logprob -" in printed
    wav, sr = sf.read(out)
    assert sr == 24_000 and len(wav) == 8 * 320
