"""LoRA: low-rank adapters on the backbone's matrices, applied beside them in activation space.

For a target matrix W (its leading "layers"/"experts" axes kept, its remaining axes split into input
and output axes) an adapter holds A [*lead, *in, r] and B [*lead, r, *out]; a product x·W becomes
    x·W + (alpha / r) * (dropout(x)·A)·B
B starts at zero, so a fresh adapter changes nothing. A starts uniform in ±1/sqrt(fan_in) (the
usual Kaiming-uniform bound for a linear layer's input). Dropout drops elements of the adapter's
input, per token and feature, as peft's lora_dropout does (a counter-based hash: layers.kept).

How adapters reach the layers: the train step hands the model its frozen parameters with every
target replaced by a `LoraWeight` (W, A, B and a dropout seed per leading slice; `wrap`). The layer
scan slices it like any stacked parameter, and every product with it goes through the weight:
`backend.linear` (attention, dense FFN outside the custom backward) calls `LoraWeight.apply`, the
feed-forward's hand-written backward pass asks `backward_2d`, the MoE products `product`. So no
backbone changes a line, and W + AB is never formed in training.

Why not in weight space (W + AB merged before the forward, as this module first did): that formed
a merged copy of every target matrix and its full-size gradient beside the frozen base, and ran the
frozen matrices' weight-gradient matmuls only to reduce them to A and B; dropout could only drop
whole input features of A for a step. In activation space the base gets no gradient at all (a
faster step; the memory is about the same at the half preset, where activations dominate:
docs/training.md), and dropout acts per token. `merge` (W + AB) remains what evaluation, export and
synthesis run: equal to the adapter path within float rounding.

BitNet (`model.bitlinear`) is the exception: its products quantise the weight, and ternary(W + AB)
is not ternary(W) plus AB, so there a LoraWeight is merged per stacked matrix before quantising
(Backbone.stacked), which keeps the merged export exactly what was trained.

Which axes are inputs: a matrix whose last axis is "embed" maps its middle axes to the model
width (o, down, ffn_out, fc2, w2); every other target maps "embed" to its remaining axes (q, k, v,
gate, up, ...). Adapters carry logical axes derived from their matrix's, so they shard like it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valle_jax import backend
from valle_jax.config import ConfigError
from valle_jax.models import layers as L

Array = jax.Array

LEAD_AXES = ("layers", "experts")  # axes a matrix is stacked over: one adapter per slice
PRESETS = {
    "attention": r"^backbone/(q|k|v|o|g|qkv|out)$",  # q/k/v/o (retnet's gate g; transformer's fused qkv/out)
    # dense, gated and expert FFNs (Mixtral's w1/w2/w3, XMoE's expert_fc1/expert_fc2)
    "ffn": r"^backbone/(gate|up|down|ffn_in|ffn_out|fc1|fc2|w1|w2|w3|expert_fc1|expert_fc2)$",
}


class LoraError(ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no adapters
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # probability of dropping an element of the adapter's input (per token and feature)
    targets: tuple[str, ...] = ("attention", "ffn")  # presets (PRESETS) or regexes over parameter paths

    def __post_init__(self):
        if self.rank < 0 or not 0.0 <= self.dropout < 1.0 or self.alpha <= 0:
            raise LoraError(
                f"model.lora: rank must be >= 0, alpha > 0 and dropout in [0, 1), got rank {self.rank}, "
                f"alpha {self.alpha}, dropout {self.dropout}"
            )
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if self.rank and not targets:
            raise LoraError("model.lora.targets is empty: name presets (attention, ffn) or regexes")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patterns(self) -> list[re.Pattern]:
        out = []
        for t in self.targets:
            try:
                out.append(re.compile(PRESETS.get(t, t)))
            except re.error as e:
                raise LoraError(f"model.lora.targets {t!r} is neither a preset {sorted(PRESETS)} nor a regex: {e}")
        return out


def lora_config(config) -> LoraConfig:
    """LoraConfig from a full config's `model.lora` section (absent: no adapters)."""
    section = config.model.get("lora") if hasattr(config.model, "get") else None
    if not section:
        return LoraConfig()
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(LoraConfig)})
    if unknown:
        raise LoraError(f"unknown model.lora keys: {unknown}")
    return LoraConfig(**d)


