"""The reference's AR+NAR VALL-E (version 3, optionally 4) in Flax NNX.

One model, one classifier, every level (reference.md §2):
    sequence = [text | sep | lang | sep | prompt | sep | response]
text through `text_emb`; lang through `lang_emb`; the prompt as the sum of its 8 levels' tables;
the response at level 0 (AR) through table 0 on code level 0 (a stop row appended), at level l > 0
(NAR) as the sum of tables 1..l on code levels 0..l-1. The level is a per-row traced value, so one
compile serves every level.

Batches are right-padded per segment (see valle_jax.data.pipeline); `assemble` packs each row's
segments contiguously into S = T + P + R + 5 positions with one gather, so no per-sample Python
concatenation happens inside jit. Valid positions form a prefix of each row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from valle_jax.config import ModelConfig
from valle_jax.models import layers as L
from valle_jax.models.backbones import make_backbone

Array = jax.Array
IGNORE = -100  # the reference's ignore_index
normal = jax.nn.initializers.normal


def seq_len(batch: dict) -> int:
    """Static packed length: text + prompt + response (+ stop row) + 4 separators/lang slots."""
    return batch["text"].shape[1] + batch["prompt"].shape[1] + batch["resp"].shape[1] + 5


def layout(batch: dict, level_B: Array) -> tuple[Array, Array]:
    """For each packed position, its index into the concatenated segment sources
    [text (T) | sep (1) | lang (1) | prompt (P) | response with stop slot (R + 1)], and validity.
    """
    rl = batch["resp_len"] + (level_B == 0)  # the AR input carries a stop row
    return segment_index(
        batch["text_len"], batch["prompt_len"], rl, batch["text"].shape[1], batch["prompt"].shape[1], seq_len(batch)
    )


def segment_index(
    text_len_B: Array, prompt_len_B: Array, resp_rows_B: Array, t_cap: int, p_cap: int, s_len: int
) -> tuple[Array, Array]:
    """`layout` from lengths: each row's segments packed contiguously into `s_len` positions.
    With `resp_rows_B` = 0 it lays out the prefix `[text | sep | lang | sep | prompt | sep]` alone."""
    tl, pl, rl = text_len_B[:, None], prompt_len_B[:, None], resp_rows_B[:, None]
    s = jnp.arange(s_len)[None, :]
    p0, r0 = tl + 3, tl + pl + 4  # first prompt and first response position
    sep = t_cap
    idx = jnp.select(
        [s < tl, s == tl, s == tl + 1, s == tl + 2, s < p0 + pl, s == p0 + pl, s < r0 + rl],
        [s, sep, t_cap + 1, sep, t_cap + 2 + (s - p0), sep, t_cap + 2 + p_cap + (s - r0)],
        0,
    )
    return idx, s < r0 + rl


def prefix_len(text_len_B: Array, prompt_len_B: Array) -> Array:
    """Positions before the first response frame: text + prompt + 2 separators, lang, separator."""
    return text_len_B + prompt_len_B + 4


def targets(batch: dict, level_B: Array, stop_token: int) -> tuple[Array, Array]:
    """(targets int32[B, S], valid bool[B, S]) aligned with the logits, as the reference's loss sees
    them: text and lang are targets, prompt and separators are IGNORE; AR rows are shifted (position
    i predicts token i + 1, the stop token after the last frame), NAR rows are not."""
    idx, valid = layout(batch, level_B)
    b, r_cap = batch["resp"].shape[:2]
    frames = jnp.arange(r_cap + 1)[None, :]
    codes = jnp.take_along_axis(
        batch["resp"].astype(jnp.int32), jnp.minimum(level_B, batch["resp"].shape[2] - 1)[:, None, None], axis=2
    )[..., 0]
    codes = jnp.pad(codes, ((0, 0), (0, 1)))
    rl = batch["resp_len"][:, None]
    resp_t = jnp.where(frames < rl, codes, jnp.where((frames == rl) & (level_B[:, None] == 0), stop_token, IGNORE))
    src = jnp.concatenate(
        [
            batch["text"].astype(jnp.int32),
            jnp.full((b, 1), IGNORE),
            batch["lang"][:, None].astype(jnp.int32),
            jnp.full((b, batch["prompt"].shape[1]), IGNORE),
            resp_t,
        ],
        axis=1,
    )
    t = jnp.where(valid, jnp.take_along_axis(src, idx, axis=1), IGNORE)
    shifted = jnp.pad(t[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE)
    return jnp.where(level_B[:, None] == 0, shifted, t), valid


class VALLE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v = cfg.d_model, cfg.n_tokens
        emb = normal(1.0)  # torch nn.Embedding's N(0, 1), as the reference
        self.text_emb = L.param(rngs, emb, (v, d), ("vocab", "embed"))
        self.lang_emb = L.param(rngs, emb, (cfg.n_langs, d), (None, "embed"))
        self.prom_emb = L.param(rngs, emb, (cfg.n_prom_levels, v, d), (None, "vocab", "embed"))
        self.resp_emb_ar = L.param(rngs, emb, (v + 1, d), ("vocab", "embed"))  # + the stop token
        self.resp_emb_nar = L.param(rngs, emb, (cfg.n_resp_levels - 1, v, d), (None, "vocab", "embed"))
        if cfg.version >= 4:  # learned per-level scalars (reference.md §2.3), initialised to 1
            self.prom_level_w = L.param(rngs, jax.nn.initializers.ones, (cfg.n_prom_levels,), (None,))
            self.resp_level_w = L.param(rngs, jax.nn.initializers.ones, (cfg.n_resp_levels,), (None,))
        self.sep = L.param(rngs, emb, (d,), ("embed",))
        self.backbone = make_backbone(cfg, rngs)
        self.classifier = L.param(rngs, L.torch_linear_init(d), (d, cfg.n_classes), ("embed", "vocab"))
        self.classifier_bias = L.param(rngs, L.torch_linear_init(d), (cfg.n_classes,), ("vocab",))

    # ---- embeddings -------------------------------------------------------------------------
    def _level_w(self, name: str, n: int) -> Array:
        return getattr(self, name)[...] if self.cfg.version >= 4 else jnp.ones((n,), jnp.float32)

    def embed_prompt(self, prompt_BPQ: Array) -> Array:
        w = self._level_w("prom_level_w", self.cfg.n_prom_levels)
        tables = self.prom_emb[...]
        return sum(w[k] * tables[k][prompt_BPQ[..., k]] for k in range(prompt_BPQ.shape[-1]))

    def embed_response(self, resp_BRQ: Array, resp_len_B: Array, level_B: Array) -> Array:
        """[B, R + 1, D]: the AR input (table 0, stop token at frame resp_len) or the NAR input."""
        cfg = self.cfg
        codes = jnp.pad(resp_BRQ.astype(jnp.int32), ((0, 0), (0, 1), (0, 0)))
        frames = jnp.arange(codes.shape[1])[None, :]
        w = self._level_w("resp_level_w", cfg.n_resp_levels)
        ar_in = jnp.where(frames == resp_len_B[:, None], cfg.stop_token, codes[..., 0])
        ar = w[0] * self.resp_emb_ar[...][ar_in]
        tables = self.resp_emb_nar[...]
        nar = sum(
            jnp.where((k < level_B)[:, None, None], w[k + 1] * tables[k][codes[..., k]], 0.0)
            for k in range(min(cfg.n_resp_levels - 1, codes.shape[-1]))
        )
        return jnp.where((level_B == 0)[:, None, None], ar, nar)

    def embed_prefix(
        self, text_BT: Array, text_len_B: Array, lang_B: Array, prompt_BPQ: Array, prompt_len_B: Array
    ) -> tuple[Array, Array]:
        """(x [B, T + P + 4, D], valid) of `[text | sep | lang | sep | prompt | sep]` alone: with causal
        attention these positions do not depend on the response, so decoding computes them once."""
        b, t_cap = text_BT.shape
        sources = jnp.concatenate(
            [
                self.text_emb[...][text_BT],
                jnp.broadcast_to(self.sep[...], (b, 1, self.cfg.d_model)),
                self.lang_emb[...][lang_B][:, None],
                self.embed_prompt(prompt_BPQ),
            ],
            axis=1,
        )
        idx, valid = segment_index(
            text_len_B,
            prompt_len_B,
            jnp.zeros_like(text_len_B),
            t_cap,
            prompt_BPQ.shape[1],
            t_cap + prompt_BPQ.shape[1] + 4,
        )
        x = jnp.take_along_axis(sources, idx[..., None], axis=1)
        return jnp.where(valid[..., None], x.astype(jnp.float32), 0.0), valid

    def embed_frames(self, codes_BRQ: Array, level_B: Array) -> Array:
        """[B, R, D] response inputs without a stop row: level 0 embeds the AR tokens codes[..., 0]
        (the stop token included), level l > 0 the sum of levels 0..l-1 (the NAR input)."""
        r = codes_BRQ.shape[1]
        return self.embed_response(codes_BRQ, jnp.full(level_B.shape, r), level_B)[:, :r]

    def embed(self, batch: dict, level_B: Array) -> tuple[Array, Array]:
        """(x [B, S, D] packed input sequence, valid [B, S])."""
        b = batch["text"].shape[0]
        sources = jnp.concatenate(
            [
                self.text_emb[...][batch["text"]],
                jnp.broadcast_to(self.sep[...], (b, 1, self.cfg.d_model)),
                self.lang_emb[...][batch["lang"]][:, None],
                self.embed_prompt(batch["prompt"]),
                self.embed_response(batch["resp"], batch["resp_len"], level_B),
            ],
            axis=1,
        )
        idx, valid = layout(batch, level_B)
        x = jnp.take_along_axis(sources, idx[..., None], axis=1)
        return jnp.where(valid[..., None], x, 0.0), valid

    # ---- forward ----------------------------------------------------------------------------
    def causal_rows(self, level_B: Array) -> Array:
        """Causal attention for every level (the reference), or only for the AR (option)."""
        return (level_B == 0) | (not self.cfg.bidirectional_nar)

    def run(
        self,
        x_BSD: Array,
        positions_BS: Array,
        valid_BS: Array,
        level_B: Array,
        cache=None,
        dropout_key=None,
        layers: list[dict] | None = None,
    ) -> tuple[Array, Array, dict | None]:
        """Backbone + classifier on embedded positions: (logits f32 [B, S, V], hidden, new cache).
        `layers`: the backbone's per-layer parameters (`backbone.unstack()`) for cached decoding."""
        return self.run_with_aux(x_BSD, positions_BS, valid_BS, level_B, cache, dropout_key, layers)[:3]

    def run_with_aux(
        self, x_BSD, positions_BS, valid_BS, level_B, cache=None, dropout_key=None, layers=None, routing=None
    ):
        """`run`, and the backbone's auxiliary training loss (an MoE's load balancing; 0 for dense
        backbones; None with a cache): (logits, hidden, new cache, aux loss). `routing`: an xmoe.Mode
        (training or eval routing of XMoE layers; None: eval)."""
        if self.cfg.arch == "transformer":
            x_BSD = x_BSD + L.sinusoidal(positions_BS, self.cfg.d_model)
        hidden, cache, aux = self.backbone(
            x_BSD, positions_BS, valid_BS, self.causal_rows(level_B), cache, dropout_key, layers, routing
        )
        dt = jnp.dtype(self.cfg.dtype)
        logits = L.add_bias(
            jnp.einsum(
                "bsd,dv->bsv", hidden.astype(dt), self.classifier[...].astype(dt), preferred_element_type=jnp.float32
            ),
            self.classifier_bias[...],
        )
        return jnp.where(valid_BS[..., None], logits, 0.0), hidden, cache, aux

    def __call__(self, batch: dict, level_B: Array, dropout_key: Array | None = None) -> tuple[Array, Array]:
        """Teacher-forced logits [B, S, V] (zero at padding) and validity [B, S]."""
        return self.forward(batch, level_B, dropout_key)[:2]

    def forward(
        self, batch: dict, level_B: Array, dropout_key: Array | None = None, routing=None
    ) -> tuple[Array, Array, Array]:
        """Teacher-forced (logits [B, S, V], validity [B, S], auxiliary loss): the term the
        reference adds to its cross-entropy (an MoE's weighted load-balancing loss; 0 otherwise).
        `routing`: an xmoe.Mode (XMoE layers route as in training or in eval; None: eval)."""
        x, valid = self.embed(batch, level_B)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), valid.shape)
        logits, _, _, aux = self.run_with_aux(x, positions, valid, level_B, dropout_key=dropout_key, routing=routing)
        return logits, valid, aux

    def init_cache(self, batch: int, length: int, dtype=jnp.float32, layout=None) -> dict:
        """An empty decoding cache (`layout`: a backend.CacheLayout, which backend attends over it)."""
        return self.backbone.init_cache(batch, length, dtype, layout)


