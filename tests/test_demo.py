import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.needs_espeak
def test_demo_runs_end_to_end_and_reruns_quickly(tmp_path, codec_dir):
    cmd = [
        sys.executable,
        "-m",
        "tools.demo",
        "--out",
        str(tmp_path / "demo"),
        "--voices",
        "3",
        "--sentences",
        "4",
        "--codec-dir",
        str(codec_dir),
        "--steps",
        "3",
    ]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "16 batches at" in first.stdout and "demo finished" in first.stdout
    assert (tmp_path / "demo" / "store" / "index.json").exists()
    assert "finished 3 steps" in first.stderr and (tmp_path / "demo" / "run" / "loss.png").exists()
    assert "TensorBoard:" in first.stdout and "loss plot:" in first.stdout
    assert "6/6 synthesise in a held-out voice" in first.stdout and "wrote 1 file(s)" in first.stdout
    assert (tmp_path / "demo" / "demo_speech.wav").stat().st_size > 44  # a wav with samples
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0
    assert "make_demo_corpus: 0 done, 12 already done" in again.stdout
    assert "quantize: 0 done, 12 already done" in again.stdout
    assert "resumed from step 3" in again.stderr