@dataclasses.dataclass(frozen=True)
class Target:
    """A matrix that gets an adapter: its path and how its axes split."""

    path: tuple[str, ...]  # ("backbone", "q")
    lead: int  # leading stacked axes (layers, experts)
    n_in: int  # input axes after them; the rest are output axes
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # the matrix's logical axes

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[self.lead : self.lead + self.n_in])


def find_targets(abstract_model: nnx.Module, cfg: LoraConfig) -> list[Target]:
    """The parameters the target patterns name; each must be a matrix (an input and an output axis)."""
    state = nnx.state(abstract_model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    patterns, out = cfg.patterns(), []
    names = []
    for path, var in flat:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        name = "/".join(keys)
        names.append(name)
        if not any(p.search(name) for p in patterns):
            continue
        axes = tuple(var.get_metadata().get("logical_axes") or (None,) * len(var.shape))
        lead = 0
        while lead < len(axes) and axes[lead] in LEAD_AXES:
            lead += 1
        rest = len(axes) - lead
        if rest < 2:
            raise LoraError(f"model.lora.targets name {name}, which is no matrix (shape {tuple(var.shape)})")
        n_in = rest - 1 if axes[-1] == "embed" else 1
        out.append(Target(keys, lead, n_in, tuple(var.shape), axes))
    unused = [p.pattern for p in patterns if not any(p.search(n) for n in names)]
    if unused:
        raise LoraError(f"model.lora.targets {unused} match no parameter; parameters are {names}")
    return out


@dataclasses.dataclass(frozen=True)
class GrownRows:
    """Rows of an embedding table that the run grew (new phonemes, new languages: valle_jax.vocab):
    they train in a LoRA run, as a delta added to the frozen table's rows, stored beside the
    adapters as {"text_emb": {"rows": [len(ids), D]}}. Zero at the start, so a fresh run changes
    nothing; the table's other rows stay frozen."""

    path: tuple[str, ...]  # ("text_emb",)
    ids: tuple[int, ...]  # the grown rows
    width: int

    @property
    def name(self) -> str:
        return "/".join(self.path)


def grown_rows(abstract_model: nnx.Module, text_ids, lang_ids) -> list[GrownRows]:
    """The GrownRows targets of a run whose text table grew rows `text_ids` and whose language
    table grew rows `lang_ids` (either may be empty)."""
    width = abstract_model.text_emb.shape[-1]
    out = []
    for name, ids in (("text_emb", text_ids), ("lang_emb", lang_ids)):
        ids = tuple(sorted(int(i) for i in ids))
        if ids:
            out.append(GrownRows((name,), ids, width))
    return out


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `tree` (nested dicts copied along `path` only) with `value` at `path`."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(dict(tree[path[0]]), path[1:], value)}


def init_adapters(targets: list[Target], cfg: LoraConfig, seed: int) -> dict:
    """{"backbone": {"q": {"a": A, "b": B}, ...}}: A uniform in ±1/sqrt(fan_in), B zero."""
    key = jax.random.key(seed)
    out: dict = {}
    for i, t in enumerate(targets):
        if isinstance(t, GrownRows):
            _set_leaf(out, (*t.path, "rows"), jnp.zeros((len(t.ids), t.width), jnp.float32))
            continue
        bound = 1.0 / math.sqrt(t.fan_in)
        a_shape = (*t.shape[: t.lead + t.n_in], cfg.rank)
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        b = jnp.zeros((*t.shape[: t.lead], cfg.rank, *t.shape[t.lead + t.n_in :]), jnp.float32)
        _nest(out, t.path, a, b)
    return out


def _nest(tree: dict, path: tuple[str, ...], a, b) -> dict:
    return _set_leaf(tree, path, {"a": a, "b": b})


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> dict:
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return tree


def _with_rows(table: Array, t: GrownRows, rows: Array) -> Array:
    """The table with its grown rows moved by the trained delta."""
    return table.at[np.asarray(t.ids)].add(rows.astype(table.dtype))


def delta(t: Target, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B, shaped as the target matrix (the leading axes stay batch axes)."""
    lead_in, lead_out = a.shape[:-1], b.shape[: t.lead] + b.shape[t.lead + 1 :]
    a2 = a.reshape(*a.shape[: t.lead], -1, a.shape[-1])  # [*lead, in, r]
    b2 = b.reshape(*b.shape[: t.lead + 1], -1)  # [*lead, r, out]
    d = jnp.einsum("...ir,...ro->...io", a2, b2) * scale
    return d.reshape(*lead_in, *lead_out[t.lead :])


def merge(base: Mapping, adapters: Mapping, targets: list[Target], cfg: LoraConfig) -> dict:
    """`base` with each target W replaced by W + scale * A @ B: the model evaluation, export and
    synthesis run (no dropout)."""
    out = dict(base)
    for t in targets:
        ad = _get(adapters, t.path)
        w = _get(base, t.path)
        if isinstance(t, GrownRows):
            out = _set(out, t.path, _with_rows(w, t, ad["rows"]))
            continue
        out = _set(out, t.path, w + delta(t, ad["a"], ad["b"], cfg.scale).astype(w.dtype))
    return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "a", "b", "seed"], meta_fields=["scale", "rate"])
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen matrix and its adapter, as the layers receive it in a LoRA training step (module
    docstring). While stacked, every field has the matrix's leading axes; the layer scan slices them."""

    w: Array  # the frozen matrix
    a: Array  # [*lead, *in, r]
    b: Array  # [*lead, r, *out]
    seed: Array | None  # uint32 [*lead]: the dropout hash's seed; None: no dropout
    scale: float  # alpha / r
    rate: float  # dropout probability

    # what code that reads a parameter asks of it (`param[...]`, its shape)
    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"a LoraWeight is read whole (param[...]), not at {index!r}")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def lead(self) -> int:
        """How many leading (stacked) axes the fields still have."""
        return self.a.ndim + self.b.ndim - 2 - self.w.ndim

    def merged(self) -> Array:
        """W + scale * A @ B (the leading axes kept), no dropout."""
        lead = self.lead
        a2 = self.a.reshape(*self.a.shape[:lead], -1, self.a.shape[-1])
        b2 = self.b.reshape(*self.b.shape[: lead + 1], -1)
        d = jnp.einsum("...ir,...ro->...io", a2, b2) * self.scale
        return self.w + d.reshape(self.w.shape).astype(self.w.dtype)

    def dropped(self, x: Array, seed: Array | None = None) -> Array:
        """The adapter's input: x with elements dropped at `rate` (scaled by 1/(1-rate)); `seed`
        (broadcast against x) overrides the weight's own (expert products: one per row's expert)."""
        seed = self.seed if seed is None else seed
        if seed is None or self.rate == 0.0:
            return x
        idx = jax.lax.iota(jnp.uint32, math.prod(x.shape)).reshape(x.shape)
        keep = L.kept(idx, seed.astype(jnp.uint32), 1.0 - self.rate)
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)

    def apply(self, spec: str, x: Array, dtype) -> Array:
        """backend.linear(spec, x, W) + scale * (dropped(x)·A)·B, for one slice (no leading axes) and
        a spec that contracts the weight's input axes with x."""
        ins, outs, xs, ys, r = _split_spec(spec, self)
        batch = "".join(c for c in ys if c not in outs)
        base = backend.linear(spec, x, self.w, dtype)
        t = _dot(f"{xs},{ins}{r}->{batch}{r}", self.dropped(x), self.a, dtype)
        return base + self.scale * _dot(f"{batch}{r},{r}{outs}->{ys}", t, self.b, dtype)

    def product(self, x: Array, plain, seed: Array | None = None) -> Array:
        """plain(x, W) + scale * plain(plain(dropped(x), A), B): an expert product (`plain`: the MoE's
        batched or grouped matmul over its experts), `seed` the rows' seeds."""
        t = plain(self.dropped(x, seed), self.a)
        return plain(x, self.w) + self.scale * plain(t, self.b)


