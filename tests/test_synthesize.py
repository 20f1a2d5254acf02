"""Synthesis end to end: the TTS API and `python -m valle_jax.synthesize` with a tiny random model
and a random codec, the checkpoint formats it reads, and the error cases."""

import numpy as np
import pytest
import soundfile as sf
from conftest import save_tiny_model
from flax import nnx

from valle_jax import synthesize
from valle_jax.audio import HOP_LENGTH, SAMPLE_RATE, AudioError
from valle_jax.config import ModelConfig
from valle_jax.data.text import TextError, reference_symmap

pytestmark = pytest.mark.needs_espeak
STEPS = 12  # the random model never stops: every utterance runs to max_ar_steps
GREEDY = dict(ar_temp=0.0, nar_temp=0.0, max_ar_steps=STEPS)


@pytest.fixture(scope="module")
def voice_wav(corpus):
    return sorted(corpus.rglob("*.wav"))[0]


def test_api_synthesize_returns_24khz_audio_of_the_generated_length(tiny_tts, voice_wav):
    with pytest.warns(UserWarning, match="max_ar_steps=12 without a stop token"):
        wav = tiny_tts.synthesize("Hello there.", str(voice_wav), **GREEDY)
    assert wav.dtype == np.float32 and wav.shape == (STEPS * HOP_LENGTH,) and np.isfinite(wav).all()
    with pytest.warns(UserWarning):
        two = tiny_tts.synthesize("Hello there.\n\nGood night.", str(voice_wav), pause=0.0, **GREEDY)
    assert two.shape == (2 * STEPS * HOP_LENGTH,)  # lines concatenated, blank lines skipped
    np.testing.assert_allclose(two[: len(wav)], wav, atol=1e-5)  # vocoded as a batch: equal within float rounding


def test_api_batch_equals_one_by_one_and_prompts_are_reusable(tiny_tts, voice_wav, corpus):
    other = sorted(corpus.rglob("*.wav"))[-1]
    voice = tiny_tts.prompt(str(voice_wav), input_prompt_length=1.0)
    assert len(voice.codes) == 75 and voice.codes.shape[1] == 8
    texts = ["One small step.", "A much longer sentence to synthesise here.", "Three."]
    refs = [voice, str(other), voice]
    with pytest.warns(UserWarning):
        together = tiny_tts.generate_codes(texts, refs, batch_size=2, input_prompt_length=1.0, **GREEDY)
        alone = [tiny_tts.generate_codes([t], [r], input_prompt_length=1.0, **GREEDY)[0] for t, r in zip(texts, refs)]
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    assert together[0].shape == (STEPS, 8)


def test_reference_checkpoint_and_model_dir_give_the_same_speech(
    tiny_tts, tiny_model_dir, codec_dir, voice_wav, tmp_path
):
    from valle_jax import TTS
    from valle_jax.checkpointing import params_of
    from valle_jax.export import write_reference

    params = params_of(nnx.merge(tiny_tts.decoder.graph, tiny_tts.decoder.params))
    pth = write_reference(tmp_path / "fp32.pth", params, tiny_tts.cfg, tiny_tts.symmap, {})
    other = TTS.load(pth, codec_dir=codec_dir, heads=4)
    with pytest.warns(UserWarning):
        a = tiny_tts.generate_codes(["Good morning."], [str(voice_wav)], **GREEDY)[0]
        b = other.generate_codes(["Good morning."], [str(voice_wav)], **GREEDY)[0]
    np.testing.assert_array_equal(a, b)


