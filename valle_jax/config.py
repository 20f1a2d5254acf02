"""Frozen, hashable config dataclasses, built from an ml_collections ConfigDict at the boundary.

Library code takes these dataclasses, never a ConfigDict: they can be jit static arguments and
their fields are checked once, here, with messages that name the key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from valle_jax.audio import FRAME_RATE

SAMPLE_TYPES = ("path", "speaker", "group")


class ConfigError(ValueError):
    pass


def _pair(name: str, v) -> tuple:
    v = tuple(v)
    if len(v) != 2 or v[0] > v[1]:
        raise ConfigError(f"{name} must be (low, high) with low <= high, got {v}")
    return v


def _buckets(name: str, v) -> tuple[int, ...]:
    v = tuple(int(x) for x in v)
    if not v or any(b <= 0 for b in v) or list(v) != sorted(set(v)):
        raise ConfigError(f"{name} must be a non-empty strictly increasing list of positive ints, got {v}")
    return v


@dataclasses.dataclass(frozen=True)
class DataConfig:
    store: str = ""
    batch_size: int = 8
    seed: int = 0
    sample_type: str = "path"
    phones_range: tuple[int, int] = (4, 256)
    duration_range: tuple[float, float] = (1.0, 12.0)
    min_utterances: int = 2
    prompt_duration: float = 3.0
    max_prompts: int = 3
    random_utterance: float = 1.0
    prompt_levels: int = 8
    text_buckets: tuple[int, ...] = (32, 64, 128, 256)
    resp_buckets: tuple[int, ...] = (150, 300, 450, 600, 900)
    num_workers: int = 0
    prefetch: int = 4

    def __post_init__(self):
        if self.sample_type not in SAMPLE_TYPES:
            raise ConfigError(f"data.sample_type must be one of {SAMPLE_TYPES}, got {self.sample_type!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.random_utterance <= 1.0:
            raise ConfigError(f"data.random_utterance is a probability, got {self.random_utterance}")
        if self.max_prompts < 1 or self.prompt_duration <= 0:
            raise ConfigError("data.max_prompts must be >= 1 and data.prompt_duration > 0")
        object.__setattr__(self, "phones_range", _pair("data.phones_range", self.phones_range))
        object.__setattr__(self, "duration_range", _pair("data.duration_range", self.duration_range))
        object.__setattr__(self, "text_buckets", _buckets("data.text_buckets", self.text_buckets))
        object.__setattr__(self, "resp_buckets", _buckets("data.resp_buckets", self.resp_buckets))

    @property
    def prompt_frames(self) -> int:
        """Prompt padding size: the longest prompt sampling can give (prompt_duration + 1 s)."""
        return int(self.prompt_duration * FRAME_RATE) + FRAME_RATE


def _from_dict(cls, d: Any, **extra):
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {unknown}")
    return cls(**d, **extra)


def data_config(config) -> DataConfig:
    """DataConfig from a full config (its `data` section; the top-level `seed` seeds the data)."""
    return _from_dict(DataConfig, config.data, seed=int(config.get("seed", 0)))
