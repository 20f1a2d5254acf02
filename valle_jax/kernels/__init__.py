"""Hand-written CPU kernels for decoding steps, compiled on first use and called through XLA's FFI.

`rows_linear(x_MK, w_PKC, n)` is x @ w for the few rows of a decoding step, with float32 or bfloat16
weights packed by `pack` in panels of 32 columns, or BitNet's ternary weights packed 2 bits a weight
in the same panels (uint32 [P, K, 2], valle_jax.ternary's layout); `cache_attention` is a step's attention over the
filled part of its KV cache; `block_attention` the attention of many queries at once over it (the
NAR's levels, a prefill) (cpu_kernels.cc says why XLA's own dot and attention are not used there).
The library is built from
cpu_kernels.cc with the system's C++ compiler ($CXX, else c++/g++/clang++) the first time a process
asks for it, into $VALLE_JAX_KERNEL_CACHE (default ~/.cache/valle_jax/kernels), named by a hash of
the source, the compiler flags and the jaxlib version, so later processes load it directly. It is
built for the widest instruction set this CPU has: AVX-512 (16 floats per vector, 32 registers)
where it has avx512f/bw/dq/vl, else AVX2 with FMA. VALLE_JAX_CPU_KERNELS=avx2 picks the AVX2 build
on an AVX-512 CPU (for comparison); `isas()` lists what this CPU can run, and every function takes
an `isa` to pick one in-process. Where the kernels cannot be used (not an x86-64 CPU with AVX2 and
FMA, no compiler, a failed build, or VALLE_JAX_CPU_KERNELS=0), `available()` is False, the reason
is logged once, and callers use XLA (valle_jax.backend decides). `python -m valle_jax.kernels build`
builds them ahead of time. The kernels are frozen: they serve CPU decoding only, off the GPU/TPU path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# instruction sets, widest first: the CPU flags each needs, and the compiler flags of its build
ISAS = {
    "avx512": (
        ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"),
        ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"),
    ),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
}
TARGETS = {
    "valle_rows_linear": "ValleRowsLinear",
    "valle_cache_attention": "ValleCacheAttention",
    "valle_block_attention": "ValleBlockAttention",
}
MAX_ROWS = 128  # rows up to which rows_linear beats XLA's dot (docs/synthesis.md)
# smaller weight matrices stay with XLA's dot, which fuses them with their neighbours: a custom call
# costs ~1-2 us (tiny preset, d_model 48: 7.5k steps/s with the kernels, 11.7k without)
MIN_WEIGHT_ELEMENTS = 1 << 16
# a build takes ~10-30 s; a compiler that hangs (a full disk, a broken toolchain) must not hang decoding
BUILD_TIMEOUT_S = int(os.environ.get("VALLE_JAX_KERNEL_BUILD_TIMEOUT", "300"))


class KernelUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("VALLE_JAX_KERNEL_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "valle_jax" / "kernels"


@functools.cache
def _cpu_flags() -> frozenset[str] | str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 with AVX2, not {platform.machine()}"
    try:
        return frozenset(
            next(
                (
                    line.split(":", 1)[1].split()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags")
                ),
                [],
            )
        )
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2 and FMA"


def isas() -> list[str]:
    """The instruction sets of ISAS this CPU can run, widest first."""
    flags = _cpu_flags()
    return [] if isinstance(flags, str) else [name for name, (need, _) in ISAS.items() if set(need) <= flags]


def cpu_supported() -> str | None:
    """None when this CPU can run the kernels, else why not."""
    flags = _cpu_flags()
    if isinstance(flags, str):
        return flags
    missing = [f for f in ISAS["avx2"][0] if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def isa() -> str | None:
    """The instruction set the kernels are used with: VALLE_JAX_CPU_KERNELS when it names one, else
    the widest this CPU has (None: none)."""
    asked = os.environ.get("VALLE_JAX_CPU_KERNELS", "1")
    if asked in ISAS:
        return asked
    found = isas()
    return found[0] if found else None


def compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name)
    return next((path for path in found if path), None)


def flags(isa_name: str) -> tuple[str, ...]:
    return FLAGS + ISAS[isa_name][1]


def library_path(isa_name: str) -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(flags(isa_name)).encode())
    key.update(importlib.metadata.version("jaxlib").encode())
    return cache_dir() / f"cpu_kernels-{isa_name}-{key.hexdigest()[:16]}.so"


def target(name: str, isa_name: str) -> str:
    """The FFI target of kernel `name` in the `isa_name` build."""
    return f"{name}_{isa_name}"


def build(cxx: str, out: Path, isa_name: str = "avx2") -> None:
    """Compiles the library to `out`, through a temporary file renamed into place (processes that
    build at the same time each rename a complete library)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags(isa_name), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        log.info("building the CPU decoding kernels (%s), once: %s", isa_name, out)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise KernelUnavailable(f"compiling {SOURCE.name} took over {BUILD_TIMEOUT_S} s ({' '.join(cmd)})") from e
        if done.returncode != 0:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(isa_name: str | None = None) -> str | None:
    """Builds (if needed), loads and registers the `isa_name` library (None: `isa()`'s): None on
    success, else the reason."""
    if os.environ.get("VALLE_JAX_CPU_KERNELS", "1") == "0":
        return "VALLE_JAX_CPU_KERNELS=0"
    reason = cpu_supported()
    if reason:
        return reason
    isa_name = isa_name or isa()
    if isa_name not in isas():
        return f"this CPU cannot run the {isa_name} build (it has {', '.join(isas())})"
    return _load_isa(isa_name)


