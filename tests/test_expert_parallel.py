"""Expert parallelism on 8 fake CPU devices: an MoE training step with its experts split over the
mesh's expert axis (composed with the data, fsdp and tensor axes) equals the single-device step,
for both dispatches; the tokens really travel by all-to-all."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from valle_jax.checkpointing import params_of
from valle_jax.config import ConfigError, MeshConfig, ModelConfig, OptimConfig, mesh_config
from valle_jax.data.batch import pad_batch
from valle_jax.training import sharding
from valle_jax.training import state as S
from valle_jax.training.compiled import jit_train_step
from valle_jax.training.optim import make_optimizer
from valle_jax.training.step import abstract_model, init_params

RULES = mesh_config(base.get_config()).rules


def moe_config(**kw) -> ModelConfig:
    kw = {"arch": "mixtral", "d_model": 32, "n_heads": 4, "n_layers": 1, "n_tokens": 64, "experts": 4, **kw}
    return ModelConfig(**kw)


def batch(rows: int = 8) -> dict:
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(4, 9)), int(rng.integers(6, 12)), int(rng.integers(8, 20))) for _ in range(rows)]
    b = pad_batch(
        [rng.integers(1, 64, t) for t, _, _ in sizes],
        [0] * rows,
        [rng.integers(0, 64, (p, 8)) for _, p, _ in sizes],
        [rng.integers(0, 64, (r, 8)) for _, _, r in sizes],
    )
    return {**b, "row_valid": np.ones(rows, bool)}


def train(cfg: ModelConfig, shape: tuple, devices, steps: int = 2):
    """(losses, router aux terms, final params on the host, the w1 array, the step's compiled HLO text)."""
    mesh_cfg = MeshConfig(shape=shape, rules=RULES)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    sharding.check_expert_axis(mesh, cfg)
    abstract = abstract_model(cfg)
    params = params_of(abstract)
    # plain SGD: Adam's normalisation would turn float rounding in a near-zero gradient into a full step
    tx, _, _ = make_optimizer(OptimConfig(name="sgd", learning_rate=0.5), params, 10)
    layout = S.make_layout(mesh, mesh_cfg, abstract, params, jax.eval_shape(tx.init, params))
    step = jit_train_step(nnx.graphdef(abstract), cfg, tx, (), layout)
    fresh = init_params(cfg, 0)  # on the host, placed in shards: no initialiser to compile per mesh
    host = {"params": fresh, "opt_state": tx.init(fresh), "step": np.int32(0), "rng": np.zeros(2, np.uint32)}
    state = jax.device_put(host, layout.state)
    b = {k: jax.device_put(v, layout.batch) for k, v in batch().items()}
    compiled = step.lower(state, b, np.float32(1.0)).compile()
    losses, aux = [], []
    for _ in range(steps):
        state, m = compiled(state, b, np.float32(1.0))
        losses.append(float(m["loss"]))
        aux.append(float(m["router_aux"]))
    w1 = state["params"]["backbone"]["w1"]
    return losses, aux, jax.device_get(state["params"]), w1, compiled.as_text()


# capacity_factor = E / k: no slot overflows, so splitting the tokens over devices drops nothing, and
# the capacity dispatch equals the dropless one (tests/test_moe.py)
CFG = {"capacity_factor": 2.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def one_device():
    return train(moe_config(**CFG), (1, 1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize(
    "dispatch,shape",
    [("dropless", (1, 2, 2, 2)), ("capacity", (2, 1, 1, 4))],  # (data, fsdp, tensor, expert)
)
def test_expert_parallel_step_equals_single_device_step(one_device, dispatch, shape):
    cfg = moe_config(moe_dispatch=dispatch, **CFG)
    l8, a8, p8, w1, hlo = train(cfg, shape, jax.devices())
    l1, a1, p1, _, _ = one_device  # dropless
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    np.testing.assert_allclose(a8, a1, rtol=1e-5)
    assert l8[1] < l8[0] - 1e-3
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p8)[0], jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    assert w1.sharding.spec[1] == "expert"  # layers, experts, embed, mlp
    assert w1.addressable_shards[0].data.shape[1] == cfg.n_experts // shape[3]
    assert "all-to-all" in hlo


def test_expert_axis_must_divide_the_experts():
    mesh = sharding.make_mesh(MeshConfig(shape=(2, 1, 1, 4)))
    with pytest.raises(ConfigError, match="experts=6 is not divisible"):
        sharding.check_expert_axis(mesh, moe_config(experts=6))
    sharding.check_expert_axis(mesh, ModelConfig(arch="llama"))  # dense: one more data-parallel axis
    assert MeshConfig(shape=(-1, 2, 1)).shape == (-1, 2, 1, 1)
    with pytest.raises(ConfigError, match="4 sizes"):
        MeshConfig(shape=(1, 1))
