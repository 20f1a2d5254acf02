import subprocess
import sys
from pathlib import Path

import pytest

from configs import base, demo, tiny
from valle_jax.config import data_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", [base, tiny, demo])
def test_presets_build_valid_data_configs(preset):
    cfg = data_config(preset.get_config())
    assert cfg.batch_size >= 1 and cfg.prompt_frames == int(cfg.prompt_duration * 75) + 75


def test_every_base_key_has_a_unit_comment():
    for line in (ROOT / "configs" / "base.py").read_text().splitlines():
        if line.strip().startswith(("c.", "d.")) and "=" in line and "ConfigDict()" not in line:
            assert "#" in line, f"no unit/meaning comment: {line.strip()}"


@pytest.mark.needs_espeak
def test_command_line_overrides_and_typos(store_path):
    cmd = [sys.executable, "-m", "tools.draw_batches", "--config", "configs/tiny.py",
           f"--config.data.store={store_path}", "--batches", "2"]
    ok = subprocess.run(cmd + ["--config.data.batch_size=2", "--config.data.text_buckets=(64,128)"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "text (2, 64)" in ok.stdout and "batches of 2 per epoch" in ok.stdout
    typo = subprocess.run(cmd + ["--config.data.batch_sise=2"], cwd=ROOT, capture_output=True, text=True)
    assert typo.returncode != 0 and "batch_sise" in typo.stderr and "batch_size" in typo.stderr
