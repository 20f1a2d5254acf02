"""The PyTorch baseline that benchmarks/train_step.py --reference times is the reference's model:
loaded with the golden llama weights it reproduces the golden logits, losses, top-10 accuracies and
loss targets. Needs HF transformers (not a dependency of valle_jax), so CI skips it."""

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN_DIR, assert_parity

pytest.importorskip(
    "transformers", reason="the reference baseline needs HF transformers: pip install 'transformers==4.40.2'"
)
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    not (GOLDEN_DIR / "inputs.npz").exists(), reason=f"golden files not found at {GOLDEN_DIR} (set VALLE_JAX_GOLDEN)"
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@contextmanager
def jax_highest():
    """float32 matmuls at full precision, as `python -m tools.parity` runs them."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("case,level", [("ar_l0", 0), ("nar_l1", 1), ("nar_l7", 7)])
def test_reference_baseline_reproduces_the_golden_outputs(case, level):
    import reference_train_step

    model = reference_train_step.build((48, 4, 2), torch, torch.nn).eval()  # the golden llama's size
    with np.load(GOLDEN_DIR / "llama_weights.npz") as w:
        missing, unexpected = model.load_state_dict(
            {k: torch.from_numpy(np.asarray(w[k])) for k in w.keys()}, strict=False
        )
    assert missing == [] and unexpected == ["tasks_emb.weight"]  # the reference never uses its task table
    inputs, golden = np.load(GOLDEN_DIR / "inputs.npz"), np.load(GOLDEN_DIR / "llama_outputs.npz")
    as_batch = lambda name: torch.from_numpy(inputs[name].astype(np.int64))[None]  # noqa: E731
    args = (as_batch("text"), as_batch("lang"), as_batch("prompt"), as_batch("response"), [level])
    with torch.no_grad():
        logits, targets, _ = model.logits_and_targets(*args)
        loss, acc = model(*args)
        resp_in = args[3][0] if level == 0 else args[3][0][:, :level]  # inference: no stop row
        inferred = model.inference_logits(args[0][0], args[1][0], args[2][0], resp_in, level).numpy()
    want = golden[f"logits_{case}"]
    np.testing.assert_allclose(
        inferred, want[: len(inferred)], atol=1e-5
    )  # causal: the stop row changes nothing before it
    got = logits[0].numpy()  # the AR's last position predicts nothing: the loss (and ours) drop it
    np.testing.assert_allclose(got, want[: len(got)], atol=1e-5)
    assert np.array_equal(targets[0].numpy(), golden[f"loss_target_{case}"])
    assert abs(float(loss) - float(golden[f"loss_{case}"])) < 1e-5
    assert abs(float(acc) - float(golden[f"acc_top10_{case}"])) < 1e-6


def mixtral_reference(weights: dict):
    """The reference's AR_NAR on HF MixtralModel (4 experts, the golden mixtral's size) with `weights`."""
    import reference_train_step

    model = reference_train_step.build((48, 4, 2), torch, torch.nn, experts=4).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, False)
    assert missing == [] and unexpected == ["tasks_emb.weight"]
    return model


def reference_outputs(model, texts, prompts, resps, levels) -> dict:
    """One case in the golden batch format: every unpadded row's logits (a level-0 sample with its
    stop row), the loss with the MoE term, that term, accuracy and the loss targets."""
    as_tensor = lambda a: torch.from_numpy(np.asarray(a).astype(np.int64))  # noqa: E731
    lang = as_tensor([0])
    args = ([as_tensor(t) for t in texts], [lang] * len(texts), [as_tensor(p) for p in prompts])
    args += ([as_tensor(r) for r in resps], levels)
    with torch.no_grad():
        _, targets, aux = model.logits_and_targets(*args)
        loss, acc = model(*args)
        out = {"quant_levels": np.asarray(levels), "loss": loss.numpy(), "acc_top10": acc.numpy()}
        out["aux_loss"] = aux.numpy()
        for i, (level, r) in enumerate(zip(levels, args[3])):
            resp_in = torch.cat([r, torch.full((1, 8), 1024)]) if level == 0 else r[:, :level]
            out[f"logits_b{i}"] = model.inference_logits(args[0][i], lang, args[2][i], resp_in, level).numpy()
    out["loss_target"] = torch.cat(targets).numpy()
    return out


def test_reference_mixtral_padded_batch_and_long_case(tmp_path):
    """HF Mixtral as the reference builds it reproduces the golden mixtral files; on a padded two-sample
    batch and on a 1100-position case (past the 900-position window), written in the golden formats,
    `tools.parity` passes with loss, load-balancing term, accuracy and targets; and the constants
    tests/test_moe.py checks the padded batch against are what HF gives."""
    from test_moe import HF_SHARP_BATCH2, SHARP_ROUTER, golden_batch2

    from tools import parity

    with np.load(GOLDEN_DIR / "mixtral_weights.npz") as w:
        weights = {k: w[k] for k in w.files}
    model = mixtral_reference(weights)
    inp, golden = np.load(GOLDEN_DIR / "inputs.npz"), np.load(GOLDEN_DIR / "mixtral_outputs.npz")
    for tag, level in (("ar_l0", 0), ("nar_l1", 1), ("nar_l7", 7)):
        out = reference_outputs(model, [inp["text"]], [inp["prompt"]], [inp["response"]], [level])
        assert abs(float(out["loss"]) - float(golden[f"loss_{tag}"])) < 1e-6
        np.testing.assert_allclose(out["logits_b0"], golden[f"logits_{tag}"], atol=1e-5)
    shutil.copy(GOLDEN_DIR / "mixtral_weights.npz", tmp_path / "mixtral_weights.npz")
    shutil.copy(GOLDEN_DIR / "mixtral_config.json", tmp_path / "mixtral_config.json")
    texts, prompts, resps, levels = golden_batch2()
    np.savez(
        tmp_path / "inputs_batch2.npz",
        **{f"{k}_b{i}": v for k, vs in zip(("text", "prompt", "response"), golden_batch2()) for i, v in enumerate(vs)},
        lang=inp["lang"],
        quant_levels=np.asarray(levels),
    )
    np.savez(tmp_path / "mixtral_outputs_batch2.npz", **reference_outputs(model, texts, prompts, resps, levels))
    long_resp = np.random.default_rng(0).integers(0, 1024, (1000, 8)).astype(np.int16)
    np.savez(tmp_path / "inputs_long.npz", text=inp["text"], lang=inp["lang"], prompt=inp["prompt"], response=long_resp)
    long = {}
    for tag, level in (("ar_l0", 0), ("nar_l3", 3)):
        out = reference_outputs(model, [inp["text"]], [inp["prompt"]], [long_resp], [level])
        long.update({f"{k.replace('_b0', '')}_{tag}": v for k, v in out.items() if k not in ("quant_levels",)})
    np.savez(tmp_path / "mixtral_outputs_long.npz", **long)
    with jax_highest():
        results = parity.check(tmp_path, "mixtral")
    assert_parity(results, ["batch2", "long:ar_l0", "long:nar_l3"], aux_err=1e-7)
    for k in weights:
        if k.endswith("block_sparse_moe.gate.weight"):
            weights[k] = weights[k] * SHARP_ROUTER
    out = reference_outputs(mixtral_reference(weights), texts, prompts, resps, levels)
    assert (float(out["loss"]), float(out["aux_loss"])) == (HF_SHARP_BATCH2["loss"], HF_SHARP_BATCH2["aux"])
