import subprocess
import sys
from pathlib import Path

import pytest

from configs import base, demo, preset, tiny
from valle_jax.config import ConfigError, data_config, model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", [base, tiny, demo])
def test_presets_build_valid_data_configs(preset):
    cfg = data_config(preset.get_config())
    assert cfg.batch_size >= 1 and cfg.prompt_frames == int(cfg.prompt_duration * 75) + 75


@pytest.mark.parametrize("name", ["transformer-quarter", "llama-half", "llama-double"])
def test_model_presets(name):
    cfg = model_config(preset.get_config(name))
    arch, size = name.split("-")
    assert (
        cfg.arch == arch
        and (cfg.d_model, cfg.n_heads, cfg.n_layers)
        == {"quarter": (256, 4, 12), "half": (512, 8, 12), "double": (1024, 16, 24)}[size]
    )
    assert model_config(tiny.get_config()).d_model == 48
    c = base.get_config()
    c.model.size = "huge"
    with pytest.raises(ConfigError, match="model.size"):
        model_config(c)


def test_every_base_key_has_a_unit_comment():
    for line in (ROOT / "configs" / "base.py").read_text().splitlines():
        if line.strip().startswith(("c.", "d.", "m.")) and "=" in line and "ConfigDict()" not in line:
            assert "#" in line, f"no unit/meaning comment: {line.strip()}"


@pytest.mark.needs_espeak
def test_command_line_overrides_and_typos(store_path):
    cmd = [
        sys.executable,
        "-m",
        "tools.draw_batches",
        "--config",
        "configs/tiny.py",
        f"--config.data.store={store_path}",
        "--batches",
        "2",
    ]
    ok = subprocess.run(
        cmd + ["--config.data.batch_size=2", "--config.data.text_buckets=(64,128)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "text (2, 64)" in ok.stdout and "batches of 2 per epoch" in ok.stdout
    typo = subprocess.run(cmd + ["--config.data.batch_sise=2"], cwd=ROOT, capture_output=True, text=True)
    assert typo.returncode != 0 and "batch_sise" in typo.stderr and "batch_size" in typo.stderr


@pytest.mark.parametrize(
    "args,names",
    [
        (["--config", "configs/tiny.py", "--config.train.stepz=3"], "--config.train.stepz: no such config key"),
        (["--config", "configs/nope.py"], "configs/nope.py"),
    ],
)
def test_train_command_line_errors_are_one_line(tmp_path, args, names):
    cmd = [sys.executable, "-m", "valle_jax.train", *args, f"--workdir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and names in p.stderr and "Traceback" not in p.stderr
    verbose = subprocess.run([*cmd, "--verbose"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verbose.returncode != 0 and ("Traceback" in verbose.stderr or "no such file" not in verbose.stderr)