def test_cli_writes_a_wav_of_the_expected_length(tiny_model_dir, codec_dir, voice_wav, tmp_path, capsys):
    out = tmp_path / "out.wav"
    rc = synthesize.main(
        [
            "Hello world.",
            str(voice_wav),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_model_dir),
            "--codec-dir",
            str(codec_dir),
            "--max-ar-steps",
            str(STEPS),
            "--max-nar-levels",
            "3",
            "--top-k",
            "20",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    wav, sr = sf.read(out)
    assert sr == SAMPLE_RATE and len(wav) == STEPS * HOP_LENGTH
    err = capsys.readouterr().err
    assert "without a stop token" in err and "randomly initialised" in err


def test_cli_synthesises_with_a_retnet_model(codec_dir, voice_wav, tmp_path, capsys):
    """The recurrent-state decoder behind the same command; a rolling context is refused by name."""
    cfg = ModelConfig(arch="retnet", d_model=48, n_heads=4, n_layers=2, retention_chunk=32)
    save_tiny_model(tmp_path / "retnet", cfg)
    args = [
        "Hello world.",
        str(voice_wav),
        "--checkpoint",
        str(tmp_path / "retnet"),
        "--codec-dir",
        str(codec_dir),
        "--max-ar-steps",
        str(STEPS),
    ]
    assert synthesize.main(args + ["--out", str(tmp_path / "out.wav")]) == 0
    wav, sr = sf.read(tmp_path / "out.wav")
    assert sr == SAMPLE_RATE and len(wav) == STEPS * HOP_LENGTH
    assert synthesize.main(args + ["--out", str(tmp_path / "ctx.wav"), "--max-ar-context", "50"]) == 2
    assert "max_ar_context" in capsys.readouterr().err and not (tmp_path / "ctx.wav").exists()


def test_cli_text_file_writes_one_wav_per_line(tiny_model_dir, codec_dir, voice_wav, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line here.\nThird.\n")
    out = tmp_path / "wavs"
    rc = synthesize.main(
        [
            str(voice_wav),
            "--text-file",
            str(lines),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_model_dir),
            "--codec-dir",
            str(codec_dir),
            "--max-ar-steps",
            str(STEPS),
            "--batch-size",
            "2",
            "--beam-width",
            "2",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0001.wav", "0003.wav", "0004.wav"]  # by line number


def test_cli_text_file_skips_a_bad_line_and_keeps_the_rest(tiny_model_dir, codec_dir, voice_wav, tmp_path, capsys):
    from valle_jax.checkpointing import read_config, save_model
    from valle_jax.tts import load_any

    model, cfg, symmap = load_any(tiny_model_dir)
    lacking = tmp_path / "lacking"  # the same model, its symbol map without "ð"
    save_model(
        lacking, cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), {k: v for k, v in symmap.items() if k != "ð"}
    )
    assert "ð" not in read_config(lacking)[1]
    lines = tmp_path / "lines.txt"
    lines.write_text("Hello.\nThen the weather.\nGood.\n")
    out = tmp_path / "wavs"
    rc = synthesize.main(
        [
            str(voice_wav),
            "--text-file",
            str(lines),
            "--out",
            str(out),
            "--checkpoint",
            str(lacking),
            "--codec-dir",
            str(codec_dir),
            "--max-ar-steps",
            "4",
        ]
    )
    assert rc == 1
    assert "line 2: phoneme symbols not in the symbol map: ['ð']" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["0001.wav", "0003.wav"]


@pytest.mark.parametrize(
    "case,expect",
    [
        ("empty", "empty text"),
        ("language", "not supported"),
        ("missing", "not found"),
        ("corrupt", "cannot read audio"),
        ("silent", "silent"),
        ("flags", "top_p"),
    ],
)
def test_cli_errors_are_specific(case, expect, tiny_model_dir, codec_dir, voice_wav, tmp_path, capsys):
    ref, text, extra = str(voice_wav), "Hello.", []
    if case == "empty":
        text = "  \n "
    elif case == "language":
        extra = ["--language", "xx"]
    elif case == "missing":
        ref = str(tmp_path / "nope.wav")
    elif case == "corrupt":
        ref = tmp_path / "bad.wav"
        ref.write_bytes(b"RIFF not really a wav file")
    elif case == "silent":
        ref = tmp_path / "silent.wav"
        sf.write(ref, np.zeros(24000, np.float32), SAMPLE_RATE)
    elif case == "flags":
        extra = ["--top-p", "0"]
    out = tmp_path / "out.wav"
    rc = synthesize.main(
        [
            text,
            str(ref),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_model_dir),
            "--codec-dir",
            str(codec_dir),
            "--max-ar-steps",
            "4",
            *extra,
        ]
    )
    assert rc == 2 and expect in capsys.readouterr().err
    assert not out.exists()


def test_unknown_symbols_and_untrained_languages_are_named(tiny_tts, voice_wav):
    from valle_jax import TTS

    model = nnx.merge(tiny_tts.decoder.graph, tiny_tts.decoder.params)
    small = TTS(
        model, tiny_tts.cfg, {k: v for k, v in tiny_tts.symmap.items() if k not in ("ð", "ɛ")}, tiny_tts.codec_dir
    )
    with pytest.raises(TextError, match="not in the symbol map.*ð"):
        small.text_ids("Then the weather.")
    with pytest.raises(TextError, match="not supported by this model"):
        tiny_tts.language_id("ja")  # a one-language model
    with pytest.raises(AudioError, match="reference codes"):
        tiny_tts.prompt(np.zeros((10, 2), np.int16))


def test_cli_kv_dtype_bfloat16_decodes_with_a_bfloat16_cache(
    tiny_model_dir, codec_dir, voice_wav, tmp_path, monkeypatch
):
    """--kv-dtype reaches the decoder: the AR's cache is bfloat16 (its bits on the CPU), and the
    command still writes the full length."""
    from valle_jax import TTS

    seen = []
    load = TTS.load.__func__
    monkeypatch.setattr(TTS, "load", classmethod(lambda cls, *a, **k: seen.append(load(cls, *a, **k)) or seen[-1]))
    out = tmp_path / "bf16.wav"
    rc = synthesize.main(
        [
            "Hello world.",
            str(voice_wav),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_model_dir),
            "--codec-dir",
            str(codec_dir),
            "--max-ar-steps",
            str(STEPS),
            "--kv-dtype",
            "bfloat16",
        ]
    )
    assert rc == 0 and seen[0].decoder.kv_dtype == "bfloat16"
    wav, sr = sf.read(out)
    assert len(wav) == STEPS * HOP_LENGTH