@functools.cache
def _load_isa(isa_name: str) -> str | None:
    path = library_path(isa_name)
    try:
        if not path.exists():
            cxx = compiler()
            if cxx is None:
                return "no C++ compiler found (set CXX, or install g++)"
            build(cxx, path, isa_name)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target(name, isa_name), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        return str(e)
    return None


def unavailable_reason(isa_name: str | None = None) -> str | None:
    """None when decoding steps on the CPU can use the kernels (builds them on the first call),
    else why not."""
    return _load(isa_name)


def available(isa_name: str | None = None) -> bool:
    """Whether decoding steps on the CPU can use the kernels (builds them on the first call)."""
    reason = _load(isa_name)
    if reason is not None:
        _log_once(reason)
    return reason is None


@functools.cache
def _log_once(reason: str) -> None:
    log.warning("valle_jax CPU decoding kernels unavailable, using XLA's dot instead: %s", reason)


def _require(isa_name: str | None) -> str:
    """The instruction set to call (isa_name, else `isa()`), its library loaded."""
    if not available(isa_name):
        raise KernelUnavailable(_load(isa_name))
    return isa_name or isa()


PANEL = 32  # columns per panel of a packed weight (cpu_kernels.cc: kPanel)


def panels(n: int) -> int:
    """Panels of a packed weight with n columns."""
    return -(-n // PANEL)


def pack(w_KN: jax.Array) -> jax.Array:
    """w [K, N] as rows_linear reads it: [P, K, 32], P = ceil(N / 32), panel p holding columns
    32p .. 32p + 31 row after row (zeros past N): each panel one contiguous stream."""
    k, n = w_KN.shape
    p = panels(n)
    return jnp.pad(w_KN, ((0, 0), (0, p * PANEL - n))).reshape(k, p, PANEL).transpose(1, 0, 2)


def unpack(w_PKC: jax.Array, n: int) -> jax.Array:
    """The [K, n] weight `pack` made w_PKC from."""
    p, k, c = w_PKC.shape
    return w_PKC.transpose(1, 0, 2).reshape(k, p * c)[:, :n]


def rows_linear(x_MK: jax.Array, w_PKC: jax.Array, n: int, isa: str | None = None) -> jax.Array:
    """float32 [M, n] = x @ w, on the CPU: x float32 [M, K], w float32 or bfloat16 [K, n] packed by
    `pack`, or ternary (-1, 0, 1) packed as uint32 [P, K, 2] by valle_jax.ternary.pack."""
    isa = _require(isa)
    m, k = x_MK.shape
    if w_PKC.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint32):
        raise ValueError(
            f"rows_linear: weights must be float32 or bfloat16 (or ternary bits, uint32), not {w_PKC.dtype}"
        )
    row = 2 if w_PKC.dtype == jnp.uint32 else PANEL  # a ternary panel row: two 32-bit masks
    if w_PKC.shape != (panels(n), k, row):
        raise ValueError(
            f"rows_linear: x {x_MK.shape} and packed w {w_PKC.shape} do not make [{m}, {n}] (w must be "
            f"[{panels(n)}, {k}, {row}])"
        )
    call = jax.ffi.ffi_call(
        target("valle_rows_linear", isa), jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )
    return call(x_MK.astype(jnp.float32), w_PKC)


def cache_attention(
    q_NQD: jax.Array, k_NCD: jax.Array, v_NDC: jax.Array, mask_BSC: jax.Array, live: jax.Array, isa: str | None = None
) -> jax.Array:
    """float32 [N, Q, D]: softmax(q k^T / sqrt(D)) v per unit n (batch row n // (N / B), one kv head),
    over cache slots [0, live) that the mask allows; query q of a unit uses mask row q // (Q / S).
    Slots from `live` on must be masked: they are not read. Keys and values are float32 or
    bfloat16 (read as they are: a bfloat16 cache streams half the bytes), or uint16 holding
    bfloat16 bits."""
    return _attention_call("valle_cache_attention", isa, q_NQD, k_NCD, v_NDC, mask_BSC, live, keys_transposed=False)


def block_attention(
    q_NQD: jax.Array, kT_NDC: jax.Array, v_NDC: jax.Array, mask_BSC: jax.Array, live: jax.Array, isa: str | None = None
) -> jax.Array:
    """What `cache_attention` computes, for many queries per unit (a NAR level, a prefill): keys
    transposed, [N, D, C], like the values. Eight queries at a time; each group reads the slots up
    to the last one any of them may see (a causal group skips the rest)."""
    return _attention_call("valle_block_attention", isa, q_NQD, kT_NDC, v_NDC, mask_BSC, live, keys_transposed=True)


def _attention_call(name: str, isa: str | None, q, k, v, mask, live, *, keys_transposed: bool) -> jax.Array:
    """Checks the operands of attention kernel `name` (keys [N, C, D], or [N, D, C] transposed) and calls it."""
    isa = _require(isa)
    n, nq, d = q.shape
    b, s, c = mask.shape
    k_shape = (n, d, c) if keys_transposed else (n, c, d)
    if k.shape != k_shape or v.shape != (n, d, c) or n % b or nq % s:
        raise ValueError(
            f"{name.removeprefix('valle_')}: q {q.shape}, k {k.shape}, v {v.shape} and mask {mask.shape} disagree"
        )
    call = jax.ffi.ffi_call(target(name, isa), jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    # bfloat16 keys and values (or their bits, uint16: backend.cache_storage) are read as they are
    kv_dtype = k.dtype if k.dtype == v.dtype and k.dtype in (jnp.bfloat16, jnp.uint16) else jnp.float32
    return call(
        q.astype(jnp.float32), k.astype(kv_dtype), v.astype(kv_dtype), mask.astype(bool), jnp.asarray(live, jnp.int32)
    )
