import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tools import pack, phonemize
from tools.common import find_files
from valle_jax.atomic import remove_stale_temps, temp_dir_beside
from valle_jax.data import text as T
from valle_jax.data.store import Store, StoreError, StoreWriter

pytestmark = pytest.mark.needs_espeak
ROOT = Path(__file__).resolve().parents[1]


def test_pack_round_trip(prepared, store_path):
    store = Store(store_path)
    phn_files = find_files(prepared, (".phn.txt",))
    assert len(store) == len(phn_files) == 20
    assert store.symmap == T.reference_symmap()  # espeak English needs no new symbol here
    for i, uid in enumerate(store.ids):
        codes, text = store.read(i)
        ref_codes = np.load(prepared / f"{uid}.codes.npy")
        tokens = T.parse_phn_txt((prepared / f"{uid}.phn.txt").read_text())
        assert np.array_equal(codes, ref_codes)
        assert text.tolist() == T.encode(tokens, store.symmap)
        assert store.frames[i] == len(codes) and store.phones[i] == len(text)
        group, speaker, _ = uid.split("/")
        u = store[i]
        assert (u.group, u.speaker, u.lang) == (group, f"{group}_{speaker}", "en")
    assert len(store.speaker_names) == 4
    assert np.allclose(store.durations, store.frames / 75)


def test_pack_cli_is_atomic_and_refuses_to_overwrite(prepared, tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "tools.pack", str(prepared), "--out", str(out)]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert rc.returncode == 2 and "--overwrite" in rc.stderr
    # a failing pack leaves neither a store nor its temp directory
    with pytest.raises(StoreError):
        pack.pack([tmp_path / "missing"], tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.*"))


def test_unseen_symbols_extend_the_map_and_broken_items_are_reported(tmp_path):
    d = tmp_path / "g" / "spk"
    d.mkdir(parents=True)
    codes = np.random.default_rng(0).integers(0, 1024, (90, 8)).astype(np.int16)
    np.save(d / "a.codes.npy", codes)
    (d / "a.phn.txt").write_text(T.format_phn_txt(["h", "ʘ", " ", "ǃ"]))
    np.save(d / "b.codes.npy", codes + 2000)  # out of range
    (d / "b.phn.txt").write_text("h")
    (d / "c.phn.txt").write_text("h")  # no codes
    report = pack.pack([tmp_path / "g"], tmp_path / "store", progress=False)
    assert report.done == 1 and {Path(p).name for p, _ in report.failed} == {"b.phn.txt", "c.phn.txt"}
    store = Store(tmp_path / "store")
    assert store.symmap["ʘ"] == 229 and store.symmap["ǃ"] == 230
    assert store.read(0)[1].tolist() == [1, 38, 229, 3, 230, 2]


def _write_reference_speaker(root, rng, n=3):
    """The reference's own per-speaker folder: torch-saved (1, 8, T) int64 + .phn.txt."""
    d = root / "LibriTTS" / "1001"
    d.mkdir(parents=True)
    expected = {}
    for i in range(n):
        q = torch.from_numpy(rng.integers(0, 1024, (1, 8, 100 + 10 * i)).astype(np.int64))
        torch.save(q, d / f"1001_{i}.qnt.pt")
        (d / f"1001_{i}.phn.txt").write_text("h ə l ˈ o ʊ   w ɜː l d")  # reference layout: two empties per gap
        expected[f"LibriTTS/1001/1001_{i}"] = q[0].T.numpy().astype(np.int16)
    return expected


def test_import_reference_folder(tmp_path):
    expected = _write_reference_speaker(tmp_path / "data", np.random.default_rng(1))
    report = pack.pack([tmp_path / "data"], tmp_path / "store", progress=False)
    assert report.finish() == 0
    store = Store(tmp_path / "store")
    assert sorted(store.ids) == sorted(expected)
    for i, uid in enumerate(store.ids):
        codes, text = store.read(i)
        assert np.array_equal(codes, expected[uid])
        m = store.symmap
        assert text.tolist() == [
            1,
            m["h"],
            m["ə"],
            m["l"],
            m["ˈ"],
            m["o"],
            m["ʊ"],
            3,
            m["w"],
            m["ɜː"],
            m["l"],
            m["d"],
            2,
        ]
    assert store[0].speaker == "LibriTTS_1001" and store[0].group == "LibriTTS"


def test_import_reference_hdf5(tmp_path):
    rng = np.random.default_rng(2)
    symmap = dict(T.reference_symmap(), **{"ʘ": 229})
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("symmap", data=json.dumps(symmap))
        for i in range(3):
            g = f.create_group(f"training/data/LibriTTS/1001/1001_{i}")
            g.create_dataset("audio", data=rng.integers(0, 1024, (80 + i, 8)), compression="lzf")
            g.create_dataset("text", data=np.array([1, 38, 3, 3, 229, 2], np.uint8), compression="lzf")
            g.attrs.update(id=f"1001_{i}", type="training", speaker="1001", duration=(80 + i) / 75, phonemes=6)
        f.create_group("noise/data/noise/n0").create_dataset("audio", data=np.zeros((10, 8), np.int64))
    report = pack.pack([path], tmp_path / "store", progress=False)
    assert report.finish() == 0 and report.done == 3
    store = Store(tmp_path / "store")
    assert store.symmap == symmap
    assert store.read(0)[1].tolist() == [1, 38, 3, 229, 2]  # duplicate boundaries collapsed
    assert store.frames.tolist() == [80, 81, 82]
    assert store[0].speaker == "LibriTTS_1001" and store[0].group == "LibriTTS"


def test_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not a valle_jax store"):
        Store(tmp_path)
    w = StoreWriter(tmp_path / "s", {}, {"en": 0})
    with pytest.raises(StoreError, match="empty"):
        w.close()
    assert not (tmp_path / "s").exists()


def test_phonemize_cli(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("Hello, world!\n")
    (tmp_path / "a" / "empty.txt").write_text("  \n")
    rc = subprocess.run(
        [sys.executable, "-m", "tools.phonemize", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert rc.returncode == 1 and "empty transcript" in rc.stderr
    assert T.parse_phn_txt((tmp_path / "a" / "x.phn.txt").read_text()) == T.Phonemizer().tokens(["Hello, world!"])[0]
    again = phonemize.phonemize_dir(tmp_path, tmp_path, progress=False)
    assert again.skipped == 1 and again.done == 0


def test_stale_temp_files_and_directories_are_removed(tmp_path):
    (tmp_path / ".a.npy.x1.tmp.npy").write_bytes(b"partial")
    half_store = temp_dir_beside(tmp_path / "store")
    (half_store / "shard").write_bytes(b"partial")
    (tmp_path / "keep.npy").write_bytes(b"ok")
    assert remove_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npy"]
