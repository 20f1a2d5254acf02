"""The PyTorch baseline that benchmarks/train_step.py --reference times is the reference's model:
loaded with the golden llama weights it reproduces the golden logits, losses, top-10 accuracies and
loss targets. Needs HF transformers (not a dependency of valle_jax), so CI skips it."""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN_DIR

pytest.importorskip(
    "transformers", reason="the reference baseline needs HF transformers: pip install 'transformers==4.40.2'"
)
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    not (GOLDEN_DIR / "inputs.npz").exists(), reason=f"golden files not found at {GOLDEN_DIR} (set VALLE_JAX_GOLDEN)"
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


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
        logits, targets = model.logits_and_targets(*args)
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
