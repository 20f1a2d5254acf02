"""Draws batches from a store through the grain pipeline and prints their shapes and the rate.

    python -m tools.draw_batches --config configs/demo.py [--config.data.batch_size=4 ...] [--batches N]

Any config key can be overridden on the command line; a misspelt key is an error naming it.
"""

from __future__ import annotations

import collections
import time

from absl import app, flags
from ml_collections import config_flags

from valle_jax.config import data_config
from valle_jax.config_files import resolve_argv
from valle_jax.data.pipeline import BatchPlan, make_iterator
from valle_jax.data.store import Store

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<preset>.py file", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 8, "how many batches to draw")
flags.mark_flag_as_required("config")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with --config also naming installed presets, and --help exiting 0 (absl's exits 1)."""
    if {"--help", "-h", "-?", "--helpshort"}.intersection(argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    return app.parse_flags_with_usage(resolve_argv(argv))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = data_config(_CONFIG.value)
    if not cfg.store:
        raise app.UsageError("config.data.store is empty: pass --config.data.store=STORE")
    store = Store(cfg.store)
    plan = BatchPlan(store, cfg)
    print(
        f"store {cfg.store}: {len(store)} utterances; {len(plan.eligible.utts)} pass the filters "
        f"({len(plan.eligible.speaker_utts)} speakers); {plan.batches_per_epoch} batches of {cfg.batch_size} per epoch"
    )
    it = make_iterator(store, cfg)
    shapes = collections.Counter()
    start = time.perf_counter()
    for i in range(_BATCHES.value):
        b = next(it)
        key = (b["text"].shape[1], b["prompt"].shape[1], b["resp"].shape[1])
        shapes[key] += 1
        if i < 3:
            print(
                f"batch {i}: text {b['text'].shape} prompt {b['prompt'].shape} resp {b['resp'].shape}; "
                f"speakers {[str(store.speaker_names[s]) for s in b['speaker'][:3]]}..."
            )
    rate = _BATCHES.value / (time.perf_counter() - start)
    print(
        f"{_BATCHES.value} batches at {rate:.1f} batches/s (first one includes start-up); "
        f"shapes (text, prompt, resp frames): {dict(shapes)}; iterator state {it.get_state()}"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
