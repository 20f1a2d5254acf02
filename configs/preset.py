"""Model presets by backbone and size: `--config configs/preset.py:ARCH-SIZE`.

    python -m tools.draw_batches --config configs/preset.py:llama-half --config.data.store=STORE

ARCH is transformer, llama, mistral, mixtral (8 experts, 2 per token) or retnet; SIZE is quarter, half,
full or double (reference.md §2.2: widths 256/512/1024, 4/8/16 heads, 12 layers, double = 24 layers at
full width).
"""

from configs import base
from valle_jax.config import ARCHS, SIZES


def get_config(arg: str = "llama-full"):
    arch, _, size = arg.partition("-")
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"preset {arg!r}: expected ARCH-SIZE with ARCH in {ARCHS} and SIZE in {sorted(SIZES)}")
    c = base.get_config()
    c.model.arch, c.model.size = arch, size
    return c
