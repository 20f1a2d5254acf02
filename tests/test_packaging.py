"""Packaging: the core install never loads torch, a missing codec extra is named, the console scripts run
their modules, and --config finds the installed presets. (The fresh-virtualenv installs themselves take
minutes: tools/check_install.sh, docs/install.md.)"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from valle_jax import cli, config_files

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter where torch and encodec cannot be imported (as in the core install);
# every attempt to import them is recorded, even one that something catches.
NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys
    attempts = []

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "encodec", "torchaudio"):
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoTorch())
    """
)

CORE = textwrap.dedent(
    """
    import numpy as np
    import valle_jax, valle_jax.train, valle_jax.training.loop, valle_jax.synthesize, valle_jax.export
    import tools.quantize, tools.phonemize, tools.pack
    from valle_jax import decoding as D
    from valle_jax.codec import Codec, CodecUnavailable
    from valle_jax.config import ModelConfig
    from valle_jax.models import init_model
    from valle_jax.training.monitor import MetricsWriter

    writer = MetricsWriter(Path(sys.argv[1]))  # training's TensorBoard and metrics.jsonl
    writer.write(0, {"loss": 1.0})
    writer.close()
    decoder = D.Decoder(init_model(ModelConfig(arch="transformer", d_model=32, n_heads=2, n_layers=1), 0))
    inputs = D.make_inputs([[5, 6, 7]], [np.ones((6, 8), np.int64)], [0], 8)
    out = decoder.generate(inputs, D.Settings(max_ar_steps=3, ar_temp=0.0, nar_temp=0.0))
    assert out.codes[0].shape[1] == 8, out.codes[0].shape  # decoded to codes
    assert not attempts, attempts
    try:
        Codec.load(None)
    except CodecUnavailable as e:
        print(e)
    """
)


def test_training_and_decoding_to_codes_never_import_torch(tmp_path):
    code = NO_TORCH + "from pathlib import Path\n" + CORE
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUMPY_RANK_PROMOTION"}  # what is imported, not how
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pip install 'valle-jax[codec]'" in run.stdout  # audio needs the codec extra, and says so
    assert (tmp_path / "metrics.jsonl").is_file() and any((tmp_path / "tb").iterdir())


def test_tensorboard_writer_leaves_an_installed_torch_alone(tmp_path):
    pytest.importorskip("torch")
    code = (
        "import sys\nfrom valle_jax.tensorboard import summary_writer\n"
        f"w = summary_writer({str(tmp_path)!r}); w.add_scalar('x', 1.0, 0); w.close()\n"
        "assert 'torch' not in sys.modules\nimport torch\n"  # and torch still imports afterwards
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_console_script_runs_the_module_as_python_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/valle-jax-tpu", "create", "--name", "x", "--zone", "us-central2-b"])
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--type", "v4-32", "--dry-run"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    assert "--version tpu-ubuntu2204-base" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["valle-jax", "nonsense"])
    assert cli.main() == 2 and "unknown command 'nonsense'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["valle-jax", "--help"])
    assert cli.main() == 0 and "quantize" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_console_script_names_a_runnable_module(command):
    import importlib.util

    module = cli.COMMANDS[command]
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    if spec.submodule_search_locations:  # a package runs its __main__ (looked up without importing it)
        assert (Path(next(iter(spec.submodule_search_locations))) / "__main__.py").is_file(), module


def test_config_flag_finds_installed_presets_and_prefers_real_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: as outside a checkout
    installed = config_files.installed_configs()
    assert installed is not None and (installed / "preset.py").is_file()
    assert config_files.resolve("configs/preset.py:llama-half") == f"{installed / 'preset.py'}:llama-half"
    assert config_files.resolve_argv(["x", "--config=configs/demo.py"]) == ["x", f"--config={installed / 'demo.py'}"]
    assert config_files.resolve("configs/nothing.py") == "configs/nothing.py"  # train.py reports it missing
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.py").write_text("")
    assert config_files.resolve("configs/demo.py") == "configs/demo.py"  # the user's own file wins


def test_help_of_the_absl_commands_exits_0(capsys):
    """absl's own --help exits 1: the console scripts' --help must succeed like the argparse ones.
    (tools.draw_batches does the same; both define --config, so one process imports only one.)"""
    from valle_jax import train

    with pytest.raises(SystemExit) as done:
        train.parse_flags(["valle-jax-train", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out  # the usage (of __main__: pytest, here)
