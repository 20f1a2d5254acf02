"""`python -m valle_jax.export --out fp32.pth` writes exactly the reference's key set, shapes included,
unused tables too, so that the reference's default strict loader accepts it (reference.md §8)."""

import json

import numpy as np
import pytest

from tests.conftest import GOLDEN_DIR
from valle_jax.config import ModelConfig
from valle_jax.export import export
from valle_jax.models.convert import (
    from_reference,
    infer_config,
    normalise_keys,
    read_source,
    reference_layout,
    to_reference,
    unused_layout,
)

ARCHS = ["transformer", "llama", "retnet"]
needs_golden = pytest.mark.skipif(
    not all((GOLDEN_DIR / f"{a}_weights.npz").exists() for a in ARCHS),
    reason=f"golden files not found in {GOLDEN_DIR} (set VALLE_JAX_GOLDEN): nothing to compare the key set with",
)


def _golden(arch):
    """(reference state dict, reference parameter + persistent buffer names) of a golden arch."""
    state = normalise_keys(dict(np.load(GOLDEN_DIR / f"{arch}_weights.npz")))
    meta = json.loads((GOLDEN_DIR / f"{arch}_config.json").read_text("utf-8"))
    return state, set(meta["params"]) | set(meta["persistent_buffers"])


@needs_golden
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_pth_has_the_reference_keys_and_shapes(arch, tmp_path):
    torch = pytest.importorskip("torch")
    state, names = _golden(arch)
    assert set(state) == names  # the golden weights hold every parameter and persistent buffer
    cfg = infer_config(state, heads=4)
    out = export(from_reference(state, cfg), cfg, {"<s>": 1}, {"step": 3}, tmp_path / "fp32.pth")
    module = torch.load(out, map_location="cpu", weights_only=True)["module"]
    # what load_state_dict(strict=True) checks: no missing key, no unexpected key, every shape equal
    assert sorted(module) == sorted(names)
    for k, v in module.items():
        assert tuple(v.shape) == state[k].shape, k
        assert v.dtype == torch.float32, k
    for k in unused_layout(cfg):
        assert not module[k].any(), k  # written as zeros: nothing reads them
    for k in set(module) - set(unused_layout(cfg)):
        np.testing.assert_allclose(module[k].numpy(), state[k], rtol=1e-6, err_msg=k)


@needs_golden
@pytest.mark.parametrize("arch", ARCHS)
def test_a_file_with_the_unused_tables_reads_back(arch, tmp_path):
    pytest.importorskip("torch")
    state, _ = _golden(arch)
    cfg = infer_config(state, heads=4)
    params = from_reference(state, cfg)
    out = export(params, cfg, {"<s>": 1}, {}, tmp_path / "fp32.pth")
    read, symmap, _ = read_source(out)
    assert symmap == {"<s>": 1}
    assert set(unused_layout(cfg)) <= set(read)
    cfg2 = infer_config(read, heads=4)
    assert cfg2 == cfg
    again = from_reference(read, cfg2)  # the unused tables are ignored, not refused
    flat = lambda t, p="": (  # noqa: E731
        {k2: v2 for k, v in t.items() for k2, v2 in flat(v, f"{p}{k}/").items()} if isinstance(t, dict) else {p: t}
    )
    a, b = flat(params), flat(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_unused_tables_by_default_are_left_out_of_round_trips():
    cfg = ModelConfig(arch="llama", d_model=32, n_heads=4, n_layers=1, n_tokens=64)
    layout = reference_layout(cfg)
    params = from_reference({k: np.zeros(s, np.float32) for k, s in layout.items()}, cfg)
    assert set(to_reference(params, cfg)) == set(layout)
    full = to_reference(params, cfg, with_unused=True)
    assert set(full) == set(layout) | {"tasks_emb.weight", "model.embed_tokens.weight"}
    assert full["model.embed_tokens.weight"].shape == (65, 32)  # the 64 codes and the stop token


# reference.md §3.5: parameter counts of the reference's full-size models, its unused tables included
SPEC_FULL_COUNTS = {"transformer": 170_005_505, "llama": 221_289_473, "retnet": 220_511_233}


@pytest.mark.parametrize("arch", sorted(SPEC_FULL_COUNTS))
def test_full_size_layout_matches_spec_section_8(arch):
    cfg = ModelConfig(arch=arch, d_model=1024, n_heads=16, n_layers=12)
    unused = unused_layout(cfg)
    assert unused["tasks_emb.weight"] == (8, 1024)  # reference.md §8.1
    if arch == "llama":
        assert unused["model.embed_tokens.weight"] == (1025, 1024)  # reference.md §8.3
    else:
        assert "model.embed_tokens.weight" not in unused
    layout = reference_layout(cfg) | unused
    assert sum(int(np.prod(s)) for s in layout.values()) == SPEC_FULL_COUNTS[arch]
