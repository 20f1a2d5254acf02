import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from tools.common import find_files
from valle_jax.audio import AudioError, load_audio, num_frames
from valle_jax.codec import CHECKPOINT_NAME, Codec, CodecUnavailable

pytestmark = pytest.mark.needs_espeak


def test_codes_shape_frame_rate_and_variety(corpus, codec):
    wavs = [load_audio(f) for f in find_files(corpus, (".wav",))[:4]]
    codes = codec.encode_batch(wavs)
    for w, c in zip(wavs, codes):
        assert c.dtype == np.int16 and c.shape == (num_frames(len(w)), 8)
        assert abs(c.shape[0] / (len(w) / 24000) - 75) < 0.5  # 75 frames per second
        assert c.min() >= 0 and c.max() < 1024
    allc = np.concatenate(codes)
    # a usable random codec: many distinct codes on every level (a fresh EnCodec gives only 0)
    assert all(len(np.unique(allc[:, k])) > 20 for k in range(8))


def test_batched_encoding_matches_one_by_one(corpus, codec):
    wavs = [load_audio(f) for f in find_files(corpus, (".wav",))[4:7]]
    batched = codec.encode_batch(wavs)
    for w, b in zip(wavs, batched):
        single = codec.encode(w)
        assert single.shape == b.shape
        # causal model: right padding changes nothing but float rounding; level 0 agrees
        assert (single[:, 0] == b[:, 0]).mean() > 0.97
        assert (single == b).mean() > 0.9


def test_decode_length(corpus, codec):
    codes = codec.encode(load_audio(find_files(corpus, (".wav",))[0]))
    wav = codec.decode(codes)
    assert wav.dtype == np.float32 and wav.shape == (codes.shape[0] * 320,) and np.isfinite(wav).all()


def test_batched_decode_equals_encodecs_own_decode_of_each_row(codec):
    """decode_batch pads rows of different lengths into one batch (its LSTM runs once): every row's audio
    equals the library's own decode of that row alone (of its own levels), within float rounding, and an
    empty row is empty."""
    import torch

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 1024, (n, q)) for n, q in ((30, 8), (7, 8), (0, 8), (18, 4))]  # 4 levels: NAR cut
    batched = codec.decode_batch(rows)
    assert [len(w) for w in batched] == [n * 320 for n in (30, 7, 0, 18)]
    for row, wav in zip(rows, batched):
        if len(row):
            with torch.inference_mode():
                alone = codec.model.decode([(torch.from_numpy(row.T[None].astype(np.int64)), None)])[0, 0].numpy()
            np.testing.assert_allclose(wav, alone, atol=1e-5)
    with ThreadPoolExecutor(2) as pool:  # rows upsampled two at a time (the server's --vocoder-threads)
        threaded = list(codec.decode_rows(rows, pool.map))
    assert all(np.array_equal(t, w) for t, w in zip(threaded, batched, strict=True))


def test_pretrained_loader_reads_torch_hub_cache(codec_dir, tmp_path, monkeypatch, corpus, codec):
    """The real loading path (no codec dir): encodec's own loader finds the file in $TORCH_HOME."""
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(codec_dir / CHECKPOINT_NAME, hub / CHECKPOINT_NAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    pretrained_path = Codec.load(None)
    wav = load_audio(find_files(corpus, (".wav",))[0])
    assert np.array_equal(pretrained_path.encode(wav), codec.encode(wav))
    assert not pretrained_path.is_random  # nothing marks hub weights as random


def test_missing_codec_is_a_clear_error(tmp_path):
    with pytest.raises(CodecUnavailable, match="no codec checkpoint"):
        Codec.load(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CodecUnavailable, match="not a loadable EnCodec"):
        Codec.load(tmp_path)


def test_load_audio_mixes_down_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1).astype(np.float32) * 0.5
    sf.write(tmp_path / "s.flac", stereo, 44100)
    wav = load_audio(tmp_path / "s.flac")
    assert wav.shape == (24000,) and abs(np.abs(wav).max() - 0.25) < 0.02  # mean of the two channels
    (tmp_path / "bad.wav").write_bytes(b"RIFF....garbage")
    with pytest.raises(AudioError, match="bad.wav: cannot read audio"):
        load_audio(tmp_path / "bad.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 24000)
    with pytest.raises(AudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")