def draw_levels(key: Array, batch: int, probs: Array | None = None, n_levels: int = 8) -> Array:
    """Each row's training level (traced): uniform over 0..n_levels-1 unless `probs` is given."""
    if probs is None:
        return jax.random.randint(key, (batch,), 0, n_levels)
    return jax.random.categorical(key, jnp.log(jnp.asarray(probs, jnp.float32)), shape=(batch,))


def loss_and_metrics(logits_BSV: Array, targets_BS: Array, level_B: Array, n_levels: int = 8) -> tuple[Array, dict]:
    """The reference's loss: one token-mean cross-entropy over every scored position of the batch
    (AR and NAR rows together), plus top-10 accuracy and the loss per level for logging."""
    scored = targets_BS != IGNORE
    safe_t = jnp.where(scored, targets_BS, 0)
    logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe_t[..., None], axis=-1)[..., 0] * scored
    count = jnp.maximum(scored.sum(), 1)
    loss = nll.sum() / count
    # top-10: the target's logit is beaten by fewer than 10 others (ties count in its favour)
    target_logit = jnp.take_along_axis(logits_BSV, safe_t[..., None], axis=-1)
    rank = (logits_BSV > target_logit).sum(-1)
    acc = ((rank < 10) & scored).sum() / count
    per_row_nll, per_row_n = nll.sum(-1), scored.sum(-1)
    onehot = jax.nn.one_hot(level_B, n_levels, dtype=jnp.float32)
    level_nll, level_n = per_row_nll @ onehot, per_row_n.astype(jnp.float32) @ onehot
    metrics = {
        "loss": loss,
        "acc_top10": acc,
        "tokens": scored.sum(),
        "loss_per_level": level_nll / jnp.maximum(level_n, 1),
        "tokens_per_level": level_n,
    }
    return loss, metrics


