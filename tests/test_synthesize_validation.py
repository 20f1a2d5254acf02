"""`python -m valle_jax.synthesize` refuses unusable input with one line and exit status 2, and does
so before any model or codec loads (the loader is replaced by one that fails the test if called)."""

import math
import time

import numpy as np
import pytest
import soundfile as sf

from valle_jax import synthesize
from valle_jax.audio import SAMPLE_RATE, AudioError
from valle_jax.config import ModelConfig
from valle_jax.decoding import STEP_BUCKETS, DecodeError, Settings
from valle_jax.models.convert import ConversionError, read_source
from valle_jax.tts import TTS

FAST_S = 3.0  # generous on a shared CPU: loading even the tiny test model and codec takes longer


def tone(path, seconds, silent_head=0.0):
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    wav = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    wav[: int(SAMPLE_RATE * silent_head)] = 0
    sf.write(path, wav, SAMPLE_RATE)
    return path


@pytest.fixture
def voice(tmp_path):
    return tone(tmp_path / "voice.wav", 1.5)


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if synthesis gets as far as loading the model or the codec."""

    def refuse(*a, **k):
        raise AssertionError("the model or the codec was loaded before the input was checked")

    monkeypatch.setattr(TTS, "load", classmethod(refuse))
    monkeypatch.setattr(TTS, "codec", property(refuse))


def cli(capsys, *argv):
    """(exit status, stderr lines, seconds) of one run of the command."""
    t0 = time.perf_counter()
    try:
        rc = synthesize.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    seconds = time.perf_counter() - t0
    return rc, capsys.readouterr().err.strip().splitlines(), seconds


def usage(capsys, voice, checkpoint, tmp_path, *flags):
    return cli(capsys, "Hello.", voice, "--out", tmp_path / "out.wav", "--checkpoint", checkpoint, *flags)


def test_a_random_pth_checkpoint_is_a_one_line_error(capsys, voice, tmp_path):
    bad = tmp_path / "fp32.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, err, _ = cli(capsys, "Hello.", voice, "--out", tmp_path / "out.wav", "--checkpoint", bad)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "not a PyTorch checkpoint" in err[0], err
    assert not (tmp_path / "out.wav").exists()
    with pytest.raises(ConversionError, match="not a readable .npz"):
        (tmp_path / "w.npz").write_bytes(b"not a zip file")
        read_source(tmp_path / "w.npz")


@pytest.mark.usefixtures("no_loading")
def test_max_ar_steps_is_capped_before_loading(capsys, voice, checkpoint, tmp_path):
    rc, err, seconds = usage(capsys, voice, checkpoint, tmp_path, "--max-ar-steps", 100_000_000)
    assert rc == 2 and len(err) == 1
    assert f"max_ar_steps must be <= {2 * STEP_BUCKETS[-1]}" in err[0] and "100000000" in err[0]
    assert seconds < FAST_S
    Settings(max_ar_steps=2 * STEP_BUCKETS[-1])  # the cap itself is allowed
    with pytest.raises(DecodeError, match="max_ar_steps must be <="):
        Settings(max_ar_steps=2 * STEP_BUCKETS[-1] + 1)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(
    "flag,value",
    [
        ("--ar-temp", "inf"),
        ("--ar-temp", "nan"),
        ("--nar-temp", "-inf"),
        ("--min-ar-temp", "inf"),
        ("--top-p", "nan"),
        ("--min-p", "nan"),
        ("--repetition-penalty", "inf"),
        ("--length-penalty", "nan"),
        ("--mirostat-tau", "inf"),
        ("--ras-threshold", "nan"),
        ("--length-normalization", "nan"),
    ],
)
def test_non_finite_sampling_settings_are_refused_before_loading(flag, value, capsys, voice, checkpoint, tmp_path):
    rc, err, seconds = usage(capsys, voice, checkpoint, tmp_path, f"{flag}={value}")  # "=": -inf is no flag
    field = flag[2:].replace("-", "_")
    assert rc == 2 and len(err) == 1 and "finite" in err[0] and f"{field}={value}" in err[0], err
    assert seconds < FAST_S
    with pytest.raises(DecodeError, match="finite"):  # the Python API refuses them too
        Settings(**{field: float(value)})


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("value", ["-1", "-0.5", "inf", "nan", "0.3"])
def test_bad_input_prompt_lengths_are_refused_before_loading(value, capsys, voice, checkpoint, tmp_path):
    rc, err, seconds = usage(capsys, voice, checkpoint, tmp_path, f"--input-prompt-length={value}")
    assert rc == 2 and len(err) == 1 and "input prompt length" in err[0] and ">= 0.5" in err[0], err
    assert seconds < FAST_S


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--top-p", "0"], "top_p"),  # out of range: checked first, not after loading the model and voice
        (["--batch-size", "0"], "--batch-size"),
        (["--step", "-3"], "--step"),
        (["--heads", "0"], "--heads"),
        (["--max-ar-steps", "0"], "max_ar_steps"),
        (["--min-ar-steps", "-2"], "min_ar_steps"),
        (["--min-ar-steps", "500"], "min_ar_steps must be -1 (from the text), 0 (off) or at most max_ar_steps=450"),
        (["--length-normalization", "-1"], "length_normalization must be >= 0"),
        (["--language", "xx"], "language 'xx' is not supported by espeak-ng"),
    ],
)
def test_out_of_range_flags_are_refused_before_loading(flags, expect, capsys, voice, checkpoint, tmp_path):
    rc, err, seconds = usage(capsys, voice, checkpoint, tmp_path, *flags)
    assert rc == 2 and len(err) == 1 and expect in err[0], err
    assert seconds < FAST_S


@pytest.mark.usefixtures("no_loading")
def test_usage_errors_exit_2(capsys, voice, checkpoint, tmp_path):
    out = tmp_path / "out.wav"
    cases = [
        ["Hello.", voice, "--out", out, "--checkpoint", checkpoint, "--ar-temp", "warm"],  # argparse: not a number
        ["Hello.", voice, "--out", out],  # argparse: no --checkpoint
        ["Hello.", voice, "--out", out, "--checkpoint", checkpoint, "--bogus"],  # argparse: unknown flag
        ["Hello.", "--out", out, "--checkpoint", checkpoint],  # no REFERENCE
        ["Hello.", voice, "--out", out, "--checkpoint", tmp_path / "absent"],  # no such checkpoint
        [voice, "--text-file", tmp_path / "absent.txt", "--out", out, "--checkpoint", checkpoint],
        [" \n ", voice, "--out", out, "--checkpoint", checkpoint],  # empty text
    ]
    for argv in cases:
        rc, err, _ = cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert err and "error:" in err[-1], (argv, err)
    assert not out.exists()


@pytest.mark.usefixtures("no_loading")
def test_a_reference_shorter_than_half_a_second_names_the_minimum(capsys, checkpoint, tmp_path):
    short = tone(tmp_path / "short.wav", 0.3)
    rc, err, seconds = usage(capsys, short, checkpoint, tmp_path, "--input-prompt-length", 0)
    assert rc == 2 and len(err) == 1 and "0.30 s" in err[0] and "at least 0.5 s" in err[0], err
    assert seconds < FAST_S
    two = f"{short};{short}"  # joined, 0.6 s: enough
    assert TTS.read_references(two, 0)[1] == (str(short), str(short))


@pytest.mark.usefixtures("no_loading")
def test_a_reference_silent_after_trimming_is_an_error(capsys, checkpoint, tmp_path):
    late = tone(tmp_path / "late.wav", 3.0, silent_head=2.0)  # speech only after 2 s of silence
    rc, err, seconds = usage(capsys, late, checkpoint, tmp_path, "--input-prompt-length", 1.5, "--no-trim")
    assert rc == 2 and len(err) == 1 and "silent" in err[0] and "0.5 s" in err[0], err
    assert seconds < FAST_S
    wavs, _ = TTS.read_references(str(late), 0, trim=False)  # the whole file is fine
    assert len(wavs[0]) == 3 * SAMPLE_RATE
    # trimmed (the default), the silence is gone: the 1.5 s kept are the tone, padded by 50 ms
    wavs, _ = TTS.read_references(str(late), 1.5)
    assert abs(len(wavs[0]) - 1.05 * SAMPLE_RATE) <= 0.02 * SAMPLE_RATE


def test_prompt_codes_shorter_than_half_a_second_are_refused():
    tts = TTS.__new__(TTS)  # prompt() on codes needs only the config: no model, no codec
    tts.cfg = ModelConfig()
    minimum = math.floor(75 * TTS.MIN_PROMPT_SECONDS)
    assert len(tts.prompt(np.zeros((minimum, 8), np.int16), 0).codes) == minimum
    with pytest.raises(AudioError, match=r"at least 0\.5 s"):
        tts.prompt(np.zeros((minimum - 1, 8), np.int16), 0)
    with pytest.raises(AudioError, match="input prompt length"):
        tts.prompt(np.zeros((100, 8), np.int16), -1.0)
