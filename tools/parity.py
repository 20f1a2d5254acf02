"""Checks valle_jax against the reference's golden outputs (../shared/golden format).

    python -m tools.parity GOLDEN_DIR --arch transformer|llama|retnet|mixtral|retnet_moe [--heads H]
        [--tolerance 1e-4] [--precision highest|high|default]

Converts GOLDEN_DIR/{arch}_weights.npz, then runs every case found: `inputs.npz` with
`{arch}_outputs.npz` (levels 0, 1 and 7) and `inputs_batch2.npz` with `{arch}_outputs_batch2.npz`
(a padded two-sample batch at mixed levels). Prints the largest absolute logit error and the loss
error per case and exits 1 if any exceeds the tolerance (float32), or if a target vector differs.
The loss is the reference's whole training loss: for an MoE (mixtral, retnet_moe) the cross-entropy
plus the weighted auxiliary loss; where the golden file also holds `aux_loss_*`, that term's error
is printed too. `--arch` is the files' prefix: `retnet_moe` is a retnet with XMoE layers, checked
with the second-expert policy "all" its golden files were made with (the reference's "random"
draws from torch's RNG) and the eval capacity (0.25). A padded batch of the llama family runs as the
reference runs it (`reference_padded_forward`), so that its load-balancing loss counts the padding as
the reference's does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from valle_jax.checkpointing import model_with_params
from valle_jax.config import ARCHS, LLAMA_FAMILY
from valle_jax.data.batch import pad_batch
from valle_jax.models import jit_method, loss_and_metrics, targets
from valle_jax.models.convert import from_reference, infer_config

GOLDEN_VARIANTS = ("retnet_moe",)  # golden file prefixes beyond the arch names: retnet with experts (XMoE)


@dataclass
class CaseResult:
    name: str
    logit_err: float
    loss_err: float
    acc_err: float
    targets_exact: bool
    aux_err: float | None = None  # the MoE load-balancing term, where the golden file holds it

    def ok(self, tol: float) -> bool:
        return self.logit_err <= tol and self.loss_err <= tol and self.targets_exact

    def line(self) -> str:
        return (
            f"{self.name:8s} max |logit err| {self.logit_err:.2e}   loss err {self.loss_err:.2e}   "
            f"top-10 acc err {self.acc_err:.2e}   targets {'exact' if self.targets_exact else 'DIFFER'}"
            + ("" if self.aux_err is None else f"   aux loss err {self.aux_err:.2e}")
        )


def load_golden_model(golden: Path, arch: str, heads: int | None = None):
    with np.load(golden / f"{arch}_weights.npz") as z:
        state = {k: z[k] for k in z.files}
    cfg_file = golden / f"{arch}_config.json"
    if heads is None and cfg_file.exists():
        heads = json.loads(cfg_file.read_text()).get("constructor_kwargs", {}).get("n_heads")
    cfg = infer_config(state, heads)
    if cfg.xmoe:  # the golden files keep every second expert (their README): no torch draws to match
        cfg = replace(cfg, moe_second_policy="all", moe_eval_capacity=0.25)
    return model_with_params(cfg, from_reference(state, cfg)), cfg


def run_case(forward, cfg, name, batch, levels, ref_logits, ref_loss, ref_acc, ref_targets, ref_aux=None) -> CaseResult:
    """ref_logits: per-sample arrays of their valid rows; ref_targets: the concatenated loss targets
    in the reference's order (AR rows shifted, so one fewer than their logits rows); `forward`
    gives (logits, valid, auxiliary loss) (VALLE.forward)."""

    lv = jnp.asarray(levels, jnp.int32)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    logits, valid, aux = forward(jb, lv)
    t, _ = targets(jb, lv, cfg.stop_token)
    ce, m = loss_and_metrics(logits, t, lv, cfg.n_resp_levels)
    loss = ce + aux
    logits, t = np.asarray(logits), np.asarray(t)
    err = max(float(np.abs(logits[i, : len(r)] - r).max()) for i, r in enumerate(ref_logits))
    ours = np.concatenate([t[i, : len(r) - (levels[i] == 0)] for i, r in enumerate(ref_logits)])
    return CaseResult(
        name,
        err,
        abs(float(loss) - float(ref_loss)),
        abs(float(m["acc_top10"]) - float(ref_acc)),
        ours.shape == ref_targets.shape and bool((ours == ref_targets).all()),
        None if ref_aux is None else abs(float(aux) - float(ref_aux)),
    )


def single_cases(inp, out, prefix: str = ""):
    """The one-utterance format (`inputs.npz`): one case per `logits_{tag}`, its level the tag's last digits."""
    for tag in sorted({m.group(1) for k in out.files if (m := re.match(r"logits_(.+)", k))}):
        level = int(re.search(r"(\d+)$", tag).group(1))
        batch = pad_batch([inp["text"]], [int(inp["lang"][0])], [inp["prompt"]], [inp["response"]])
        yield (
            prefix + tag,
            batch,
            [level],
            [out[f"logits_{tag}"]],
            out[f"loss_{tag}"],
            out[f"acc_top10_{tag}"],
            out[f"loss_target_{tag}"],
            out[f"aux_loss_{tag}"] if f"aux_loss_{tag}" in out.files else None,
        )


