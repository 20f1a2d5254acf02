"""Bad inputs to the data tools: each is reported and skipped, never fatal to the good ones.

Small synthetic corpora (codes and .phn.txt written directly, HDF5 built in place), so no espeak,
codec or audio is needed and every test runs in well under a second.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

from tools import pack, quantize
from valle_jax.audio import SAMPLE_RATE, num_frames
from valle_jax.data import text as T
from valle_jax.data.store import INDEX_NAME, Store, StoreError, StoreWriter

PHONES = "h ə l oʊ"


def _codes(frames=90, levels=8, seed=0):
    return np.random.default_rng(seed).integers(0, 1024, (frames, levels)).astype(np.int16)


def _utterance(root: Path, name: str, codes=None, phones=PHONES, speaker="spk") -> None:
    """`root/g/<speaker>/<name>.codes.npy` + `.phn.txt`; None skips that file."""
    d = root / "g" / speaker
    d.mkdir(parents=True, exist_ok=True)
    if codes is not None:
        np.save(d / f"{name}.codes.npy", codes)
    if phones is not None:
        (d / f"{name}.phn.txt").write_text(phones)


def _good_corpus(root: Path, names=("b", "c", "d")) -> None:
    for i, name in enumerate(names):
        _utterance(root, name, _codes(seed=i))


def _pack_cli(root: Path, out: Path, *flags: str) -> int:
    return pack.main([str(root), "--out", str(out), *flags])


def _failed(report_or_capture) -> dict[str, str]:
    return {Path(p).name.split(".")[0]: reason for p, reason in report_or_capture.failed}


# ---- issue item 1: one bad codes file aborted the whole pack ----


def test_transposed_codes_are_skipped_and_the_rest_packed(tmp_path, capsys):
    _good_corpus(tmp_path / "src")
    _utterance(tmp_path / "src", "t", _codes().T)  # [8, 90]: levels and frames swapped
    assert _pack_cli(tmp_path / "src", tmp_path / "store") == 1
    err = capsys.readouterr().err
    assert "1 failed" in err and "t.phn.txt" in err and "transposed" in err
    store = Store(tmp_path / "store")
    assert sorted(Path(i).name for i in store.ids) == ["b", "c", "d"] and store.n_levels == 8


def test_codes_with_another_level_count_are_skipped(tmp_path, capsys):
    _good_corpus(tmp_path / "src")
    _utterance(tmp_path / "src", "four", _codes(levels=4))
    assert _pack_cli(tmp_path / "src", tmp_path / "store") == 1
    assert "four.phn.txt: 4 codec levels, the store has 8" in capsys.readouterr().err
    assert len(Store(tmp_path / "store")) == 3


def test_the_majority_of_inputs_decides_the_level_count_not_the_first_file(tmp_path):
    _utterance(tmp_path / "src", "a", _codes(levels=16))  # sorts first
    _good_corpus(tmp_path / "src")
    report = pack.pack([tmp_path / "src"], tmp_path / "store", progress=False)
    assert report.done == 3 and set(_failed(report)) == {"a"}
    assert Store(tmp_path / "store").n_levels == 8
    assert any("8 codec levels (the majority" in x for x in report.extra)


def test_levels_flag_overrides_the_majority(tmp_path):
    _utterance(tmp_path / "src", "a", _codes(levels=16))
    _good_corpus(tmp_path / "src")
    assert _pack_cli(tmp_path / "src", tmp_path / "store", "--levels", "16") == 1
    store = Store(tmp_path / "store")
    assert store.n_levels == 16 and [Path(i).name for i in store.ids] == ["a"]


def test_a_tie_between_level_counts_asks_for_the_levels_flag(tmp_path, capsys):
    _utterance(tmp_path / "src", "a", _codes(levels=4))
    _utterance(tmp_path / "src", "b", _codes(levels=8))
    assert _pack_cli(tmp_path / "src", tmp_path / "store") == 2
    assert "--levels" in capsys.readouterr().err and not (tmp_path / "store").exists()


# ---- issue item 5: out-of-vocabulary text ids ----


def _hdf5(path: Path, texts: list[list[int]], symmap: dict | None = None) -> Path:
    with h5py.File(path, "w") as f:
        if symmap is not None:
            f.create_dataset("symmap", data=json.dumps(symmap))
        for i, ids in enumerate(texts):
            g = f.create_group(f"training/data/LibriTTS/1001/1001_{i}")
            g.create_dataset("audio", data=_codes(80 + i, seed=i).astype(np.int64))
            g.create_dataset("text", data=np.array(ids, np.int64))
    return path


def test_hdf5_symbol_map_with_an_id_past_the_text_table_is_an_error(tmp_path, capsys):
    symmap = dict(T.reference_symmap(), **{"ʘ": 1024})  # the text table has 1024 rows: ids 0..1023
    h5 = _hdf5(tmp_path / "data.h5", [[1, 38, 1024, 2], [1, 38, 2]], symmap)
    assert _pack_cli(h5, tmp_path / "store") == 2
    err = capsys.readouterr().err
    assert "'ʘ'" in err and "1024" in err and "text table" in err
    assert not (tmp_path / "store").exists()


def test_hdf5_text_ids_outside_the_symbol_map_or_the_table_are_skipped(tmp_path):
    h5 = _hdf5(tmp_path / "data.h5", [[1, 38, 2], [1, 500, 2], [1, 38, 4000, 2]])  # map ids end at 228
    report = pack.pack([h5], tmp_path / "store", progress=False)
    assert report.done == 1 and report.finish() == 1
    reasons = dict(_failed(report).items())
    assert "not in the symbol map" in reasons["1001_1"] and "text table" in reasons["1001_2"]
    assert Store(tmp_path / "store").read(0)[1].tolist() == [1, 38, 2]


def test_new_symbols_past_the_text_table_are_skipped(tmp_path):
    _good_corpus(tmp_path / "src")
    _utterance(tmp_path / "src", "new", _codes(), phones="h ʘ ǃ")  # would get ids 229 and 230
    report = pack.pack([tmp_path / "src"], tmp_path / "store", text_tokens=230, progress=False)
    assert report.done == 3 and "230 rows" in _failed(report)["new"]
    assert "ǃ" not in Store(tmp_path / "store").symmap


# ---- issue item 8: smaller gaps ----


def test_float_codes_are_refused_not_truncated(tmp_path):
    _good_corpus(tmp_path / "src")
    _utterance(tmp_path / "src", "f", _codes().astype(np.float32) + 0.7)
    report = pack.pack([tmp_path / "src"], tmp_path / "store", progress=False)
    assert report.done == 3 and "float" in _failed(report)["f"]


def test_codes_without_a_transcript_are_reported(tmp_path):
    _good_corpus(tmp_path / "src")
    _utterance(tmp_path / "src", "orphan", _codes(), phones=None)
    _utterance(tmp_path / "src", "mute", None)  # a transcript without codes (reported before, too)
    report = pack.pack([tmp_path / "src"], tmp_path / "store", progress=False)
    failed = _failed(report)
    assert report.done == 3 and set(failed) == {"orphan", "mute"}
    assert "no transcript" in failed["orphan"] and "no codes" in failed["mute"]


class _ZeroCodec:
    """Stands in for EnCodec: the right shape of codes, instantly."""

    def encode_batch(self, wavs):
        return [np.zeros((num_frames(len(w)), 8), np.int16) for w in wavs]


def test_quantize_warns_about_very_short_and_silent_audio(tmp_path):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(tmp_path / "ok.wav", tone, SAMPLE_RATE)
    sf.write(tmp_path / "short.wav", tone[: SAMPLE_RATE // 200], SAMPLE_RATE)  # 5 ms
    sf.write(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    report = quantize.quantize_dir(tmp_path, tmp_path, _ZeroCodec(), progress=False)
    warned = {Path(p).name: reason for p, reason in report.warnings}
    assert set(warned) == {"short.wav", "silent.wav"}
    assert "5 ms" in warned["short.wav"] and "0.1 s" in warned["short.wav"] and "silent" in warned["silent.wav"]
    # warned files are still encoded: the training filters decide what to use
    assert report.done == 3 and report.finish() == 0 and "2 warnings" in report.summary()
    assert len(list(tmp_path.glob("*.codes.npy"))) == 3


@pytest.mark.parametrize("bad", ["../outside.array_record", "/etc/hostname", "a/../../x.array_record"])
def test_store_refuses_shard_names_outside_its_directory(tmp_path, bad):
    w = StoreWriter(tmp_path / "store", T.reference_symmap(), T.LANG_SYMMAP)
    w.add("g/s/a", "g_s", "g", "en", _codes(), np.array([1, 38, 2]))
    w.close()
    (tmp_path / "outside.array_record").write_bytes(b"")  # exists, so only the name check can refuse it
    index_path = tmp_path / "store" / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["shards"] = [bad]
    index_path.write_text(json.dumps(index))
    with pytest.raises(StoreError, match="outside the store directory"):
        Store(tmp_path / "store")
