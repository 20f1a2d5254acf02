"""Shared fixtures: a small espeak-ng corpus, a usable random codec, and a packed store.

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


@pytest.fixture
def data_cfg(store_path):
    from configs import tiny
    from valle_jax.config import data_config

    return dataclasses.replace(data_config(tiny.get_config()), store=str(store_path))
