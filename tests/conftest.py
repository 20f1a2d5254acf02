"""Shared fixtures: a small espeak-ng corpus, a usable random codec, a packed store, and a tiny random
exported model (built once a session: the synthesis, evaluation and serving tests only read it).

XLA_FLAGS must be set before JAX starts its backend: 8 fake CPU devices for sharding tests.
"""

import os

# Tests are dominated by compile time of tiny programs: a cheaper XLA backend pass halves it.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# nanodo's rule: an implicit rank promotion (a [D] vector against a [B, S, D] array) is an error, so every
# broadcast in the package is written out; subprocesses the tests start inherit it
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import dataclasses  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from valle_jax.data.text import espeak_available  # noqa: E402

GOLDEN_DIR = Path(os.environ.get("VALLE_JAX_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def assert_parity(results, names: list[str], aux_err: float | None = None) -> None:
    """tools.parity.check's comparisons, named `names`, within float32 noise: logits and loss to 1e-5,
    the auxiliary (MoE) loss to `aux_err` (None: not compared), accuracy and targets exact."""
    assert [r.name for r in results] == names
    for r in results:
        assert r.logit_err < 1e-5 and r.loss_err < 1e-5, r.line()
        assert aux_err is None or r.aux_err < aux_err, r.line()
        assert r.acc_err == 0 and r.targets_exact, r.line()


def pytest_collection_modifyitems(config, items):
    if not espeak_available():
        skip = pytest.mark.skip(
            reason="espeak-ng is not installed (make test installs it): sudo apt-get install -y espeak-ng"
        )
        for item in items:
            if "needs_espeak" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_espeak: uses espeak-ng speech or phonemes")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """4 speakers x 5 sentences of espeak-ng speech with transcripts (read-only: copy to modify)."""
    from tools import make_demo_corpus

    out = tmp_path_factory.mktemp("corpus")
    assert make_demo_corpus.build(out, voices=4, sentences=5).finish() == 0
    return out


@pytest.fixture(scope="session")
def codec_dir(corpus, tmp_path_factory) -> Path:
    from tools.common import find_files
    from valle_jax.audio import load_audio
    from valle_jax.codec import build_random_codec

    wavs = [load_audio(f) for f in find_files(corpus, (".wav",))[::3]]
    return build_random_codec(wavs, tmp_path_factory.mktemp("codec"), seed=0)


@pytest.fixture(scope="session")
def codec(codec_dir):
    from valle_jax.codec import Codec

    return Codec.load(codec_dir)


@pytest.fixture(scope="session")
def prepared(corpus, codec, tmp_path_factory) -> Path:
    """The corpus quantized and phonemized (codes and .phn.txt beside the audio)."""
    from tools import phonemize, quantize

    out = tmp_path_factory.mktemp("prepared") / "corpus"
    shutil.copytree(corpus, out)
    assert quantize.quantize_dir(out, out, codec, progress=False).finish() == 0
    assert phonemize.phonemize_dir(out, out, progress=False).finish() == 0
    return out


@pytest.fixture(scope="session")
def store_path(prepared, tmp_path_factory) -> Path:
    from tools import pack

    out = tmp_path_factory.mktemp("store") / "store"
    assert pack.pack([prepared], out, progress=False).finish() == 0
    return out


def save_tiny_model(out: Path, cfg=None, symmap=None) -> Path:
    """Export a randomly initialised model (seed 0; by default a 2-layer d_model=48 transformer with the
    reference symmap) to `out`, as `valle_jax.export` would: the checkpoint the synthesis tests load."""
    from valle_jax.checkpointing import params_of, save_model
    from valle_jax.config import ModelConfig
    from valle_jax.data.text import reference_symmap
    from valle_jax.models import init_model

    cfg = cfg or ModelConfig(arch="transformer", d_model=48, n_heads=4, n_layers=2)
    save_model(out, cfg, params_of(init_model(cfg, 0)), reference_symmap() if symmap is None else symmap)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """save_tiny_model's default model (read-only: tests that write a checkpoint use their own tmp_path)."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_tts(tiny_model_dir, codec_dir):
    """The tiny model with the random codec behind the TTS API, shared so its compiled decoders are too
    (tests must not change its attributes)."""
    from valle_jax.tts import TTS

    return TTS.load(tiny_model_dir, codec_dir=codec_dir)


@pytest.fixture
def data_cfg(store_path):
    from configs import tiny
    from valle_jax.config import data_config

    return dataclasses.replace(data_config(tiny.get_config()), store=str(store_path))
