"""`python -m valle_jax.evaluate` and `python -m tools.make_test_list`: the test-list format, the
protocols' prompt choice, the one-line errors, and an end-to-end run with a tiny random model and
a random codec (its audio is noise: the command must still write its table)."""

import json

import numpy as np
import pytest
import soundfile as sf

from tools import make_test_list
from valle_jax import evaluate
from valle_jax.evaluate import EvalError, pair_prompts, read_test_list
from valle_jax.metrics.stats import interval

pytestmark = pytest.mark.needs_espeak
METRIC_KEYS = {"sim_prompt", "sim_truth", "wer", "cer", "mcd", "f0_rmse", "duration_ratio"}


@pytest.fixture(scope="module")
def test_list(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lists") / "sub" / "demo.jsonl"
    make_test_list.build(corpus, out, per_speaker=3)
    return out


def test_demo_corpus_list_is_relative_and_per_speaker(test_list, corpus):
    rows = [json.loads(line) for line in test_list.read_text().splitlines()]
    assert len(rows) == 12 and len({r["speaker"] for r in rows}) == 4
    assert all(r["speaker"].count("/") == 1 for r in rows)  # ACCENT/SPEAKER
    utts = read_test_list(test_list)
    assert all(u.audio.is_file() and u.audio.is_relative_to(corpus.resolve()) for u in utts)
    assert utts[0].text == (corpus / rows[0]["speaker"] / f"{rows[0]['id']}.txt").read_text().strip()


def test_librispeech_layout(corpus, tmp_path):
    wavs = sorted(corpus.rglob("*.wav"))[:3]
    chapter = tmp_path / "ls" / "1089" / "134686"
    chapter.mkdir(parents=True)
    lines = []
    for i, w in enumerate(wavs):
        uid = f"1089-134686-{i:04d}"
        data, sr = sf.read(w)
        sf.write(chapter / f"{uid}.flac", data, sr)
        lines.append(f"{uid} {w.with_suffix('.txt').read_text().strip().upper()}")
    (chapter / "1089-134686.trans.txt").write_text("\n".join(lines) + "\n")
    kept = make_test_list.build(tmp_path / "ls", tmp_path / "ls.jsonl", min_seconds=0.5)
    assert [e["id"] for e in kept] == [f"1089-134686-{i:04d}" for i in range(3)]
    assert {e["speaker"] for e in kept} == {"1089"} and kept[0]["audio"].startswith("ls/1089/134686/")
    assert make_test_list.main([str(tmp_path / "ls"), str(tmp_path / "short.jsonl"), "--max-seconds", "0.1"]) == 2


def test_prompt_pairing(test_list):
    utts = read_test_list(test_list)
    cross, skipped = pair_prompts(utts, "cross", 0, 3.0)
    assert not skipped and len(cross) == len(utts)
    assert all(it.prompt.speaker == it.utt.speaker and it.prompt.id != it.utt.id for it in cross)
    assert cross == pair_prompts(utts, "cross", 0, 3.0)[0]  # deterministic
    assert [it.prompt.id for it in pair_prompts(utts[::-1], "cross", 0, 3.0)[0]][::-1] == [it.prompt.id for it in cross]
    cont, skipped = pair_prompts(utts, "continuation", 0, 1.0)
    assert all(it.prompt == it.utt for it in cont) and not skipped
    assert len(pair_prompts(utts, "continuation", 0, 30.0)[1]) == len(utts)  # all too short for a 30 s prompt
    lonely = [u for u in utts if u.speaker == utts[0].speaker][:1]
    assert pair_prompts(lonely, "cross", 0, 3.0)[0] == []


def test_bad_lists_and_options_are_one_line_errors(test_list, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "missing.wav", "text": "hi", "speaker": "a"}\n')
    with pytest.raises(EvalError, match="bad.jsonl:1: audio .*missing.wav not found"):
        read_test_list(bad)
    bad.write_text('{"audio": "x.wav"}\n')
    with pytest.raises(EvalError, match="expected a JSON object with audio, text and speaker"):
        read_test_list(bad)
    base = ["--test-list", str(test_list), "--protocol", "cross", "--out", str(tmp_path / "o")]
    assert evaluate.main(base) == 2  # no checkpoint
    assert evaluate.main(base + ["--ground-truth", "--asr", "kaldi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "evaluate: error: --checkpoint is required (or --ground-truth to score the test list's own audio)",
        "evaluate: error: unknown ASR backend 'kaldi'; known: pocketsphinx, whisper",
    ]


def test_end_to_end_with_a_tiny_model_and_a_random_codec(tiny_model_dir, codec_dir, test_list, tmp_path, capsys):
    """The continuation protocol (its synthesis is the cross protocol's, plus the prompt frames the
    AR continues): each wav is the prompt's second, then 16 generated frames."""
    pytest.importorskip("resemblyzer")
    pytest.importorskip("pocketsphinx")
    out = tmp_path / "continuation"
    args = ["--checkpoint", str(tiny_model_dir), "--codec-dir", str(codec_dir), "--test-list", str(test_list)]
    args += ["--protocol", "continuation", "--out", str(out), "--limit", "4", "--batch-size", "2"]
    args += ["--prompt-seconds", "1"]
    args += ["--max-ar-steps", "16", "--seed", "3"]
    assert evaluate.main(args) == 0
    printed = capsys.readouterr()
    assert "| metric | mean | 95% interval | n |" in printed.out and "| sim_prompt |" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["protocol"] == "continuation" and summary["not_stopped"] == 4
    assert METRIC_KEYS | {"rtf", "ar_steps_per_s", "ar_frames_per_s"} == set(summary["metrics"])
    rows = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["stopped"] is False for r in rows)
    for r in rows:
        wav, sr = sf.read(out / r["audio"])
        assert sr == 24_000 and len(wav) == (75 + 16) * 320 and r["seconds"] == pytest.approx(91 / 75)
        assert r["generated_from_s"] == 1.0
        assert 0 <= r["wer"] and -1 <= r["sim_prompt"] <= 1 and r["batch"] in (0, 1)
    wers = [r["wer"] for r in rows]
    assert summary["metrics"]["wer"]["mean"] == pytest.approx(np.mean(wers))
    assert summary["metrics"]["wer"]["lo"] == pytest.approx(interval(wers)["lo"])
    assert set(summary["metric_seconds_per_utterance"]) == {"sim", "wer", "mcd"}
    assert summary["timing"]["audio_s"] == pytest.approx(4 * 16 / 75) and summary["timing"]["batches"] == 2
    assert "| wer |" in (out / "summary.md").read_text()
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_ground_truth_ceiling_continuation(test_list, tmp_path, capsys):
    pytest.importorskip("resemblyzer")
    pytest.importorskip("pocketsphinx")
    out = tmp_path / "gt"
    args = ["--ground-truth", "--test-list", str(test_list), "--protocol", "continuation", "--out", str(out)]
    assert evaluate.main(args + ["--prompt-seconds", "1", "--limit", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    print(f"\nground truth, continuation: SIM {m['sim_truth']['mean']:.3f}, WER {m['wer']['mean']:.3f}")
    # SIM scores what follows the prompt's second (as a model's continuation) against the whole recording
    assert summary["timing"] is None and m["mcd"]["mean"] == 0.0 and 0.9 < m["sim_truth"]["mean"] < 0.99
    rows = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    assert all(r["generated_from_s"] == 1.0 for r in rows)
    assert m["duration_ratio"]["mean"] == 1.0 and "rtf" not in m
