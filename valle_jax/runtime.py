"""Process set-up that must happen before JAX starts: a page-keeping allocator and XLA CPU flags.

XLA's CPU runtime gets its buffers from the C allocator. glibc hands large blocks back to the
kernel when they are freed, so every step faults in (and the kernel zeroes) every large buffer
again: on the development machine a 112 MB elementwise op took 58 ms that way and 8 ms with
TCMalloc, which keeps the pages (tcmalloc is what TensorFlow and PyTorch recommend for CPU too).
`reexec_with_tcmalloc` restarts the current command with TCMalloc preloaded when the library is
installed (Debian: libtcmalloc-minimal4) and it is not loaded yet; VALLE_JAX_TCMALLOC=0 turns it off.

TCMalloc's default release rate returns freed pages to the kernel too lazily for XLA's pattern of
large buffers of varying sizes: the resident set kept growing over the steps (quarter preset, 8
steps: 8.7 GB while XLA's buffers are 4.0 GB). TCMALLOC_RELEASE_RATE=10 holds it at 4.8 GB at the
same speed (aggressive decommit also bounds it, but costs 60% more per step); it is set unless the
environment sets it. (What still grew at the half preset was two steps' buffers alive at once
under JAX's asynchronous CPU dispatch, which the training command turns off: docs/training.md.)

XLA flags (`with_cpu_xla_flags`): jaxlib 0.10 hands dots on the CPU, with the elementwise ops and
reductions around them, to YNNPACK fusions. Whether that helps depends on the work. Half preset on
the 2-core development machine (2026-11-26), fusions off vs on: training steps at reference shapes,
llama 18.3 vs 20.9 s, but transformer 33.6 vs 18.4 s and retnet 35.8 vs 21.5 s; decoding, retnet
batch 1 56 vs 45 steps/s, batch 8 180 vs 111 tokens/s, NAR 3.7 vs 4.3 s (llama's [8, 512] x
[512, 2048] decoding products were 3x slower with them). So the fusions are turned off except when
training a backbone of YNN_TRAINING_ARCHS, unless XLA_FLAGS already names the flag or
VALLE_JAX_CPU_FLAGS=0. XLA aborts on a flag it does not know, so this is only done for the jaxlib
release it was measured with.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # empty: no dot goes to YNNPACK
CPU_XLA_FLAGS_JAXLIB = "0.10."  # the releases that know these flags (setup.py pins 0.10.2)
YNN_TRAINING_ARCHS = ("transformer", "retnet")  # backbones that train faster with YNNPACK's fusions


def cpu_flags_apply(env) -> bool:
    """Whether our XLA CPU flags may be set: not opted out (VALLE_JAX_CPU_FLAGS=0 in `env`), and the
    installed jaxlib is the release they were checked with."""
    if env.get("VALLE_JAX_CPU_FLAGS", "1") == "0":
        return False
    try:
        return importlib.metadata.version("jaxlib").startswith(CPU_XLA_FLAGS_JAXLIB)
    except importlib.metadata.PackageNotFoundError:
        return False


def with_cpu_xla_flags(base: dict | None = None, training_arch: str | None = None) -> dict:
    """`base` (default: this process's environment) with CPU_XLA_FLAGS added to XLA_FLAGS, each
    unless XLA_FLAGS already sets it; unchanged for a process that trains a backbone of
    YNN_TRAINING_ARCHS (`training_arch`; None: decoding or anything else), with
    VALLE_JAX_CPU_FLAGS=0, or with another jaxlib."""
    env = dict(os.environ if base is None else base)
    if not cpu_flags_apply(env) or training_arch in YNN_TRAINING_ARCHS:
        return env
    flags = env.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items() if f"--{name}=" not in flags]
    if extra:
        env["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return env


# One compiled program's override of the process flag: the NAR's products have hundreds of rows,
# which YNNPACK's dot runs faster than XLA's (half preset, 7 levels, min of 4-5 alternating runs on
# 2026-11-26: llama 2.69-2.76 vs 3.10-3.34 s, retnet 2.56 vs 2.79 s, transformer 2.48 vs 2.45 s).
LARGE_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def use_cpu_xla_flags(training_arch: str | None = None) -> None:
    """Applies `with_cpu_xla_flags` to this process: call before JAX's first computation (XLA reads
    XLA_FLAGS when its backend starts)."""
    os.environ.update(with_cpu_xla_flags(training_arch=training_arch))


def start_training_process(training_arch: str, cpu_async_dispatch: bool = False) -> None:
    """What `python -m valle_jax.train` sets before JAX's backend starts: the XLA CPU flags for the
    backbone it trains and JAX's CPU dispatch mode. With asynchronous dispatch a step can start while
    the last one's temporaries are still allocated (PJRT frees them after the outputs are ready), so
    two steps' XLA buffers can be alive at once: half preset 8.55 GB resident instead of 4.95 GB, at
    the same speed (docs/training.md, CPU notes). The mode only concerns the CPU client."""
    use_cpu_xla_flags(training_arch)
    import jax  # noqa: PLC0415 - heavy: this module runs before the TCMalloc re-exec and JAX's start

    jax.config.update("jax_cpu_enable_async_dispatch", cpu_async_dispatch)  # read when the CPU client is made


def find_tcmalloc() -> str | None:
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    found = glob.glob("/usr/lib*/**/libtcmalloc*.so*", recursive=True)
    return sorted(found)[0] if found else None


def tcmalloc_env(lib: str, base: dict | None = None) -> dict:
    """`base` (default: this process's environment) with `lib` preloaded and its release rate set."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env.setdefault("TCMALLOC_RELEASE_RATE", "10")
    return env


def reexec_with_tcmalloc(module: str) -> None:
    """Replaces this process by `python -m module <same args>` with TCMalloc preloaded, if useful."""
    if os.environ.get("VALLE_JAX_TCMALLOC", "1") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if "jax" in sys.modules:
        return  # called too late: keep the allocator the process started with
    lib = find_tcmalloc()
    if lib is None:
        return
    env = tcmalloc_env(lib)
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
