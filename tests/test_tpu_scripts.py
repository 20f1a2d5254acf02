"""tools.tpu: argument checks and the exact commands printed by --dry-run (nothing is run)."""

import shlex

import pytest

from tools.tpu.pod import main

BASE = ["--name", "valle-pod", "--zone", "us-central2-b", "--dry-run"]


def commands(capsys, *argv) -> list[list[str]]:
    assert main(list(argv)) == 0
    return [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]


def test_create_and_stop(capsys):
    (create,) = commands(capsys, "create", *BASE, "--type", "v4-32", "--spot", "--project", "p1")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "valle-pod"]
    assert create[create.index("--accelerator-type") + 1] == "v4-32" and "--spot" in create
    assert create[create.index("--project") + 1] == "p1"
    stop, delete = commands(capsys, "stop", *BASE, "--delete")
    assert "--worker=all" in stop and "pkill -TERM" in stop[-1]
    assert delete[4] == "delete" and "--quiet" in delete


def test_install_ships_head_to_every_worker(capsys):
    archive, scp, setup = commands(capsys, "install", *BASE)
    assert archive[:2] == ["git", "archive"] and archive[-1] == "HEAD"
    assert scp[4] == "scp" and "--worker=all" in scp
    remote = setup[-1]
    assert "-c requirements.lock -e '.[tpu]'" in remote  # the tpu extra at the locked versions
    assert "torch" not in remote and "cuda" not in remote
    assert "uv venv -q --python 3.12 .venv" in remote  # the image's Python 3.10 is too old
    assert remote.index("sys.version_info") < remote.index("pip install -q --python .venv")  # checked first


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_the_software_version_from_the_accelerator_type(capsys, accelerator, runtime):
    (create,) = commands(capsys, "create", *BASE, "--type", accelerator)
    assert create[create.index("--version") + 1] == runtime
    (create,) = commands(capsys, "create", *BASE, "--type", accelerator, "--runtime", "my-image")
    assert create[create.index("--version") + 1] == "my-image"


def test_create_refuses_an_unknown_generation_unless_given_a_runtime(capsys):
    assert main(["create", *BASE, "--type", "v9x-8"]) == 2
    assert "pass --runtime" in capsys.readouterr().err
    (create,) = commands(capsys, "create", *BASE, "--type", "v9x-8", "--runtime", "v2-alpha-tpu9")
    assert create[create.index("--version") + 1] == "v2-alpha-tpu9"


def test_launch_clears_stale_holders_then_trains_everywhere(capsys):
    (launch,) = commands(
        capsys,
        "launch",
        *BASE,
        "--workdir",
        "/mnt/fs/run 1",
        "--",
        "--config=configs/preset.py:llama-full",
        "--config.data.store=/mnt/fs/store",
    )
    assert launch[4] == "ssh" and "--worker=all" in launch
    remote = launch[-1]
    assert remote.index("rm -f /tmp/libtpu_lockfile") < remote.index("nohup")  # cleanup first
    assert "pkill -f '[v]alle_jax.train'" in remote and "/dev/accel" in remote  # not matching its own shell
    assert "--distributed" in remote and "'--workdir=/mnt/fs/run 1'" in remote
    assert "--config=configs/preset.py:llama-full" in remote


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", "--name", "Bad_Name", "--zone", "us-central2-b", "--type", "v4-32"], "--name"),
        (["create", "--name", "ok", "--zone", "nowhere", "--type", "v4-32"], "--zone"),
        (["create", "--name", "ok", "--zone", "us-central2-b", "--type", "tpu"], "--type"),
        (["launch", "--name", "ok", "--zone", "us-central2-b", "--workdir", "/x"], "--config"),
        (["install", "--name", "ok", "--zone", "us-central2-b", "--python", "3.10"], "--python"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(capsys, argv, message):
    assert main(argv + ["--dry-run"]) == 2
    assert message in capsys.readouterr().err
