"""Data preparation across machines: --shard I/N for quantize and phonemize, several devices from
one quantize process, and tools.pack merging shard folders and stores."""

import shutil

import pytest

from tools import pack, phonemize, quantize
from tools.common import Shard

pytestmark = pytest.mark.needs_espeak
BATCH_SECONDS = 7.0  # small batches, so that a few speakers make several of them to share out


def outputs(root):
    """{relative path: bytes} of the tools' outputs under root."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.name.endswith((".codes.npy", ".phn.txt"))
    }


@pytest.fixture(scope="module")
def small_corpus(corpus, tmp_path_factory):
    """Six utterances of the session corpus (read-only)."""
    out = tmp_path_factory.mktemp("small")
    for wav in sorted(corpus.rglob("*.wav"))[:6]:
        rel = wav.relative_to(corpus)
        (out / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(wav, out / rel)
        shutil.copy(wav.with_suffix(".txt"), out / rel.with_suffix(".txt"))
    return out


def test_shard_parsing_and_partition():
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="I/N with 0 <= I < N"):
            Shard.parse(bad)
    items = list(range(11))
    parts = [Shard(i, 3).take(items) for i in range(3)]
    assert sorted(sum(parts, [])) == items and all(set(a).isdisjoint(b) for a in parts for b in parts if a is not b)


def test_n_shards_together_equal_one_unsharded_run_byte_for_byte(small_corpus, codec, codec_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    shutil.copytree(small_corpus, whole)
    assert quantize.quantize_dir(whole, whole, codec, BATCH_SECONDS, progress=False).finish() == 0
    assert phonemize.phonemize_dir(whole, whole, progress=False).finish() == 0
    expected = outputs(whole)
    assert len(expected) == 12

    shards = [tmp_path / f"shard{i}" for i in range(3)]  # each machine writes to its own disk
    for i, out in enumerate(shards):
        if i == 1:  # one shard through the command, on two devices from one process
            args = [str(small_corpus), "--out", str(out), "--codec-dir", str(codec_dir), "--shard", "1/3"]
            assert quantize.main([*args, "--devices", "cpu,cpu", "--batch-seconds", str(BATCH_SECONDS)]) == 0
            assert "on 2 device(s)" in capsys.readouterr().out
        else:
            report = quantize.quantize_dir(small_corpus, out, codec, BATCH_SECONDS, False, shard=Shard(i, 3))
            assert report.finish() == 0
        assert phonemize.main([str(small_corpus), "--out", str(out), "--shard", f"{i}/3"]) == 0
    parts = [outputs(out) for out in shards]
    assert all(parts), "every shard has work"
    assert sum(len(p) for p in parts) == len(expected)  # disjoint
    merged = {k: v for p in parts for k, v in p.items()}
    assert merged == expected  # complete, and byte for byte

    # pack reads the shards' folders as one tree: the same store as packing the unsharded folder
    assert pack.pack([whole], tmp_path / "a", progress=False).finish() == 0
    assert pack.pack(shards, tmp_path / "b", progress=False).finish() == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_pack_merges_stores_with_their_symbols_and_languages(store_path, tmp_path):
    from valle_jax.data.store import Store

    src = Store(store_path)
    half = tmp_path / "half"  # the same utterances, once more, as German, in a second store
    shutil.copytree(store_path, half)
    index = (half / "index.json").read_text().replace('"lang_symmap": {"en": 0, "ja": 1}', '"lang_symmap": {"de": 0}')
    (half / "index.json").write_text(index.replace('"lang": ["en"', '"lang": ["de"').replace('"en"', '"de"'))
    assert set(Store(half).lang_symmap) == {"de"}
    report = pack.pack([store_path, half], tmp_path / "merged", progress=False)
    assert report.finish() == 1  # the second store's utterances repeat the first's ids: reported, skipped
    assert len(report.failed) == len(src) and "already packed from" in report.failed[0][1]
    merged = Store(tmp_path / "merged")
    assert merged.ids == src.ids and merged.symmap == src.symmap
    for i in (0, len(src) - 1):
        a, b = src[i], merged[i]
        assert (a.codes == b.codes).all() and (a.text == b.text).all() and a.lang == b.lang

    rel = pack.pack([half], tmp_path / "german", progress=False)  # a store alone, languages kept
    assert rel.finish() == 0
    german = Store(tmp_path / "german")
    assert german.lang_symmap == {"en": 0, "ja": 1, "de": 2} and set(german.lang.tolist()) == {2}
    assert (german[3].text == src[3].text).all()  # ids re-encoded through the symbols: unchanged
