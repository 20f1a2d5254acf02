"""Vocos decoding (valle_jax.vocoder) with a randomly initialised Vocos saved to a local folder: shapes, the
sample rate, the CLI's --vocoder flag, and the error that names the missing weights."""

import numpy as np
import pytest
import soundfile as sf

from valle_jax import synthesize
from valle_jax.audio import HOP_LENGTH, SAMPLE_RATE
from valle_jax.config import ModelConfig
from valle_jax.data.text import reference_symmap
from valle_jax.vocoder import CONFIG_NAME, WEIGHTS_NAME, VocoderUnavailable, Vocos, build_random_vocos

STEPS = 12


@pytest.fixture(scope="module")
def vocos_dir(tmp_path_factory):
    return build_random_vocos(tmp_path_factory.mktemp("vocos"), seed=0)


def test_random_vocos_decodes_codes_to_24khz_audio_of_320_samples_per_frame(vocos_dir):
    vocos = Vocos.load(vocos_dir)
    assert vocos.is_random
    codes = np.random.default_rng(0).integers(0, 1024, (40, 8))
    wav = vocos.decode(codes)
    assert wav.dtype == np.float32 and wav.shape == (40 * HOP_LENGTH,) and np.isfinite(wav).all()
    assert np.abs(wav).max() > 0
    first, second = vocos.decode_batch([codes[:10], codes])
    assert first.shape == (10 * HOP_LENGTH,) and np.array_equal(second, wav)
    assert vocos.decode(codes[:0]).shape == (0,)
    other = np.random.default_rng(1).integers(0, 1024, (40, 8))  # the codes matter: a real table lookup
    assert not np.allclose(vocos.decode(other), wav)


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(VocoderUnavailable, match=f"{CONFIG_NAME} and {WEIGHTS_NAME} missing"):
        Vocos.load(tmp_path)


@pytest.mark.needs_espeak
def test_cli_vocoder_flag_decodes_with_vocos(vocos_dir, codec_dir, corpus, tmp_path, capsys):
    from valle_jax.checkpointing import params_of, save_model
    from valle_jax.models import init_model

    cfg = ModelConfig(arch="transformer", d_model=48, n_heads=4, n_layers=2)
    save_model(tmp_path / "tiny", cfg, params_of(init_model(cfg, 0)), reference_symmap())
    voice = str(sorted(corpus.rglob("*.wav"))[0])
    base = ["Hello.", voice, "--checkpoint", str(tmp_path / "tiny"), "--codec-dir", str(codec_dir)]
    base += ["--max-ar-steps", str(STEPS), "--ar-temp", "0", "--nar-temp", "0"]
    out = tmp_path / "vocos.wav"
    assert synthesize.main([*base, "--out", str(out), "--vocoder", "vocos", "--vocoder-dir", str(vocos_dir)]) == 0
    wav, sr = sf.read(out)
    assert sr == SAMPLE_RATE and wav.shape == (STEPS * HOP_LENGTH,)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [*base, "--out", str(tmp_path / "x.wav"), "--vocoder", "vocos", "--vocoder-dir", str(empty)]
    assert synthesize.main(args) == 2
    assert f"{CONFIG_NAME} and {WEIGHTS_NAME} missing" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
