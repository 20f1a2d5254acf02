"""The one place that decides how this machine runs the model's hot operations, and says why.

Everything platform-specific lives here, so model code calls plain functions (`linear`,
`attend_cache`, `computed_once`, `batched_dot_operands`) and never asks which device it runs on:

- **Which backend decodes** (`choose`): XLA's own ops everywhere, or, on an x86-64 CPU where they
  build, the hand-written decoding kernels of `valle_jax.kernels` (frozen: no new kernels). The
  choice is made once per `Decoder` and carried by what it makes: its step weights (`StepWeight`)
  and its KV cache (`CacheLayout`, static inside the cache), so no flag is threaded through layers.
- **How a decoding plan computes** (`DecodingPlan`): on the kernels, bfloat16 means bfloat16 step
  weights streamed by the kernel with float32 compute (XLA's CPU dot is ~10x slower in bfloat16);
  elsewhere it means bfloat16 matrices computed in bfloat16.
- **How a KV cache is held** (`cache_storage`): a bfloat16 cache on the CPU as its bits (uint16).
- **Per-program compiler options** (`nar_compiler_options`).
- **Two CPU-only workarounds of XLA's CPU compiler** (`computed_once`, `batched_dot_operands`).

`on_cpu()` is the package's only test of the platform.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import typing

import jax
import jax.numpy as jnp

from valle_jax import kernels, runtime, ternary

Array = jax.Array

STEP_POSITIONS = 4  # new positions up to which a cached call attends one query at a time (a decoding step)


@functools.cache
def platform() -> str:
    """ "cpu", "gpu" or "tpu": the platform of JAX's default backend."""
    return jax.default_backend()


def on_cpu() -> bool:
    return platform() == "cpu"


def grouped_matmul_native() -> bool:
    """Whether `jax.lax.ragged_dot` is a real grouped matmul here (GPU, TPU). On the CPU jax 0.10
    lowers it to a product of every row with every group (docs/model.md, Mixture of experts)."""
    return not on_cpu()


class Backend(enum.Enum):
    XLA = "xla"  # XLA's own ops (every platform)
    CPU_KERNELS = "cpu_kernels"  # valle_jax.kernels for decoding steps, NAR levels and prefills


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str  # why, in words (logged by the decoder, printed by the decode benchmark)


def choose(cpu_kernels: bool = True) -> Choice:
    """The decoding backend for this process: the CPU kernels where asked for, on a CPU, and built."""
    if not cpu_kernels:
        return Choice(Backend.XLA, "the CPU kernels were turned off by the caller")
    if not on_cpu():
        return Choice(Backend.XLA, f"the platform is {platform()}: the kernels are for CPUs")
    reason = kernels.unavailable_reason()
    if reason is not None:
        return Choice(Backend.XLA, f"the CPU kernels are unavailable: {reason}")
    return Choice(Backend.CPU_KERNELS, f"a CPU with the {kernels.isa()} build of the decoding kernels")


# ---- the KV cache's storage ---------------------------------------------------------------------


