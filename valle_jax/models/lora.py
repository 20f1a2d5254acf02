"""LoRA: low-rank adapters on the backbone's matrices, applied in weight space.

For a target matrix W (its leading "layers"/"experts" axes kept, its remaining axes split into input
and output axes) an adapter holds A [*lead, *in, r] and B [*lead, r, *out]; the model uses
    W + (alpha / r) * A @ B
B starts at zero, so a fresh adapter changes nothing. A starts uniform in ±1/sqrt(fan_in) (the
usual Kaiming-uniform bound for a linear layer's input).

Why weight space (W + AB before the forward) rather than a second path x·A·B inside every layer:
every backbone (transformer, llama/mistral/mixtral, retnet) and every kernel then takes adapters
without a line of model code changing, the merged model is exactly what synthesis runs, and the
extra cost is one rank-r product per matrix per step, small beside the batch's matmuls. The price:
LoRA dropout cannot drop per token; it drops input features of the adapter (rows of A), one mask
per step and matrix, scaled by 1/(1-p) (docs/deviations.md).

Which axes are inputs: a matrix whose last axis is "embed" maps its middle axes to the model
width (o, down, ffn_out, fc2, w2); every other target maps "embed" to its remaining axes (q, k, v,
gate, up, ...). Adapters carry logical axes derived from their matrix's, so they shard like it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valle_jax.config import ConfigError

LEAD_AXES = ("layers", "experts")  # axes a matrix is stacked over: one adapter per slice
PRESETS = {
    "attention": r"^backbone/(q|k|v|o|g|qkv|out)$",  # q/k/v/o (retnet's gate g; transformer's fused qkv/out)
    "ffn": r"^backbone/(gate|up|down|ffn_in|ffn_out|fc1|fc2|w1|w2|w3)$",  # dense, gated and expert FFNs
}


class LoraError(ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no adapters
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # probability of dropping an input feature of the adapter (per step)
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
        bound = 1.0 / math.sqrt(t.fan_in)
        a_shape = (*t.shape[: t.lead + t.n_in], cfg.rank)
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        b = jnp.zeros((*t.shape[: t.lead], cfg.rank, *t.shape[t.lead + t.n_in :]), jnp.float32)
        _nest(out, t.path, a, b)
    return out


def _nest(tree: dict, path: tuple[str, ...], a, b) -> dict:
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = {"a": a, "b": b}
    return tree


def delta(t: Target, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B, shaped as the target matrix (the leading axes stay batch axes)."""
    lead_in, lead_out = a.shape[:-1], b.shape[: t.lead] + b.shape[t.lead + 1 :]
    a2 = a.reshape(*a.shape[: t.lead], -1, a.shape[-1])  # [*lead, in, r]
    b2 = b.reshape(*b.shape[: t.lead + 1], -1)  # [*lead, r, out]
    d = jnp.einsum("...ir,...ro->...io", a2, b2) * scale
    return d.reshape(*lead_in, *lead_out[t.lead :])


def merge(base: Mapping, adapters: Mapping, targets: list[Target], cfg: LoraConfig, key=None) -> dict:
    """`base` with each target W replaced by W + scale * A @ B; with `key` and dropout > 0, input
    features of each adapter are dropped (see the module docstring)."""
    out = dict(base)
    for i, t in enumerate(targets):
        ad = _get(adapters, t.path)
        a = ad["a"]
        if key is not None and cfg.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - cfg.dropout, a.shape[:-1])
            a = a * (keep[..., None].astype(a.dtype) / (1.0 - cfg.dropout))
        w = _get(base, t.path)
        out = _set(out, t.path, w + delta(t, a, ad["b"], cfg.scale).astype(w.dtype))
    return out


def adapter_axes(targets: list[Target]) -> dict:
    """The adapters' logical axes (nested like the adapters): A keeps the matrix's leading and input
    axes, B its leading and output axes; the rank axis is never sharded."""
    out: dict = {}
    for t in targets:
        lead, n_in = t.axes[: t.lead], t.axes[t.lead : t.lead + t.n_in]
        _nest(out, t.path, (*lead, *n_in, None), (*lead, None, *t.axes[t.lead + t.n_in :]))
    return out


def numpy_tree(tree) -> dict:
    return jax.tree.map(np.asarray, tree)