@pytest.fixture(scope="module")
def stop_loving_dir(tmp_path_factory):
    """The tiny model with the stop token's logit raised by 100: its first choice is always to stop
    (the issue's demo model at --beam-width 16 behaved so)."""
    from valle_jax.checkpointing import params_of, save_model
    from valle_jax.models import init_model

    cfg = ModelConfig(arch="transformer", d_model=48, n_heads=4, n_layers=2)
    params = params_of(init_model(cfg, 0))
    params["classifier_bias"] = params["classifier_bias"].at[cfg.stop_token].add(100.0)
    out = tmp_path_factory.mktemp("model") / "stop_loving"
    save_model(out, cfg, params, reference_symmap())
    return out


def test_no_frames_is_a_warning_and_exit_1_never_an_empty_wav(stop_loving_dir, codec_dir, voice_wav, tmp_path, capsys):
    base = ["--checkpoint", str(stop_loving_dir), "--codec-dir", str(codec_dir), "--max-ar-steps", str(STEPS)]
    bare = ["--min-ar-steps", "0", "--length-normalization", "0", "--beam-width", "4"]  # the reference's scoring
    out = tmp_path / "out.wav"
    assert synthesize.main(["Hello world.", str(voice_wav), "--out", str(out), *base, *bare]) == 1
    err = capsys.readouterr().err
    assert "warning: TEXT: the AR produced no frames" in err and "not written" in err, err
    assert not out.exists()

    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond.\n")
    wavs = tmp_path / "wavs"
    assert synthesize.main([str(voice_wav), "--text-file", str(lines), "--out", str(wavs), *base, *bare]) == 1
    err = capsys.readouterr().err
    assert f"{lines} line 1: the AR produced no frames" in err and f"{lines} line 3: the AR" in err, err
    assert "no wav written" in err and list(wavs.iterdir()) == []

    # the defaults: at least 1.25 frames per phoneme before the stop token may end the line
    assert synthesize.main(["Hello.", str(voice_wav), "--out", str(out), *base, "--beam-width", "4"]) == 0
    assert len(sf.read(out)[0]) == int(1.25 * phoneme_count("Hello.")) * HOP_LENGTH > 0


def phoneme_count(text):
    from valle_jax.data.text import Phonemizer

    return len(Phonemizer("en").tokens([text])[0])


def test_the_api_warns_of_an_utterance_without_frames(stop_loving_dir, codec_dir, voice_wav):
    from valle_jax import TTS
    from valle_jax.tts import EmptyAudioWarning

    tts = TTS.load(stop_loving_dir, codec_dir=codec_dir)
    with pytest.warns(EmptyAudioWarning, match=r"utterance 1 \('Second.'\): the AR produced no frames"):
        codes = tts.generate_codes(["First.", "Second."], [str(voice_wav)] * 2, min_ar_steps=0, **GREEDY)
    assert [c.shape for c in codes] == [(0, 8), (0, 8)]