def cache_storage(dtype) -> jnp.dtype:
    """The dtype a KV cache of `dtype` is held in: a bfloat16 cache on the CPU as its bits (uint16).
    XLA's CPU compiler turns the in-place write into a bfloat16 buffer into a float32 write of the
    whole buffer, converted there and back at every step (half preset, batch 8: 56 of 85 ms per
    step); an integer buffer is written in place."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 and on_cpu() else dtype


def as_stored(x: Array, storage) -> Array:
    """x as a cache held in `storage` holds it."""
    if storage == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def cache_values(c: Array) -> Array:
    """A cache buffer's values (bfloat16 for one held as bits)."""
    return jax.lax.bitcast_convert_type(c, jnp.bfloat16) if c.dtype == jnp.uint16 else c


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Carried inside a KV cache (a static pytree node: no leaves): which backend attends over it."""

    backend: Backend = Backend.XLA


# ---- decoding plans -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodingPlan:
    """How a Decoder computes, decided once from the backend and the model's dtype."""

    backend: Backend
    reason: str
    model_dtype: str  # the model config's dtype
    kv_dtype: str  # the AR's KV cache (recurrent states stay float32)

    @classmethod
    def make(cls, model_dtype: str, cpu_kernels: bool = True, kv_dtype: str | None = None) -> DecodingPlan:
        choice = choose(cpu_kernels)
        kernel = choice.backend is Backend.CPU_KERNELS
        # without the kernels, XLA's CPU runtime has no batched bfloat16 dot and a bfloat16 cache was
        # converted whole at every step (half preset, batch 1: ~7 of ~17 ms per step); the kernels'
        # attention reads a bfloat16 cache as it is, half the bytes a step streams
        default_kv = "float32" if on_cpu() and not kernel else model_dtype
        return cls(choice.backend, choice.reason, model_dtype, jnp.dtype(kv_dtype or default_kv).name)

    @property
    def kernels(self) -> bool:
        return self.backend is Backend.CPU_KERNELS

    @property
    def compute_dtype(self) -> str:
        """What the layers compute in: float32 on the kernels (bfloat16 only in the step weights)."""
        return "float32" if self.kernels else self.model_dtype

    @property
    def stores_bfloat16(self) -> bool:
        """Whether the decoder's parameters are cast to bfloat16 (matrices and tables)."""
        return self.model_dtype == "bfloat16" and not self.kernels

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout(self.backend)

    def step_layers(self, backbone, dtype=None) -> list[dict] | None:
        """The layer weights the AR's steps read: packed StepWeights in the model's dtype on the
        kernels (None elsewhere: the steps slice them from the parameters). A BitNet's are packed
        ternary StepWeights on the kernels and on accelerators (2 bits a weight: the stream a step
        reads), its ternary values unpacked once on a CPU without the kernels (`_step_weight`)."""
        if not self.kernels and not backbone.cfg.bitlinear:
            return None
        return step_layers(backbone, jnp.dtype(dtype or self.model_dtype), kernel=self.kernels)

    def nar_layers(self, step_layers: list[dict] | None) -> list[dict] | None:
        """The layer weights the NAR reads: the float32 step layers where there are some (unpacked
        in its call, once), else None (bfloat16 step weights are for the AR's steps alone)."""
        if step_layers is None or jnp.dtype(self.model_dtype) != jnp.float32:
            return None
        return step_layers


def nar_compiler_options() -> dict | None:
    """`compiler_options` for the NAR's jitted program, made of large products: YNNPACK's dots on
    the CPU (valle_jax.runtime.LARGE_DOT_OPTIONS says why); None elsewhere, for another jaxlib,
    or with VALLE_JAX_CPU_FLAGS=0."""
    if not runtime.cpu_flags_apply(os.environ) or not on_cpu():
        return None
    return dict(runtime.LARGE_DOT_OPTIONS)


# ---- step weights: the layer matrices laid out for the kernels ----------------------------------


