"""The pieces every metric shares: the Sample it scores, the registry, the missing-library error."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Protocol

import numpy as np

from valle_jax.audio import SAMPLE_RATE


class MetricUnavailable(RuntimeError):
    """A metric's library (or model) is not installed: the message says what to install."""


@dataclasses.dataclass
class Sample:
    """One synthesised utterance and what it is compared with (float32 waveforms at `sr`)."""

    hyp: np.ndarray  # the synthesised (or scored) audio
    text: str | None = None  # what it should say
    prompt: np.ndarray | None = None  # the voice it was asked for (the acoustic prompt)
    truth: np.ndarray | None = None  # the ground-truth recording of `text`, when there is one
    sr: int = SAMPLE_RATE
    # hyp[generated_from:] is what the model made; before it (continuation: the prompt's own seconds,
    # re-synthesised) the speaker's audio was given, which speaker similarity must not score
    generated_from: int = 0

    @property
    def generated(self) -> np.ndarray:
        return self.hyp[self.generated_from :]


class Metric(Protocol):
    """`metric(sample) -> {score name: value}`; `keys` names what it returns."""

    keys: tuple[str, ...]

    def __call__(self, sample: Sample) -> dict: ...


METRICS: dict[str, Callable[..., Metric]] = {}  # name -> factory(**options)


def register_metric(name: str):
    """Decorator: registers a metric factory (a class or function taking keyword options)."""

    def add(factory):
        METRICS[name] = factory
        return factory

    return add


def make_metric(name: str, **options) -> Metric:
    if name not in METRICS:
        raise MetricUnavailable(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name](**options)


def require(module: str, install: str):
    """Imports an optional library, or raises MetricUnavailable saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MetricUnavailable(f"{module} is not installed ({e.msg}): pip install {install}") from e


def nan() -> float:
    return float("nan")
