"""The training state and the jitted train / eval steps.

State is a plain pytree, so orbax saves it and jit shards it without NNX in the way:
    {"params": nested dict (float32 master weights), "opt_state": optax state,
     "step": int32 micro-steps taken, "rng": uint32[2] base key}
The model's graph is split once; each step merges it with the params being differentiated. The
step's randomness (training levels, dropout) is folded from the base key and the step number, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from valle_jax.config import ModelConfig
from valle_jax.models import xmoe
from valle_jax.models.valle import IGNORE, VALLE, draw_levels, loss_and_metrics, targets
from valle_jax.models.valle import abstract_model as abstract_model  # re-exported: older callers import it here

Array = jax.Array
DEVICE_KEYS = ("text", "text_len", "lang", "prompt", "prompt_len", "resp", "resp_len", "row_valid")


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Freshly initialised parameters (call under jit with out_shardings to create them sharded)."""
    return nnx.to_pure_dict(nnx.state(VALLE(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def batch_loss(graph, params: dict, batch: dict, key: Array, cfg: ModelConfig, level_probs, train: bool):
    """(loss, metrics) of one batch with levels drawn from `key` (dropout only when training). The
    loss is the reference's: the cross-entropy plus the backbone's auxiliary term (an MoE's weighted
    load-balancing loss, reference.md §2.9; 0 for dense backbones); metrics hold both ("ce", "router_aux")."""
    model = nnx.merge(graph, params)
    level_key, dropout_key = jax.random.split(key)
    b = batch["text"].shape[0]
    levels = draw_levels(level_key, b, level_probs or None, cfg.n_resp_levels)
    # XMoE layers route as torchscale's in training (capacity, fresh draws) or in eval (reference.md §3.2)
    routing = xmoe.Mode(train, jax.random.fold_in(key, 1) if train else None)
    logits, valid, aux = model.forward(batch, levels, dropout_key if (train and cfg.dropout > 0) else None, routing)
    t, _ = targets(batch, levels, cfg.stop_token)
    t = jnp.where(batch["row_valid"][:, None], t, IGNORE)  # padding rows (evaluation) score nothing
    ce, metrics = loss_and_metrics(logits, t, levels, cfg.n_resp_levels)
    loss = ce + aux
    metrics.update(loss=loss, ce=ce, router_aux=aux)
    rows = batch["row_valid"]
    metrics["positions"] = (valid & rows[:, None]).sum()  # sequence positions the model processed
    # the reference's tokens_processed: text + response lengths
    metrics["ref_tokens"] = jnp.where(rows, batch["text_len"] + batch["resp_len"], 0).sum()
    return loss, metrics


def make_train_step(
    graph, cfg: ModelConfig, tx: optax.GradientTransformation, level_probs=(), merge: Callable | None = None
) -> Callable:
    """step(state, batch, lr_scale) -> (state, metrics). An update whose loss or gradient is not
    finite is not applied (parameters and optimizer state stay as they were); `finite` says so.
    With `merge` (LoRA), the state's "params" are what trains (the adapters) and the model runs
    `merge(state["base"], params, key)`; the frozen base passes through unchanged."""

    def loss_of(params, batch, key, base):
        full = params if merge is None else merge(base, params, jax.random.fold_in(key, 1))
        return batch_loss(graph, full, batch, key, cfg, level_probs, True)

    def step(state: dict, batch: dict, lr_scale: Array):
        key = jax.random.fold_in(state["rng"], state["step"])
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"], batch, key, state.get("base")
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
            return optax.apply_updates(params, updates), opt_state

        # a branch, not a select between old and new values: XLA then updates the donated buffers
        # in place instead of first copying the optimizer state (~600 MB for the half preset)
        params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state["params"], state["opt_state"])
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        if "base" in state:
            new_state["base"] = state["base"]
        metrics.update(grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return step


def make_eval_step(graph, cfg: ModelConfig, level_probs=()) -> Callable:
    """eval_step(params, batch, key) -> summed metrics (nll sum, scored tokens, top-10 hits, per level)."""

    def eval_step(params: dict, batch: dict, key: Array):
        _, m = batch_loss(graph, params, batch, key, cfg, level_probs, False)
        n = m["tokens"].astype(jnp.float32)
        return {
            "nll": m["ce"] * n,  # the cross-entropy alone: the MoE balance term is no likelihood
            "tokens": n,
            "top10": m["acc_top10"] * n,
            "nll_per_level": m["loss_per_level"] * m["tokens_per_level"],
            "tokens_per_level": m["tokens_per_level"],
        }

    return eval_step


def train_flops(cfg: ModelConfig, batch_size: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward; matmuls and attention
    scores/values over the full padded sequence; remat recomputation is not counted; an MoE counts
    its router and the experts each token is routed to, not the slots a capacity dispatch fills)."""
    d, f, n, s = cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.n_layers, seq
    kv = cfg.kv_heads * cfg.head_dim
    mixing = 4 * batch_size * s * s * d  # scores and weighted values, 2 FLOPs per multiply-add
    if cfg.arch == "transformer":
        per_layer = 3 * d * d + d * d + 2 * d * f
    elif cfg.arch == "retnet":  # q, k at d; v, g at 2d; out from 2d; values 2d wide
        ffn = (2 if cfg.retnet_variant == "fork" else 3) * d * f
        if cfg.xmoe:  # two experts per token, and the 16-dim gate
            ffn = 2 * 2 * d * f + 16 * (d + cfg.n_experts)
        per_layer = 2 * d * d + 4 * d * d + 2 * d * d + ffn
        mixing = 6 * batch_size * s * s * d
    else:
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f * cfg.top_k + (d * cfg.n_experts if cfg.moe else 0)
    tokens = batch_size * s
    forward = 2 * tokens * (n * per_layer + d * cfg.n_classes) + n * mixing
    return 3.0 * forward
