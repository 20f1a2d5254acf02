"""Process set-up of the command-line tools (valle_jax.runtime): the XLA CPU flags and TCMalloc env."""

import importlib.metadata
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valle_jax import backend, runtime

FLAG = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.fixture
def checked_jaxlib(monkeypatch):
    """The jaxlib release the flags were measured with, whatever is installed (JAX 0.12 gets none)."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: runtime.CPU_XLA_FLAGS_JAXLIB + "2")


def test_cpu_flags_are_added_after_the_users_own(checked_jaxlib):
    env = runtime.with_cpu_xla_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", FLAG]
    assert runtime.with_cpu_xla_flags({})["XLA_FLAGS"] == FLAG


def test_cpu_flags_follow_the_work(checked_jaxlib):
    """YNNPACK's fusions stay on for training the backbones they speed up; off for training llama
    and for decoding (training_arch None)."""
    assert runtime.with_cpu_xla_flags({}, training_arch="llama")["XLA_FLAGS"] == FLAG
    assert runtime.with_cpu_xla_flags({}, training_arch=None)["XLA_FLAGS"] == FLAG
    for arch in ("transformer", "retnet"):
        assert "XLA_FLAGS" not in runtime.with_cpu_xla_flags({}, training_arch=arch)
    mine = "--xla_force_host_platform_device_count=8"
    assert runtime.with_cpu_xla_flags({"XLA_FLAGS": mine}, training_arch="retnet")["XLA_FLAGS"] == mine


def test_cpu_flags_leave_a_flag_the_user_set_and_honour_the_opt_out(checked_jaxlib):
    mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    assert runtime.with_cpu_xla_flags({"XLA_FLAGS": mine})["XLA_FLAGS"] == mine
    assert "XLA_FLAGS" not in runtime.with_cpu_xla_flags({"VALLE_JAX_CPU_FLAGS": "0"})


def test_cpu_flags_are_not_given_to_a_jaxlib_they_were_not_checked_with(monkeypatch):
    """XLA aborts on a flag it does not know: another release gets the environment unchanged."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.2")
    assert "XLA_FLAGS" not in runtime.with_cpu_xla_flags({})


def test_this_jaxlib_accepts_the_cpu_flags():
    if not importlib.metadata.version("jaxlib").startswith(runtime.CPU_XLA_FLAGS_JAXLIB):
        pytest.skip("the flags are only set for jaxlib " + runtime.CPU_XLA_FLAGS_JAXLIB + "x")
    env = runtime.with_cpu_xla_flags({"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    code = "import jax.numpy as jnp; print(float((jnp.ones((64, 32)) @ jnp.ones((32, 16))).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(64.0 * 32 * 16)


def test_large_dot_options_compile_and_know_when_to_stay_out(monkeypatch):
    """The NAR's per-program YNNPACK dots: accepted by this jaxlib's CPU compiler (same product), and
    not given to another jaxlib or with the opt-out."""
    options = backend.nar_compiler_options()
    if (
        not importlib.metadata.version("jaxlib").startswith(runtime.CPU_XLA_FLAGS_JAXLIB)
        or jax.default_backend() != "cpu"
    ):
        assert options is None
        return
    assert options == runtime.LARGE_DOT_OPTIONS
    a, b = jnp.asarray(np.random.default_rng(0).standard_normal((300, 64)), jnp.float32), jnp.ones((64, 48))
    np.testing.assert_allclose(jax.jit(jnp.matmul, compiler_options=options)(a, b), a @ b, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("VALLE_JAX_CPU_FLAGS", "0")
    assert backend.nar_compiler_options() is None
    monkeypatch.delenv("VALLE_JAX_CPU_FLAGS")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.2")
    assert backend.nar_compiler_options() is None


def test_tcmalloc_env_preloads_and_keeps_a_chosen_release_rate():
    env = runtime.tcmalloc_env("/lib/libtcmalloc.so", {"LD_PRELOAD": "/lib/other.so", "TCMALLOC_RELEASE_RATE": "3"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so:/lib/other.so"
    assert env["TCMALLOC_RELEASE_RATE"] == "3"
    assert runtime.tcmalloc_env("/lib/libtcmalloc.so", {})["TCMALLOC_RELEASE_RATE"] == "10"


@pytest.mark.parametrize("cpu_async", [False, True])
def test_training_process_dispatch_mode(cpu_async):
    """The training command's CPU steps return only once done (so no second step's buffers are
    allocated while the last step's still exist); with --cpu_async_dispatch they return at once."""
    code = f"""
from valle_jax.runtime import start_training_process
start_training_process("llama", cpu_async_dispatch={cpu_async})
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.linalg.matrix_power(x, 64).sum())
x = jnp.ones((700, 700)) / 700
f(x).block_until_ready()
y = f(x)
print(y.is_ready())
"""
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(not cpu_async)
