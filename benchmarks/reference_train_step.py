"""The PyTorch reference's training step, timed on this machine: the baseline for train_step.py.

    python benchmarks/reference_train_step.py [--sizes half] [--shape reference] [--batch 8] [--steps 3]
    python benchmarks/train_step.py --sizes half --shape reference --reference   (both, same run)

Needs HF transformers of the reference's time (the golden files were made with 4.39.3; 4.40.2 gives
the same logits; not a dependency of valle_jax): `pip install "transformers==4.40.2"` in the
environment that runs this.

What runs is the reference's AR_NAR "llama" training step as docs/reference.md §2-§3 and
§7 describe it, in eager PyTorch float32 as its local engine runs it: HF `LlamaModel` with the
reference's config (gated GELU MLP at 4d, MHA, attention dropout 0.1, SDPA attention, causal mask),
version-3 embeddings (text table, language table, 8 summed prompt tables, the level-dependent
response tables, one learned separator), one shared classifier with bias, a random level per sample
(reference.md §2.6: level 0 gets a stop row), one token-mean cross entropy over the concatenated samples,
top-10 accuracy, backward, global-norm clipping and AdamW(0.9, 0.96, eps 1e-7, wd 0.01). The
sequence assembly is the reference's per-sample loop; at batch 8 its cost is small next to the
backbone's. MFU uses valle_jax's FLOP count for the same shapes against a float32 2048^3 torch
matmul measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from train_step import SHAPES

N_LEVELS, N_TOKENS, STOP = 8, 1024, 1024


def build(size, torch, nn, experts: int = 1):
    """The reference's AR_NAR llama model; `size` a preset name or (d_model, heads, layers). With
    `experts` > 1 the reference builds HF `MixtralModel` instead (reference.md §3.3: a 900-position
    window, top-min(2, E) experts) and adds 0.001 * HF's load-balancing loss over every position of
    the padded batch (no mask) to the loss (reference.md §2.9)."""
    try:
        from transformers import LlamaConfig, LlamaModel, MixtralConfig, MixtralModel
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    except ImportError as e:
        raise SystemExit(
            f"the reference's step needs HF transformers ({e}): pip install 'transformers==4.40.2' "
            "(a release of the reference's time; valle_jax itself does not need it)"
        ) from None

    from valle_jax.config import SIZES

    d, heads, layers = SIZES[size] if isinstance(size, str) else size

    class AudioEmbedding(nn.Module):  # reference.md §2.3 (3): one table per level, summed
        def __init__(self, sizes):
            super().__init__()
            self.embeddings = nn.ModuleList(nn.Embedding(n, d) for n in sizes)

        def forward(self, codes, level=None):
            if level is None:  # a prompt: every level summed
                return sum(self.embeddings[k](codes[:, k]) for k in range(codes.shape[1]))
            if level == 0:  # AR input: level 0 through table 0 (which holds the stop token)
                return self.embeddings[0](codes[:, 0])
            return sum(self.embeddings[k + 1](codes[:, k]) for k in range(level))  # NAR: levels 0..l-1

    class ReferenceARNAR(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_emb = nn.Embedding(N_TOKENS, d)
            self.langs_emb = nn.Embedding(1, d)
            self.proms_emb = AudioEmbedding([N_TOKENS] * N_LEVELS)
            self.resps_emb = AudioEmbedding([N_TOKENS + 1] + [N_TOKENS] * (N_LEVELS - 1))
            self.sep = nn.Parameter(torch.randn(d))
            fields = dict(
                vocab_size=N_TOKENS + 1,
                hidden_size=d,
                intermediate_size=4 * d,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                max_position_embeddings=75 * 60,
                attention_dropout=0.1,
                hidden_act="gelu",
                sliding_window=75 * 12,
                is_encoder_decoder=False,
                is_decoder=True,
            )
            if experts > 1:
                moe = dict(num_local_experts=experts, num_experts_per_tok=min(2, experts))
                self.model = MixtralModel(MixtralConfig(**fields, **moe))
            else:
                self.model = LlamaModel(LlamaConfig(**fields))
            self.classifier = nn.Linear(d, N_TOKENS + 1)

        def sequence(self, text, lang, prom, resp_in, level):
            """One sample's embedded [text | sep | lang | sep | prompt | sep | response] (reference.md §2.4)."""
            pieces = [self.text_emb(text), self.langs_emb(lang), self.proms_emb(prom), self.resps_emb(resp_in, level)]
            x = [pieces[0]]
            for p in pieces[1:]:
                x += [self.sep[None], p]
            return torch.cat(x)

        def inference_logits(self, text, lang, prom, resp_in, level):
            """Logits of one sample's every position, as the reference's inference computes them: no cache."""
            return self.classifier(
                self.model(inputs_embeds=self.sequence(text, lang, prom, resp_in, level)[None]).last_hidden_state
            )[0]

        def logits_and_targets(self, text, lang, prom, resps, levels):
            """Per sample: the logits the loss reads and their targets (causal items shifted)."""
            xs, targets = [], []
            ignore = lambda n: torch.full((n,), -100, dtype=torch.long)  # noqa: E731
            for i, level in enumerate(levels):  # reference.md §2.4-§2.6, per sample as the reference does
                if level == 0:  # AR: a stop row appended to the input, the stop token to the target
                    stop_row = torch.full((1, N_LEVELS), STOP, dtype=resps[i].dtype)
                    resp_in, target = torch.cat([resps[i], stop_row]), torch.cat([resps[i][:, 0], stop_row[0, :1]])
                else:
                    resp_in, target = resps[i][:, :level], resps[i][:, level]
                xs.append(self.sequence(text[i], lang[i], prom[i], resp_in, level))
                t = torch.cat([text[i], ignore(1), lang[i], ignore(1), ignore(len(prom[i])), ignore(1), target.long()])
                targets.append(t)
            x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
            m = torch.nn.utils.rnn.pad_sequence([torch.ones(len(t), 1) for t in xs], batch_first=True)
            h, aux = self.backbone(x)
            logits = self.classifier(h) * m
            flat_logits, flat_targets = [], []
            for i, level in enumerate(levels):
                n = len(targets[i])
                if level == 0:  # causal items are shifted: position j predicts target j+1
                    flat_logits.append(logits[i, : n - 1]), flat_targets.append(targets[i][1:])
                else:
                    flat_logits.append(logits[i, :n]), flat_targets.append(targets[i])
            return flat_logits, flat_targets, aux

        def backbone(self, x):
            """(last hidden state, the weighted load-balancing loss: 0 without experts)."""
            if experts <= 1:
                return self.model(inputs_embeds=x).last_hidden_state, torch.zeros(())
            out = self.model(inputs_embeds=x, output_router_logits=True)
            cfg = self.model.config
            balance = load_balancing_loss_func(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
            return out.last_hidden_state, cfg.router_aux_loss_coef * balance

        def forward(self, text, lang, prom, resps, levels):
            """(loss, top-10 accuracy): the loss is the cross-entropy plus the MoE's auxiliary term."""
            flat_logits, flat_targets, aux = self.logits_and_targets(text, lang, prom, resps, levels)
            logits_nv, targets_n = torch.cat(flat_logits), torch.cat(flat_targets)
            loss = torch.nn.functional.cross_entropy(logits_nv, targets_n, ignore_index=-100) + aux
            with torch.no_grad():
                valid = targets_n != -100
                top10 = logits_nv[valid].topk(10, dim=-1).indices
                acc = (top10 == targets_n[valid, None]).any(-1).float().mean()
            return loss, acc

    return ReferenceARNAR()


def child(args) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from valle_jax.config import SIZES, ModelConfig
    from valle_jax.training.step import train_flops

    torch.manual_seed(0)
    model = build(args.size, torch, nn).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), eps=1e-7, weight_decay=0.01)
    t_len, p_len, r_len = SHAPES[args.shape]
    b = args.batch
    rng = np.random.default_rng(0)
    text = torch.from_numpy(rng.integers(3, 200, (b, t_len))).long()
    lang = torch.zeros(b, 1, dtype=torch.long)
    prom = torch.from_numpy(rng.integers(0, N_TOKENS, (b, p_len, N_LEVELS))).long()
    resps = torch.from_numpy(rng.integers(0, N_TOKENS, (b, r_len, N_LEVELS))).long()

    def step():
        levels = rng.integers(0, N_LEVELS, b).tolist()
        loss, acc = model(text, lang, prom, resps, levels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss)

    def matmul_peak(n=2048, reps=5):
        a = torch.ones(n, n)
        a @ a
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best

    step()  # warm-up: allocator and oneDNN kernel selection
    peak_before = matmul_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = max(peak_before, matmul_peak())
    d, h, n = SIZES[args.size]
    seq = t_len + p_len + r_len + 5
    flops = train_flops(ModelConfig(arch="llama", d_model=d, n_heads=h, n_layers=n), b, seq)
    return {
        "impl": "reference (PyTorch, HF LlamaModel)",
        "size": args.size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "shape": [t_len, p_len, r_len],
        "batch": b,
        "step_s": step_s,
        "steps": [round(t, 3) for t in times],
        "tokens_per_s": b * seq / step_s,
        "achieved_gflops": flops / step_s / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": flops / step_s / peak,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": loss,
    }


def spawn(size: str, shape: str, batch: int, steps: int) -> dict:
    from child import run_child

    return run_child(
        __file__,
        ["--size", size, "--shape", shape, "--batch", str(batch), "--steps", str(steps)],
        f"reference step ({size})",
        tcmalloc=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="half")
    p.add_argument("--size", default="half", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shape", default="reference", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    for size in args.sizes.split(","):
        r = spawn(size, args.shape, args.batch, args.steps)
        print(
            f"reference {size}: step {r['step_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}% "
            f"of {r['matmul_peak_gflops']:.1f} GFLOP/s, peak RSS {r['peak_rss_gb']:.2f} GB"
        )
        print("  " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