@jax.tree_util.register_pytree_node_class
class StepWeight:
    """A weight `w` [*contracted, *out] laid out for decoding on the CPU, as w [K, N] (K = the
    contracted axes flattened, N = the output axes flattened) packed in panels of 32 columns
    (`w_PKC`, kernels.pack: the layout valle_jax.kernels.rows_linear streams) and/or as it is
    (`w_KN`). Products with few rows (a decoding step: one per batch row) run the kernel over the
    packed copy; others (a prefill, a NAR level) run XLA's dot over `w_KN`, unpacked from the
    packed copy where there is no other (`unpacked()` does it once for a loop of such products), so
    a decoding loop needs one copy of the weights."""

    def __init__(
        self,
        w_PKC: Array | None,
        w_KN: Array | None,
        contracted: int,
        out_shape: tuple[int, ...],
        scale: Array | None = None,
        kernel: bool = True,
    ):
        # no check that one is given: JAX rebuilds pytrees with placeholder leaves (None among them)
        self.w_PKC, self.w_KN, self.contracted, self.out_shape = w_PKC, w_KN, contracted, tuple(out_shape)
        self.scale = scale  # a BitLinear's mean|W| (valle_jax.ternary); None: a plain weight
        self.kernel = kernel  # whether the kernel may compute it (False: a plan on XLA, packed all the same)

    @classmethod
    def of(cls, w: Array, contracted: int, packed: bool = True) -> StepWeight:
        """`w` packed for the kernel (`packed`), else as it is (for products with many rows only)."""
        w_KN = w.reshape(math.prod(w.shape[:contracted]), -1)
        return cls(kernels.pack(w_KN) if packed else None, None if packed else w_KN, contracted, w.shape[contracted:])

    @classmethod
    def of_ternary(cls, t: Array, scale: Array, contracted: int, kernel: bool = True) -> StepWeight:
        """A BitLinear's ternary values `t` (exactly -1, 0, 1) and scale, packed 2 bits a weight
        (ternary.pack): what every backend's decoding steps stream, the CPU kernel reading the bits
        as they are, XLA unpacking them inside the step's jitted product."""
        t_KN = t.reshape(math.prod(t.shape[:contracted]), -1)
        return cls(ternary.pack(t_KN), None, contracted, t.shape[contracted:], jnp.asarray(scale, jnp.float32), kernel)

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)

    @property
    def is_ternary(self) -> bool:
        return self.scale is not None

    @property
    def elements(self) -> int:
        """Weights in the matrix (K * N), however they are held."""
        w = self.w_PKC if self.w_PKC is not None else self.w_KN
        return (w.shape[1] if self.w_PKC is not None else w.shape[0]) * self.n

    def dense(self) -> Array:
        """w [K, N] (a BitLinear's: its ternary values, without the scale)."""
        if self.w_KN is not None:
            return self.w_KN
        if self.is_ternary:
            return ternary.unpack(self.w_PKC, self.n)
        return kernels.unpack(self.w_PKC, self.n)

    def unpacked(self) -> StepWeight:
        """This weight as it is, for products with many rows alone (a NAR's levels: unpacked once,
        outside their loop)."""
        return StepWeight(None, self.dense(), self.contracted, self.out_shape, self.scale, self.kernel)

    def tree_flatten(self):
        return (self.w_PKC, self.w_KN, self.scale), (self.contracted, self.out_shape, self.kernel)

    @classmethod
    def tree_unflatten(cls, aux, children):
        (w_PKC, w_KN, scale), (contracted, out_shape, kernel) = children, aux
        return cls(w_PKC, w_KN, contracted, out_shape, scale, kernel)

    def apply(self, spec: str, x: Array, dtype) -> Array:
        """What `linear(spec, x, w, dtype)` computes, for a spec that contracts x's trailing axes
        with w's leading ones and keeps the rest in order ("bshk,hkd->bsd")."""
        lhs, rhs = spec.split("->")[0].split(",")
        c = self.contracted
        if lhs[-c:] != rhs[:c] or len(rhs) != c + len(self.out_shape):
            raise ValueError(f"StepWeight contracting {c} axes cannot compute {spec!r}")
        lead = x.shape[: x.ndim - c]
        x_MK = x.reshape(-1, math.prod(x.shape[x.ndim - c :]))
        if self.is_ternary:  # BitLinear: 8-bit rows times ternary weights, rescaled once (valle_jax.ternary)
            x_MK, x_scale = ternary.quantize_activations(x_MK)
        if (
            self.w_PKC is not None
            and self.kernel
            and x_MK.shape[0] <= kernels.MAX_ROWS
            and self.elements >= kernels.MIN_WEIGHT_ELEMENTS
            and on_cpu()
            and kernels.available()
        ):
            y_MN = kernels.rows_linear(x_MK, self.w_PKC, self.n)
        else:
            y_MN = jnp.einsum(
                "mk,kn->mn", x_MK.astype(dtype), self.dense().astype(dtype), preferred_element_type=jnp.float32
            )
        if self.is_ternary:
            y_MN = y_MN * (self.scale / x_scale)[:, None]
        return y_MN.reshape(*lead, *self.out_shape)