def _dot(spec: str, x: Array, y: Array, dtype) -> Array:
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


def _split_spec(spec: str, w: LoraWeight) -> tuple[str, str, str, str, str]:
    """(input letters, output letters, x's letters, the result's letters, a free letter for the rank)
    of a product with an unstacked LoraWeight."""
    xs, rest = spec.replace(" ", "").split(",")
    ws, ys = rest.split("->")
    n_in = w.a.ndim - 1
    ins, outs = ws[:n_in], ws[n_in:]
    if w.lead or any(c not in xs or c in ys for c in ins) or any(c in xs for c in outs):
        raise ValueError(f"{spec!r} does not contract a LoRA matrix's input axes ({ws}: {n_in} input axes)")
    return ins, outs, xs, ys, next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in spec)


def backward_2d(w, x_ND: Array, g_NF: Array, dtype, transposed_x_grad) -> tuple[Array, object]:
    """For y = x·w ("nd,df->nf"), the gradients (dx, dw) given dy: what a hand-written backward
    pass (models.feed_forward) needs of a LoraWeight. `transposed_x_grad(g, W)` is the caller's own
    dy·W^T. dw is a LoraWeight of gradients: none for the frozen W and the seed, dA and dB."""
    dx = transposed_x_grad(g_NF, w.w)
    xd = w.dropped(x_ND)
    t_NR = _dot("nd,dr->nr", xd, w.a, dtype)
    db = w.scale * _dot("nr,nf->rf", t_NR, g_NF, dtype)
    dt_NR = w.scale * _dot("nf,rf->nr", g_NF, w.b, dtype)
    da = _dot("nd,nr->dr", xd, dt_NR, dtype)
    dx = dx + w.dropped(_dot("nr,dr->nd", dt_NR, w.a, dtype))  # the dropout's mask and scale, once more
    return dx, dataclasses.replace(w, w=None, a=da.astype(w.a.dtype), b=db.astype(w.b.dtype), seed=None)


