import hashlib

import pytest
import soundfile as sf

from tools import make_demo_corpus

pytestmark = pytest.mark.needs_espeak


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_corpus_is_deterministic_and_laid_out(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert make_demo_corpus.build(a, voices=3, sentences=2).finish() == 0
    assert make_demo_corpus.build(b, voices=3, sentences=2, jobs=1).finish() == 0
    da = _digests(a)
    assert da == _digests(b)
    assert len(da) == 3 * 2 * 2  # wav + txt per utterance
    wavs = sorted(a.rglob("*.wav"))
    for w in wavs:
        group, speaker = w.relative_to(a).parts[:2]
        assert group in make_demo_corpus.ACCENTS and w.name.startswith(speaker)
        info = sf.info(str(w))
        assert (info.samplerate, info.channels) == (24000, 1) and info.duration > 1.0
        assert w.with_suffix(".txt").read_text().strip() in make_demo_corpus.SENTENCES
    # three distinct speakers
    assert len({w.parent for w in wavs}) == 3


def test_rerun_fills_gaps_only(tmp_path):
    make_demo_corpus.build(tmp_path, voices=2, sentences=2)
    victim = sorted(tmp_path.rglob("*.wav"))[0]
    victim.unlink()
    report = make_demo_corpus.build(tmp_path, voices=2, sentences=2)
    assert (report.done, report.skipped) == (1, 3) and victim.exists()


def test_voice_specs_are_distinct():
    specs = make_demo_corpus.speaker_specs(40)
    assert len(set(specs)) == 40
    assert len({(s[0], make_demo_corpus.speaker_name(s)) for s in specs}) == 40  # <group>/<speaker> paths