def step_layers(backbone, dtype=jnp.float32, packed: bool = True, kernel: bool = True) -> list[dict]:
    """`backbone.unstack()` with its matmul weights (`backbone.STEP_MATMULS`) as StepWeights in
    `dtype`: packed for the steps' kernel, or (not `packed`) as they are, for products with many
    rows alone. Other weights stay float32 arrays: norms, and an MoE's router and experts, which run
    as XLA's grouped matmuls over whichever tokens chose them (the kernels have no grouped product;
    backbones.MixtralBackbone)."""
    matmuls = backbone.STEP_MATMULS
    return [
        {k: _step_weight(a, matmuls.get(k), dtype, packed, kernel) for k, a in p.items()} for p in backbone.unstack()
    ]


def _step_weight(a, contracted: int | None, dtype, packed: bool, kernel: bool):
    """One layer weight as the steps read it: a BitLinear's (ternary.TernaryWeight) packed to 2 bits
    whatever `dtype` and `packed` say, a matmul weight a StepWeight, anything else as it is."""
    if isinstance(a, ternary.TernaryWeight):
        w = StepWeight.of_ternary(a.values, a.scale, a.contracted, kernel)
        # XLA's CPU dot cannot read the bits: unpacking them at every step cost 7x the float32 step
        # (half preset, batch 1: 2.6 against 14.6 steps/s), so a CPU without the kernels unpacks once
        return w.unpacked() if on_cpu() and not kernel else w
    return a if contracted is None else StepWeight.of(a.astype(dtype), contracted, packed)


def unpacked(layer: dict) -> dict:
    """A layer's parameters with each StepWeight `unpacked()`."""
    return {k: a.unpacked() if isinstance(a, StepWeight) else a for k, a in layer.items()}


def packed_rows_fit(rows: int) -> bool:
    """Whether a product with `rows` rows runs the kernel over packed weights (else XLA's dot over
    weights unpacked once, outside the loop that uses them: XLA would unpack them at every step)."""
    return rows <= kernels.MAX_ROWS


# ---- the operations model code calls -------------------------------------------------------------


@typing.runtime_checkable
class AppliesItself(typing.Protocol):
    """A weight that computes its own products with x (models.lora.LoraWeight: the base product plus
    the adapter's); backend.linear hands it the product."""

    def apply(self, spec: str, x: Array, dtype) -> Array: ...


def linear(spec: str, x: Array, w, dtype) -> Array:
    """einsum with `dtype` operands (float32 or bfloat16 compute) and float32 accumulation; `w` is
    an array, a StepWeight (decoding on the CPU kernels), a TernaryWeight (BitLinear) or another
    weight that applies itself (a LoRA adapter's, in training)."""
    if isinstance(w, (StepWeight, ternary.TernaryWeight, AppliesItself)):
        return w.apply(spec, x, dtype)
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def computed_once(*arrays: Array) -> tuple[Array, ...]:
    """The arrays, computed once where their consumers read them many times. XLA's CPU compiler
    fuses elementwise producers into every consumer, so each fusion that read a rotated query or
    key evaluated the rotary cos and sin again, per head (half preset training step: ~2 of ~11 s of
    kernel time). A product with the identity matrix (exact: one term per sum) is a matmul, which it
    does not fuse. Other backends get the arrays as they are."""
    if not on_cpu():
        return arrays
    eye = jnp.eye(arrays[0].shape[-1], dtype=arrays[0].dtype)
    return tuple(jnp.einsum("...d,de->...e", a, eye, precision="highest") for a in arrays)


