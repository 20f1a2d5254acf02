"""TPU VM pod slices: create, install on every worker, launch training on all workers, tail, stop.

    python -m tools.tpu create  --name N --zone Z --type v5litepod-16 [--runtime V] [--project P] [--spot]
    python -m tools.tpu install --name N --zone Z [--project P] [--python 3.12]
    python -m tools.tpu launch  --name N --zone Z --workdir /mnt/shared/run -- --config configs/preset.py:llama-full ...
    python -m tools.tpu logs    --name N --zone Z [--worker 0] [--lines 100]
    python -m tools.tpu stop    --name N --zone Z [--delete]

Every subcommand prints the exact gcloud commands first; --dry-run prints them and runs nothing.
`create` picks the TPU software version from the accelerator type (Google's table, "TPU software
versions", cloud.google.com/tpu/docs/runtimes: v6e, v5p, v5e, and v4 and older each have their own);
--runtime overrides it, and an unknown type asks for it. `install` ships the current git HEAD (git
archive) to every worker and installs exactly what training on a TPU needs: the package with its
`tpu` extra (jax[tpu], libtpu) at the versions of requirements.lock, no torch, in a virtualenv on a
Python that the package supports (the images' Ubuntu 22.04 has 3.10, so uv provides --python).
`launch` first clears what blocks a TPU after a crashed run (stale training
processes, other processes holding /dev/accel* or /dev/vfio, the libtpu lock file), then starts
`python -m valle_jax.train --distributed` on all workers at once, logging to ~/valle_jax_train.log.
`stop` sends SIGTERM, so each worker finishes its step and the run saves before exiting.
The --workdir must be shared by all workers (Filestore/NFS, or a gcsfuse-mounted bucket): every
host writes its shards of each checkpoint there.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

# TPU software version per TPU generation (cloud.google.com/tpu/docs/runtimes, "PyTorch and JAX",
# checked 2026-12): the prefix of the accelerator type -> --version
RUNTIMES = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e's accelerator types are v5litepod-N
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",  # "v4 and older"
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
PYTHONS = ("3.11", "3.12", "3.13")  # setup.py's python_requires
DEFAULT_PYTHON = "3.12"
REMOTE_DIR = "valle_jax"
LOG = "~/valle_jax_train.log"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
TYPE_RE = re.compile(r"^v\d+[a-z]*(litepod|pod)?-\d+$")


class UsageError(ValueError):
    pass


def runtime_for(accelerator_type: str) -> str:
    """The TPU software version for an accelerator type such as v4-32 or v5litepod-16."""
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
        known = ", ".join(sorted(RUNTIMES))
        raise UsageError(
            f"--type {accelerator_type!r}: no known TPU software version for {generation!r} (known: {known}); "
            "pass --runtime VERSION (see cloud.google.com/tpu/docs/runtimes)"
        )
    return RUNTIMES[generation]


def check(args) -> None:
    if not NAME_RE.match(args.name):
        raise UsageError(f"--name {args.name!r}: lowercase letters, digits and '-', starting with a letter (max 63)")
    if not ZONE_RE.match(args.zone):
        raise UsageError(f"--zone {args.zone!r} does not look like a zone (e.g. us-central2-b)")
    if getattr(args, "type", None) is not None and not TYPE_RE.match(args.type):
        raise UsageError(f"--type {args.type!r} does not look like an accelerator type (e.g. v4-32, v5litepod-16)")
    if getattr(args, "python", None) is not None and args.python not in PYTHONS:
        raise UsageError(f"--python {args.python}: valle-jax supports Python {', '.join(PYTHONS)}")
    if getattr(args, "workdir", None) is not None and not args.workdir.strip():
        raise UsageError("--workdir is empty")


def _base(args) -> list[str]:
    return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def ssh(args, command: str, worker: str = "all") -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        args.name,
        *_base(args),
        f"--worker={worker}",
        "--command",
        command,
    ]


def create_cmds(args) -> list[list[str]]:
    cmd = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        args.name,
        *_base(args),
        "--accelerator-type",
        args.type,
        "--version",
        args.runtime or runtime_for(args.type),
    ]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def install_cmds(args) -> list[list[str]]:
    archive = f"/tmp/{REMOTE_DIR}.tar.gz"
    setup = " && ".join(
        [
            f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/{REMOTE_DIR}.tar.gz -C ~/{REMOTE_DIR}",
            "(command -v espeak-ng >/dev/null"
            " || (sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng libtcmalloc-minimal4))",
            # uv brings the Python the package needs (downloading it when the image lacks it)
            "python3 -m pip install -q --user --upgrade uv",
            f"cd ~/{REMOTE_DIR} && ~/.local/bin/uv venv -q --python {args.python} .venv",
            PYTHON_CHECK,
            # the tpu extra and the locked versions; no torch (the codec extra) on a training VM
            "~/.local/bin/uv pip install -q --python .venv/bin/python -c requirements.lock -e '.[tpu]'",
            ".venv/bin/python -c 'import jax"
            "; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'",
        ]
    )
    return [
        ["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            archive,
            f"{args.name}:~/{REMOTE_DIR}.tar.gz",
            *_base(args),
            "--worker=all",
        ],
        ssh(args, setup),
    ]


# the venv's Python must be one the package supports (uv may find an unsupported system one)
SUPPORTED = ",".join(f"({p.replace('.', ',')})" for p in PYTHONS)
PYTHON_CHECK = (
    f"(.venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] not in ({SUPPORTED}))'"
    f" || (echo 'valle-jax needs Python {PYTHONS[0]} to {PYTHONS[-1]}: .venv has' $(.venv/bin/python --version) >&2;"
    " exit 1))"
)

# '[v]alle_jax' matches the training processes but not the remote shell whose command line holds it
PATTERN = "'[v]alle_jax.train'"
CLEANUP = " ; ".join(
    [
        f"pkill -f {PATTERN} || true",
        "sleep 2",
        "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9 || true",
        "sudo rm -f /tmp/libtpu_lockfile /tmp/tpu_logs/*.lock",
    ]
)


def launch_cmds(args) -> list[list[str]]:
    train = " ".join(
        [
            "cd",
            f"~/{REMOTE_DIR}",
            "&&",
            "nohup",
            ".venv/bin/python",
            "-m",
            "valle_jax.train",
            "--distributed",
            "--commands=off",
            shlex.quote(f"--workdir={args.workdir}"),
            *map(shlex.quote, args.train_args),
            f"> {LOG} 2>&1 < /dev/null &",
        ]
    )
    return [ssh(args, f"{CLEANUP} ; {train}")]


def logs_cmds(args) -> list[list[str]]:
    return [ssh(args, f"tail -n {int(args.lines)} -F {LOG}", worker=str(args.worker))]


def stop_cmds(args) -> list[list[str]]:
    cmds = [
        ssh(args, f"pkill -TERM -f {PATTERN} ; while pgrep -f {PATTERN} >/dev/null; do sleep 2; done; echo stopped")
    ]
    if args.delete:
        cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_base(args), "--quiet"])
    return cmds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.tpu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)

    def common(sp):
        sp.add_argument("--name", required=True, help="TPU VM name")
        sp.add_argument("--zone", required=True)
        sp.add_argument("--project", default=None)
        sp.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        return sp

    c = common(sub.add_parser("create", help="create a TPU VM (pod slice)"))
    c.add_argument("--type", required=True, help="accelerator type, e.g. v4-32, v5litepod-16")
    c.add_argument("--runtime", default=None, help="TPU software version (default: the one for --type's generation)")
    c.add_argument("--spot", action="store_true", help="spot (preemptible) capacity; SIGTERM saves the run")
    i = common(sub.add_parser("install", help="ship git HEAD to every worker and install it (the tpu extra)"))
    i.add_argument("--python", default=DEFAULT_PYTHON, help=f"Python version for the venv: {', '.join(PYTHONS)}")
    la = common(sub.add_parser("launch", help="start training on all workers"))
    la.add_argument("--workdir", required=True, help="run directory shared by all workers")
    la.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then valle_jax.train flags (--config ...)")
    lo = common(sub.add_parser("logs", help="follow a worker's training log"))
    lo.add_argument("--worker", type=int, default=0)
    lo.add_argument("--lines", type=int, default=100)
    st = common(sub.add_parser("stop", help="SIGTERM the run on all workers (it saves), optionally delete the VM"))
    st.add_argument("--delete", action="store_true")
    return p


COMMANDS = {"create": create_cmds, "install": install_cmds, "launch": launch_cmds, "logs": logs_cmds, "stop": stop_cmds}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.action == "launch":
        args.train_args = [a for a in args.train_args if a != "--"]
        if not any(a.startswith("--config") for a in args.train_args):
            print("error: launch needs the training flags after --, at least --config=configs/...", file=sys.stderr)
            return 2
    try:
        check(args)
        if args.action == "create" and args.runtime is None:
            runtime_for(args.type)  # an unknown type is refused before anything runs
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in COMMANDS[args.action](args):
        print("+ " + shlex.join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd)
            if rc:
                print(f"error: the command above failed with exit status {rc}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
