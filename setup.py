"""valle_jax: a JAX/Flax reimplementation of VALL-E (mrq/vall-e, 2024-04)."""

from setuptools import find_packages, setup

# Exact pins for the libraries whose APIs move between releases (see docs/install.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record>=0.8.6",
    # torch is pinned to the CPU build that lies on the project's machines; anything looser pulls a
    # multi-GB CUDA build. On a GPU machine, install the torch you want first: pip keeps it.
    "torch==2.13.0",
    "encodec==0.1.1",
    "phonemizer==3.4.0",
    "ml-collections==1.1.0",
    "tensorboard==2.21.0",
    "tensorboardX>=2.6",
    "soundfile>=0.12",
    "scipy>=1.11",
    "numpy>=2.0",
    "tqdm>=4.66",
    "h5py>=3.10",
    "matplotlib>=3.8",  # python -m valle_jax.plot
    "absl-py>=2.0",
    # model directories as model.safetensors, reference-keyed .safetensors, and hf:// checkpoint paths
    "safetensors>=0.4",
    "huggingface_hub>=0.24",
]

# python -m valle_jax.evaluate and the speech scores of training's audio samples (docs/evaluation.md):
# WER/CER (jiwer, with PocketSphinx's offline US-English model), speaker similarity (Resemblyzer, whose
# weights ship in its wheel; it needs librosa and webrtcvad, and takes the pinned torch above), MCD and
# F0 (pyworld; DTW from librosa). The tests use them, so the dev extra (`make setup`) includes them.
EVAL_REQUIRES = [
    "jiwer>=3.0",
    "pocketsphinx>=5.0",
    "resemblyzer>=0.1.4",
    "librosa>=0.10",
    "webrtcvad>=2.0.10",
    "pyworld>=0.3.4",
    # pyworld and webrtcvad import pkg_resources at import time, which setuptools 81 removed
    "setuptools<81",
]

setup(
    name="valle_jax",
    version="0.1.0",
    description="VALL-E neural-codec language model for zero-shot TTS in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["valle_jax", "valle_jax.*", "configs", "tools", "tools.*"]),
    package_data={"valle_jax": ["data/*.json"], "valle_jax.kernels": ["*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "eval": EVAL_REQUIRES,
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff==0.17.5", *EVAL_REQUIRES],
    },
)