def batched_dot_operands(*arrays: Array) -> tuple[Array, ...]:
    """bfloat16 operands of attention's batched contractions as float32 on the CPU: XLA's CPU
    runtime has no batched bf16 x bf16 -> f32 dot ("Unsupported element type for DotThunk") once the
    batch has more than one row. Other backends keep bfloat16."""
    if not on_cpu():
        return arrays
    return tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in arrays)


def attend_cache(
    q_BSHD: Array, ck_NKD: Array, cv_NDK: Array, mask_B1SK: Array, filled: Array, layout: CacheLayout
) -> Array:
    """Softmax attention of new positions over one layer's cache (keys [B*G, K, Dh], values
    [B*G, Dh, K], row b*G + g), float32 [B, S, H, Dh]; `filled`: the slots written so far (later
    slots are masked).

    Why this layout: at a decoding step each (row, kv head) is a matrix-vector product, which XLA's
    CPU dot takes with the contracted axis last and one batch axis. With [B, G, Dh, K] / [B, G, K, Dh]
    buffers it transposed every layer's whole cache at every step; with a [B, G, ...] layout in that
    order, batch 1 needed a reshape between the in-place write and the dot, and XLA then fed the two
    from separate copies of the buffer (half preset, batch 1: ~5 of 17 ms per step went to copies).

    On the CPU kernels the filled slots alone are read (a bfloat16 cache as it is, also when held as
    its bits): one query at a time for a step's few positions (kernels.cache_attention), eight at a
    time for more (a NAR level, a prefill: kernels.block_attention over the keys transposed)."""
    b, s, h, dh = q_BSHD.shape
    g = ck_NKD.shape[0] // b
    r = h // g
    if layout.backend is Backend.CPU_KERNELS:
        q = q_BSHD.reshape(b, s, g, r, dh).transpose(0, 2, 1, 3, 4).reshape(b * g, s * r, dh)
        if s > STEP_POSITIONS:
            out = kernels.block_attention(q, jnp.swapaxes(ck_NKD, 1, 2), cv_NDK, mask_B1SK[:, 0], filled)
        else:
            out = kernels.cache_attention(q, ck_NKD, cv_NDK, mask_B1SK[:, 0], filled)
        return out.reshape(b, g, s, r, dh).transpose(0, 2, 1, 3, 4).reshape(b, s, h, dh)
    q_BSHD, ck_NKD, cv_NDK = batched_dot_operands(q_BSHD, cache_values(ck_NKD), cache_values(cv_NDK))
    q = q_BSHD.reshape(b, s, g, r, dh).transpose(0, 2, 1, 3, 4).reshape(b * g, s * r, dh)
    scores = jnp.einsum("nqd,nkd->nqk", q, ck_NKD.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = (scores / math.sqrt(dh)).reshape(b, g, s, r, -1)
    masked = jnp.where(mask_B1SK[:, :, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(masked, axis=-1).reshape(b * g, s * r, -1)
    out = jnp.einsum("nqk,ndk->nqd", probs.astype(cv_NDK.dtype), cv_NDK, preferred_element_type=jnp.float32)
    return out.reshape(b, g, s, r, dh).transpose(0, 2, 1, 3, 4).reshape(b, s, h, dh)


def write_cache(ck_NKD: Array, cv_NDK: Array, k_BSGD: Array, v_BSGD: Array, index: Array) -> tuple[Array, Array]:
    """One layer's cache with new keys/values written at slot `index` (a scalar): an in-place
    update when the cache is a loop carry or donated."""
    b, s, g, dh = k_BSGD.shape
    k_NSD = k_BSGD.transpose(0, 2, 1, 3).reshape(b * g, s, dh)
    v_NDS = v_BSGD.transpose(0, 2, 3, 1).reshape(b * g, dh, s)
    ck_NKD = jax.lax.dynamic_update_slice_in_dim(ck_NKD, as_stored(k_NSD, ck_NKD.dtype), index, axis=1)
    cv_NDK = jax.lax.dynamic_update_slice_in_dim(cv_NDK, as_stored(v_NDS, cv_NDK.dtype), index, axis=2)
    return ck_NKD, cv_NDK
