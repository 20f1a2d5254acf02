import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tools import quantize
from tools.common import find_files
from valle_jax.audio import num_frames

pytestmark = pytest.mark.needs_espeak
ROOT = Path(__file__).resolve().parents[1]


def test_quantize_dir_with_bad_files_resume_and_any_format(corpus, codec, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(corpus / "en-us", audio / "en-us")
    (audio / "x" / "y").mkdir(parents=True)
    (audio / "x" / "y" / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    sf.write(audio / "x" / "y" / "empty.wav", np.zeros((0,), np.float32), 24000)
    t = np.arange(int(1.5 * 44100)) / 44100
    stereo = (0.3 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1)).astype(np.float32)
    sf.write(audio / "x" / "y" / "stereo44k.flac", stereo, 44100)

    out = tmp_path / "codes"
    report = quantize.quantize_dir(audio, out, codec, batch_seconds=10, progress=False)
    failed = {Path(p).name for p, _ in report.failed}
    assert failed == {"corrupt.wav", "empty.wav"} and report.finish() == 1
    n_good = len(find_files(corpus / "en-us", (".wav",))) + 1
    assert report.done == n_good
    codes = np.load(out / "x" / "y" / "stereo44k.codes.npy")
    assert codes.shape == (num_frames(int(1.5 * 24000)), 8) and codes.dtype == np.int16
    for wav in find_files(audio / "en-us", (".wav",)):
        c = np.load(out / wav.relative_to(audio).with_suffix("").with_suffix(".codes.npy"))
        assert c.shape == (num_frames(sf.info(str(wav)).frames), 8)  # corpus audio is 24 kHz already

    # resume: finished files are skipped, not rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.codes.npy")}
    again = quantize.quantize_dir(audio, out, codec, progress=False)
    assert again.done == 0 and again.skipped == n_good
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.codes.npy")}


def test_no_partial_file_when_write_fails(codec, corpus, tmp_path, monkeypatch):
    audio = tmp_path / "audio"
    shutil.copytree(corpus / "en-gb", audio)

    def exploding_save(path, arr):
        Path(path).write_bytes(b"\x93NUMPY partial")  # half a file, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_dir(audio, audio, codec, progress=False)
    assert not list(audio.rglob("*.codes.npy")) and not list(audio.rglob(".*tmp*"))


def test_sigkill_mid_run_leaves_only_complete_files_and_resumes(corpus, codec_dir, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(corpus, audio)
    cmd = [sys.executable, "-m", "tools.quantize", str(audio), "--codec-dir", str(codec_dir), "--batch-seconds", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(audio.rglob("*.codes.npy")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(audio.rglob("*.codes.npy"))
    total = len(find_files(audio, (".wav",)))
    assert 0 < len(done) < total, "the kill should land mid-run"
    for p in done:  # every file under its final name is complete
        assert np.load(p).shape[1] == 8
    rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert f"{total - len(done)} done, {len(done)} already done" in rc.stdout
    assert len(list(audio.rglob("*.codes.npy"))) == total and not list(audio.rglob(".*tmp*"))


def test_cli_reports_missing_codec(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    rc = subprocess.run(
        [sys.executable, "-m", "tools.quantize", str(tmp_path), "--codec-dir", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 2 and "no codec checkpoint" in rc.stderr
