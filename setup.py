"""valle-jax: a JAX/Flax reimplementation of VALL-E (mrq/vall-e, 2024-04).

Dependencies (docs/install.md): the core install is what data preparation without audio, training
and decoding to codes need; audio in and out (EnCodec, torch) is the `codec` extra. Each range runs
from the lowest version tested to the newest tested (docs/install.md records both runs; below the
newest tested, the next minor release is excluded because these libraries move their APIs between
minors). `requirements.lock` pins the exact set that `make` and CI install.
"""

import runpy
from pathlib import Path

from setuptools import find_packages, setup

JAX = "jax>=0.10.2,<0.13"  # 0.11 and later need Python >= 3.12: pip picks 0.10.2 on 3.11

INSTALL_REQUIRES = [
    JAX,
    "jaxlib>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6",
    "phonemizer>=3.4.0",
    "ml-collections>=1.1.0",
    "tensorboard>=2.21.0",
    "tensorboardX>=2.6",
    "soundfile>=0.12",
    "scipy>=1.11",
    "numpy>=2.0",
    "tqdm>=4.66",
    "h5py>=3.10",  # tools.pack reads the reference's HDF5 datasets
    "matplotlib>=3.8",  # python -m valle_jax.plot
    "absl-py>=2.0",
    # workdirs on object stores (gs://, s3://; docs/cloud.md): the paths orbax already takes, for
    # run.json, logs, metrics, TensorBoard, locks and exports too
    "etils[epath]>=1.15",
    # model directories as model.safetensors, reference-keyed .safetensors, and hf:// checkpoint paths
    "safetensors>=0.4",
    "huggingface_hub>=0.24",
]

# Audio in and out: EnCodec runs in torch, as do reading and writing the reference's .pth files
# (valle_jax/extras.py names this extra when they are missing). torch 2.13 is the one tested; the
# lock pins torch==2.13.0, on the project's machines a local CPU wheel. From PyPI, a Linux torch is a
# CUDA build of several GB: for a CPU-only machine install torch 2.13 from PyTorch's CPU index first.
CODEC_REQUIRES = ["torch>=2.13.0,<2.14", "encodec>=0.1.1,<0.2"]

# python -m valle_jax.evaluate and the speech scores of training's audio samples (docs/evaluation.md):
# WER/CER (jiwer, with PocketSphinx's offline US-English model), speaker similarity (Resemblyzer, whose
# weights ship in its wheel; it needs librosa and webrtcvad, and torch), MCD and F0 (pyworld; DTW from
# librosa). Evaluating decodes audio, so it takes the codec extra.
EVAL_REQUIRES = [
    *CODEC_REQUIRES,
    "jiwer>=3.0",
    "pocketsphinx>=5.0",
    "resemblyzer>=0.1.4",
    "librosa>=0.10",
    "webrtcvad>=2.0.10",
    "pyworld>=0.3.4",
    # pyworld and webrtcvad import pkg_resources at import time, which setuptools 81 removed
    "setuptools<81",
]

# gs:// and s3:// workdirs (docs/cloud.md): etils.epath reaches them through fsspec's gcsfs and s3fs
# when TensorFlow is absent, as etils's own extras declare (orbax's arrays go through tensorstore,
# which needs nothing more). A TPU VM gets the gs:// part.
GCS_REQUIRES = ["etils[epath-gcs]>=1.15"]
CLOUD_REQUIRES = ["etils[epath-gcs,epath-s3]>=1.15"]

# Not an extra: tests/test_xmoe.py compares against torchscale==0.3.0 where it is installed, with
# `pip install --no-deps torchscale==0.3.0` (its own pins would replace torch; docs/install.md).

# python -m valle_jax.serve / valle_jax.webui and Vocos decoding (docs/serving.md): they return audio, so
# they take the codec extra.
SERVE_REQUIRES = [
    *CODEC_REQUIRES,
    "gradio>=6.0,<7",
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "python-multipart>=0.0.9",  # FastAPI's form and file uploads
    "vocos>=0.1.0",
    "pyyaml>=6",  # vocos reads its config.yaml
    "huggingface_hub>=0.20",
    "prometheus-client>=0.20",
]

# the server and browser tests need the serve extra, httpx (FastAPI's test client) and Playwright, which
# drives the system's Debian chromium (no browser download)
DEV_REQUIRES = [
    *EVAL_REQUIRES,
    *SERVE_REQUIRES,
    "httpx>=0.27",
    "playwright>=1.45",
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.5",
    "ruff==0.17.5",
]

# `valle-jax COMMAND` and `valle-jax-COMMAND` run `python -m MODULE`: valle_jax/cli.py holds the table
# (read from the file, not imported: building needs none of the package's dependencies)
COMMANDS = runpy.run_path(str(Path(__file__).parent / "valle_jax" / "cli.py"))["COMMANDS"]

setup(
    name="valle-jax",
    version="0.1.0",
    description="VALL-E neural-codec language model for zero-shot TTS in JAX/Flax",
    python_requires=">=3.11,<3.14",
    # configs/ (the presets that --config names) and tools/ (the data and pod commands) install as
    # top-level packages beside valle_jax, so `--config configs/preset.py:...` and the commands work
    # without a checkout (valle_jax/config_files.py finds the installed configs)
    packages=find_packages(include=["valle_jax", "valle_jax.*", "configs", "tools", "tools.*"]),
    package_data={"valle_jax": ["data/*.json"], "valle_jax.kernels": ["*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "codec": CODEC_REQUIRES,
        "cuda": [JAX.replace("jax", "jax[cuda]", 1)],
        "tpu": [JAX.replace("jax", "jax[tpu]", 1), *GCS_REQUIRES],  # TPU VMs keep their runs in gs://
        "cloud": CLOUD_REQUIRES,
        "eval": EVAL_REQUIRES,
        "serve": SERVE_REQUIRES,
        "dev": DEV_REQUIRES,
    },
    entry_points={
        "console_scripts": [
            "valle-jax=valle_jax.cli:main",
            *(f"valle-jax-{name}=valle_jax.cli:main" for name in COMMANDS),  # main() reads its own name
        ]
    },
)
