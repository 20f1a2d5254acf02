"""Runs one benchmark configuration in a fresh process (so its peak memory is its own) and returns
the JSON object the child prints last. Shared by the benchmark scripts of this folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(
    script: str,
    args: list[str],
    what: str,
    devices: int | None = None,
    tcmalloc: bool = True,
    training_arch: str | None = None,
) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices is not None:  # keeps the caller's other XLA flags
        kept = [
            f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count=")
        ]
        env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    from valle_jax.runtime import with_cpu_xla_flags

    env = with_cpu_xla_flags(env, training_arch)  # the XLA flags the command-line tools use (valle_jax/runtime.py)
    if tcmalloc:  # as `python -m valle_jax.train` runs (valle_jax/runtime.py)
        from valle_jax.runtime import find_tcmalloc, tcmalloc_env

        lib = find_tcmalloc()
        if lib:
            env = tcmalloc_env(lib, env)
    out = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