def jit_method(model: VALLE, fn):
    """`fn(model, *args)` as one jitted function of the model's split state (no eager NNX ops)."""
    graph, state = nnx.split(model)
    jitted = jax.jit(lambda state, *args: fn(nnx.merge(graph, state), *args))
    return lambda *args: jitted(state, *args)


def jit_forward(model: VALLE):
    """`model(batch, levels)`, jitted (for tools and evaluation)."""
    return jit_method(model, lambda m, batch, levels: m(batch, levels))


def abstract_model(cfg: ModelConfig, seed: int = 0) -> VALLE:
    """VALLE(cfg) with shapes and dtypes but no arrays: its graph, parameter tree and shardings."""
    return nnx.eval_shape(lambda: VALLE(cfg, rngs=nnx.Rngs(seed)))


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of VALLE(cfg): active leaves out the experts a token is not routed
    to (n_experts - top_k per MoE layer); for dense models the two are equal."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))
    d, f = cfg.d_model, cfg.ffn_mult * cfg.d_model
    expert = 2 * d * f + 3 * f + d if cfg.xmoe else 3 * d * f  # XMoE: fc1, fc2, sub-LN, biases; Mixtral: w1, w3, w2
    idle = cfg.n_layers * (cfg.n_experts - cfg.top_k) * expert
    return total, total - (idle if cfg.moe else 0)


def init_model(cfg: ModelConfig, seed: int = 0) -> VALLE:
    """A randomly initialised model, its initialisers run as one compiled function (eager NNX
    construction compiles every initializer call separately)."""
    graph, _ = nnx.split(abstract_model(cfg, seed))
    state = jax.jit(lambda: nnx.split(VALLE(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graph, state)


def model_from_params(cfg: ModelConfig, params) -> VALLE:
    """A model holding `params` (nested dict of arrays), without running any initializer."""
    graph, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    return nnx.merge(graph, state)