def wrap(base: Mapping, adapters: Mapping, targets: list[Target], cfg: LoraConfig, key: Array | None) -> dict:
    """`base` with each target W replaced by a LoraWeight of W and its adapter (the train step's
    model; dropout seeds drawn from `key`, None: no dropout)."""
    out = dict(base)
    rate = cfg.dropout if key is not None else 0.0
    for i, t in enumerate(targets):
        ad = _get(adapters, t.path)
        if isinstance(t, GrownRows):
            out = _set(out, t.path, _with_rows(_get(base, t.path), t, ad["rows"]))
            continue
        seed = jax.random.bits(jax.random.fold_in(key, i), t.shape[: t.lead], jnp.uint32) if rate else None
        out = _set(out, t.path, LoraWeight(_get(base, t.path), ad["a"], ad["b"], seed, cfg.scale, rate))
    return out


def adapter_axes(targets: list[Target]) -> dict:
    """The adapters' logical axes (nested like the adapters): A keeps the matrix's leading and input
    axes, B its leading and output axes; the rank axis is never sharded."""
    out: dict = {}
    for t in targets:
        if isinstance(t, GrownRows):  # a few rows: replicated
            _set_leaf(out, (*t.path, "rows"), (None, None))
            continue
        lead, n_in = t.axes[: t.lead], t.axes[t.lead : t.lead + t.n_in]
        _nest(out, t.path, (*lead, *n_in, None), (*lead, None, *t.axes[t.lead + t.n_in :]))
    return out


def numpy_tree(tree) -> dict:
    return jax.tree.map(np.asarray, tree)
