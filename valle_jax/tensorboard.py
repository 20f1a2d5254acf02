"""TensorBoard event writers (tensorboardX) that never import torch.

tensorboardX's writer module tries `import torch` when it loads, only to recognise torch tensors,
which valle_jax never passes it. Where torch is installed (the codec extra) that import would cost
every training run seconds of start-up and hundreds of MB, and break the promise that training and
decoding to codes never load torch (docs/install.md). So tensorboardX is loaded once with torch
marked absent; it then treats numpy arrays (all we give it) exactly as before.
"""

from __future__ import annotations

import importlib
import sys


def _import_tensorboardx():
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        return importlib.import_module("tensorboardX")
    finally:
        del sys.modules["torch"]


def summary_writer(logdir: str, **kwargs):
    """A tensorboardX SummaryWriter writing into `logdir` (kwargs: SummaryWriter's, e.g. flush_secs)."""
    return _import_tensorboardx().SummaryWriter(logdir, **kwargs)