def batch_case(inp, out, name: str):
    """The padded-batch format (`inputs_batch2.npz`): samples `_b0`, `_b1`, ... at `quant_levels`."""
    n = sum(1 for k in inp.files if re.fullmatch(r"text_b\d+", k))
    levels = [int(x) for x in out["quant_levels"]]
    lang = int(inp["lang"][0])
    batch = pad_batch(
        [inp[f"text_b{i}"] for i in range(n)],
        [lang] * n,
        [inp[f"prompt_b{i}"] for i in range(n)],
        [inp[f"response_b{i}"] for i in range(n)],
    )
    yield (
        name,
        batch,
        levels,
        [out[f"logits_b{i}"] for i in range(n)],
        out["loss"],
        out["acc_top10"],
        out["loss_target"],
        out["aux_loss"] if "aux_loss" in out.files else None,
    )


def cases(golden: Path, arch: str):
    """Yields (name, batch, levels, ref_logits list, loss, acc, targets, aux loss or None) for every
    case present: each `inputs{suffix}.npz` with an `{arch}_outputs{suffix}.npz`, in whichever of
    the two formats its keys say (`inputs.npz` and `inputs_batch2.npz`; a longer case such as an
    `inputs_long.npz` in either). Cases are named by their tags (single format) or "batch2", other
    suffixes prefixing them."""
    for inputs in sorted(golden.glob("inputs*.npz")):
        suffix = inputs.stem[len("inputs") :]
        outputs = golden / f"{arch}_outputs{suffix}.npz"
        if not outputs.exists():
            continue
        inp, out = np.load(inputs), np.load(outputs)
        name = suffix.lstrip("_")
        if "text" in inp.files:
            yield from single_cases(inp, out, f"{name}:" if name else "")
        else:
            yield from batch_case(inp, out, name or "batch")


def reference_padded_forward(model, batch: dict, levels):
    """`model.forward` over a batch padded as the reference pads it. The reference right-pads every
    row with zero inputs to the longest row and passes HF no attention mask (reference.md §2.9, §3.3):
    causality keeps the valid rows as they are, but the padded positions still run through every
    layer, and the MoE's load-balancing loss averages over them too (docs/deviations.md: training
    does not). Our layout keeps each row's valid positions as a prefix with zero inputs after it, so
    marking every position before the longest row valid is that batch; logits stay masked to the
    valid rows."""
    x, valid = model.embed(batch, levels)
    s = x.shape[1]
    as_reference = jnp.broadcast_to(jnp.arange(s)[None, :] < valid.sum(1).max(), valid.shape)
    positions = jnp.broadcast_to(jnp.arange(s)[None, :], valid.shape)
    logits, _, _, aux = model.run_with_aux(x, positions, as_reference, levels)
    return jnp.where(valid[..., None], logits, 0.0), valid, aux


def check(golden: Path, arch: str, heads: int | None = None) -> list[CaseResult]:
    model, cfg = load_golden_model(golden, arch, heads)
    # the transformer is the one backbone to which the reference passes its padding mask
    padded = reference_padded_forward if cfg.arch in LLAMA_FAMILY else type(model).forward
    forward = jit_method(model, padded)
    return [run_case(forward, cfg, *c) for c in cases(golden, arch)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("golden", type=Path)
    p.add_argument("--arch", required=True, choices=ARCHS + GOLDEN_VARIANTS)
    p.add_argument("--heads", type=int, default=None, help="default: the golden config's n_heads")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument(
        "--precision",
        default="highest",
        choices=("default", "high", "highest"),
        help="float32 matmul precision: GPUs and TPUs run 'default' with TF32/bf16 passes "
        "(H100: logit errors ~1e-3), so parity is checked at 'highest' unless asked",
    )
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", args.precision)
    results = check(args.golden, args.arch, args.heads)
    if not results:
        print(f"parity: no cases for {args.arch} in {args.golden}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{args.arch} {r.line()}")
    bad = [r.name for r in results if not r.ok(args.tolerance)]
    print(
        f"parity {args.arch}: {len(results) - len(bad)}/{len(results)} cases within {args.tolerance:g}"
        + (f"; FAILED: {bad}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
