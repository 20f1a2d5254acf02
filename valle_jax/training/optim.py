"""optax optimizers from OptimConfig: schedule, clipping, frozen parameters, accumulation.

    chain(clip_by_global_norm, adamw | prodigy | sgd) with frozen parameters routed to
    set_to_zero, wrapped in MultiSteps when batches are accumulated.

Frozen parameters (regexes over "a/b/c" paths, and injected embeddings) get no update and no weight
decay. The learning rate follows the schedule; the loop may scale the final update by a factor
(`lr VALUE` at the console), which for these optimizers is the same as changing the rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import jax
import numpy as np
import optax

from valle_jax.config import ConfigError, OptimConfig


def path_names(params: dict) -> list[str]:
    return ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def frozen_mask(params: dict, patterns: Iterable[str]) -> dict:
    """Nested dict of bools: True where a parameter path matches one of the regexes (re.search)."""
    compiled = []
    for pat in patterns:
        try:
            compiled.append(re.compile(pat))
        except re.error as e:
            raise ConfigError(f"optim.frozen pattern {pat!r} is not a regex: {e}") from None
    unused = [c.pattern for c in compiled if not any(c.search(n) for n in path_names(params))]
    if unused:
        raise ConfigError(f"optim.frozen patterns {unused} match no parameter; parameters are {path_names(params)}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(c.search("/".join(str(k.key) for k in p)) for c in compiled), params
    )


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, peak, warm) if warm else optax.constant_schedule(peak)
    decay = cfg.decay_steps or max(1, total_steps - warm)
    end = peak * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, warm + decay, end)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warm), optax.linear_schedule(peak, end, decay)], [warm]
    )


def base_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    if cfg.name == "adamw":  # reference.md §7.2 defaults: betas (0.9, 0.96), eps 1e-7, weight decay 0.01
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        return optax.contrib.prodigy(
            schedule, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay, estim_lr_coef=cfg.d_coef
        )
    return optax.sgd(schedule, momentum=cfg.momentum or None)


def make_optimizer(cfg: OptimConfig, params: dict, total_steps: int, extra_frozen: Iterable[str] = ()):
    """(optax transformation, schedule, frozen mask) for `params` (arrays or ShapeDtypeStructs)."""
    schedule = make_schedule(cfg, total_steps)
    tx = base_optimizer(cfg, schedule)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    frozen = frozen_mask(params, tuple(cfg.frozen) + tuple(extra_frozen))
    if any(jax.tree.leaves(frozen)):
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx, schedule, frozen


class LearningRate:
    """The schedule, unless the console set a rate (`lr VALUE`); the step then scales its update."""

    def __init__(self, schedule: optax.Schedule):
        self.schedule = schedule
        self.override: float | None = None

    def at(self, step: int) -> float:
        return self.override if self.override is not None else float(self.schedule(step))

    def scale(self, step: int) -> np.ndarray:
        """The factor on the scheduled update that gives the overriding rate (1 without one)."""
        if self.override is None:
            return np.float32(1.0)
        scheduled = float(self.schedule(step))
        return np.float32(self.override / scheduled) if scheduled > 0 else np.float32(1.0)
