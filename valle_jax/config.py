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


ARCHS = ("transformer", "llama", "retnet", "mistral", "mixtral", "bitnet")
LLAMA_FAMILY = ("llama", "mistral", "mixtral")  # one backbone: HF's Llama, Mistral and Mixtral (reference.md §3.3)
MOE_DISPATCHES = ("dropless", "capacity")
SECOND_POLICIES = ("random", "all")  # XMoE (retnet): torchscale's forced "random", and "all" (the golden files')
DEFAULT_EXPERTS = 8  # arch "mixtral" with model.experts = 0: HF MixtralConfig's num_local_experts
# the sliding attention window each HF class applies (reference.md §3.3): Mistral's default, and the 900
# positions (12 s) the reference passes to Mixtral; Llama ignores it
DEFAULT_WINDOWS = {"mistral": 4096, "mixtral": 900}
RETNET_VARIANTS = ("fork", "torchscale")
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("dense", "blocked")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The AR+NAR VALL-E (reference version 3) and its backbone. Hashable: a jit static argument."""

    arch: str = "llama"
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 12
    n_kv_heads: int = 0  # 0: as many as n_heads (multi-head); fewer: grouped-query attention (llama)
    ffn_mult: int = 4
    n_tokens: int = 1024  # codes per RVQ level; also the text table's rows; the stop token is n_tokens
    n_prom_levels: int = 8
    n_resp_levels: int = 8
    n_langs: int = 1
    version: int = 3  # 3: the reference; 4 adds learned per-level scalar weights to the code embeddings
    norm_eps: float = 0.0  # 0: the arch's own (transformer and mixtral 1e-5, llama, mistral and retnet 1e-6)
    rope_theta: float = 0.0  # 0: the arch's own RoPE base (mixtral 1e6, others 1e4)
    bidirectional_nar: bool = False  # False: causal attention at every level, as the reference
    dropout: float = 0.1  # applied only when a dropout key is given (training)
    dtype: str = "float32"  # compute dtype of matmuls; parameters, norms, softmax and loss stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass
    attention: str = "dense"  # teacher-forced attention: "dense" | "blocked" (query blocks, no S x S residuals)
    scan_unroll: int = 0  # layers per iteration of the layer scan; 0 = all (fully unrolled)
    retnet_variant: str = (
        "fork"  # "fork": the reference's torchscale fork (its checkpoints); "torchscale": upstream 0.3.0
    )
    retention_chunk: int = 0  # retnet: positions per chunk of the chunkwise form; 0 = the parallel form
    experts: int = 0  # feed-forward experts per layer (llama family: Mixtral; retnet: XMoE); 0 = the arch's own
    experts_per_token: int = 0  # experts each token is routed to; 0 = min(2, experts), as the reference (XMoE: 2)
    sliding_window: int = -1  # a query sees itself and at most this many earlier positions; -1 = the
    # arch's own (mistral 4096, mixtral or experts > 1: 900, others none); 0 = no window
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss added to the training loss
    moe_dispatch: str = "dropless"  # "dropless" (sorted tokens, grouped matmuls) | "capacity" (fixed slots)
    capacity_factor: float = 1.25  # "capacity": slots per expert = factor * tokens * experts_per_token / experts
    moe_second_policy: str = "random"  # XMoE: "random" keeps a second expert with probability 2 p2; "all" always
    moe_eval_capacity: float = 0.25  # XMoE outside training: slots per expert = ceil(this * positions); 0 = no limit
    bitnet: bool = False  # every backbone matmul a BitNet b1.58 BitLinear (arch "bitnet" always; valle_jax.ternary)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.scan_unroll < 0:
            raise ConfigError(f"model.scan_unroll must be >= 0 (0 = fully unrolled), got {self.scan_unroll}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.arch not in (*LLAMA_FAMILY, "bitnet") and self.kv_heads != self.n_heads:
            raise ConfigError("grouped-query attention (model.n_kv_heads) is a llama option")
        if self.retnet_variant not in RETNET_VARIANTS:
            raise ConfigError(f"model.retnet_variant must be one of {RETNET_VARIANTS}, got {self.retnet_variant!r}")
        if self.retention_chunk < 0:
            raise ConfigError(f"model.retention_chunk must be >= 0 (0 = the parallel form), got {self.retention_chunk}")
        if self.arch == "retnet" and self.bidirectional_nar:
            raise ConfigError("model.bidirectional_nar has no meaning for retnet: retention is causal at every level")
        if self.arch == "retnet" and self.head_dim % 2:
            raise ConfigError(
                f"retnet rotates pairs of key dimensions: d_model / n_heads = {self.head_dim} must be even"
            )
        self._check_moe()
        if self.bitlinear and self.moe:
            raise ConfigError("model.bitnet applies to dense backbones: an MoE's experts run as grouped matmuls")
        if self.version not in (3, 4):
            raise ConfigError(f"model.version must be 3 or 4, got {self.version}")

    def _check_moe(self):
        if self.experts < 0 or self.experts_per_token < 0:
            raise ConfigError("model.experts and model.experts_per_token must be >= 0 (0 = the arch's own)")
        if self.arch not in LLAMA_FAMILY + ("retnet",) and self.experts > 1:
            raise ConfigError(f"model.experts > 1 is a llama/mistral/mixtral/retnet option, not {self.arch}'s")
        if self.arch == "retnet" and self.experts > 1 and self.top_k != 2:
            raise ConfigError("retnet's XMoE (a Top2Gate) routes 2 experts per token: experts_per_token 0 or 2")
        if self.moe_second_policy not in SECOND_POLICIES:
            policy = self.moe_second_policy
            raise ConfigError(f"model.moe_second_policy must be one of {SECOND_POLICIES}, got {policy!r}")
        if self.moe_eval_capacity < 0:
            raise ConfigError(f"model.moe_eval_capacity must be >= 0 (0 = no limit), got {self.moe_eval_capacity}")
        if self.arch == "mixtral" and self.experts == 1:
            raise ConfigError("arch mixtral needs model.experts > 1 (0 = 8); a dense model is arch llama or mistral")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.experts_per_token={self.top_k} exceeds model.experts={self.n_experts}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise ConfigError(f"model.moe_dispatch must be one of {MOE_DISPATCHES}, got {self.moe_dispatch!r}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"model.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.sliding_window < -1:
            raise ConfigError(
                f"model.sliding_window must be >= 0 (0 = none) or -1 (the arch's own), got {self.sliding_window}"
            )
        if self.arch == "retnet" and self.sliding_window > 0:
            raise ConfigError("model.sliding_window is an attention option; retnet's past decays instead")

    @property
    def bitlinear(self) -> bool:
        """Whether the backbone's matmuls are BitLinear (model.bitnet, or arch bitnet)."""
        return self.bitnet or self.arch == "bitnet"

    @property
    def n_experts(self) -> int:
        """Feed-forward experts per layer (1: a dense feed-forward)."""
        return self.experts or (DEFAULT_EXPERTS if self.arch == "mixtral" else 1)

    @property
    def moe(self) -> bool:
        return self.n_experts > 1

    @property
    def xmoe(self) -> bool:
        """RetNet with experts: torchscale's XMoE layers (reference.md §3.2), not Mixtral's."""
        return self.moe and self.arch == "retnet"

    @property
    def top_k(self) -> int:
        """Experts per token (the reference: num_experts_per_tok = min(2, experts))."""
        return self.experts_per_token or min(2, self.n_experts)

    @property
    def hf_class(self) -> str:
        """Which HF model the reference builds for this config (reference.md §3.3): experts > 1 make any
        llama-family arch a Mixtral; that decides the defaults of eps, RoPE base and window."""
        return "mixtral" if self.moe and self.arch in LLAMA_FAMILY else self.arch

    @property
    def window(self) -> int:
        """Earlier positions a query may attend to (0: unlimited); static, so masks fold it in."""
        if self.sliding_window >= 0:
            return self.sliding_window
        return DEFAULT_WINDOWS.get(self.hf_class, 0)

    @property
    def rope_base(self) -> float:
        return self.rope_theta or (1e6 if self.hf_class == "mixtral" else 1e4)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def eps(self) -> float:
        return self.norm_eps or (1e-5 if self.hf_class in ("transformer", "mixtral") else 1e-6)

    @property
    def stop_token(self) -> int:
        return self.n_tokens

    @property
    def n_classes(self) -> int:
        return self.n_tokens + 1


SIZES = {  # reference.md §2.2: (d_model, n_heads, n_layers)
    "tiny": (48, 4, 2),  # the golden files' size
    "quarter": (256, 4, 12),
    "half": (512, 8, 12),
    "full": (1024, 16, 12),
    "double": (1024, 16, 24),
}


def model_config(config) -> ModelConfig:
    """ModelConfig from a full config's `model` section; `size` fills d_model/n_heads/n_layers."""
    d = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
    size = d.pop("size", "")
    d.pop("lora", None)  # adapters are not part of the model (valle_jax.models.lora.lora_config)
    if size:
        if size not in SIZES:
            raise ConfigError(f"model.size must be one of {sorted(SIZES)}, got {size!r}")
        d.update(zip(("d_model", "n_heads", "n_layers"), SIZES[size]))
    return _from_dict(ModelConfig, d)


EXPERT_AXIS = "expert"  # the mesh axis an MoE shards its experts over (valle_jax.models.moe)
MESH_AXES = ("data", "fsdp", "tensor", EXPERT_AXIS)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    shape: tuple[int, ...] = (-1, 1, 1, 1)  # 3 sizes leave the expert axis at 1
    rules: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        shape = tuple(int(x) for x in self.shape)
        shape += (1,) * (len(shape) == len(MESH_AXES) - 1)
        if len(shape) != len(MESH_AXES) or any(x == 0 or x < -1 for x in shape) or shape.count(-1) > 1:
            raise ConfigError(
                f"mesh.shape must be 4 sizes for {MESH_AXES} (or 3, the expert axis 1), positive or one -1, "
                f"got {self.shape}"
            )
        rules = []
        for rule in self.rules:
            if len(rule) != 2:
                raise ConfigError(f"mesh.rules entries are (logical axis, mesh axes), got {rule!r}")
            name, axes = rule
            axes = tuple(a for a in (axes.split(",") if isinstance(axes, str) else axes) if a)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"mesh.rules[{name!r}] names unknown mesh axes {bad}; the axes are {MESH_AXES}")
            rules.append((str(name), axes))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rules", tuple(rules))


def mesh_config(config) -> MeshConfig:
    return _from_dict(MeshConfig, config.mesh)


OPTIMIZERS = ("adamw", "prodigy", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    learning_rate: float = 3.25e-4
    b1: float = 0.9
    b2: float = 0.96
    eps: float = 1e-7
    weight_decay: float = 0.01
    d_coef: float = 1.0
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    end_lr_ratio: float = 0.0
    clip_norm: float = 100.0
    grad_accum: int = 1
    frozen: tuple[str, ...] = ()
    embeddings: str = ""

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate <= 0 or self.grad_accum < 1 or self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.learning_rate must be > 0, optim.grad_accum >= 1, warmup/decay steps >= 0")
        object.__setattr__(self, "frozen", tuple(self.frozen))


def optim_config(config) -> OptimConfig:
    return _from_dict(OptimConfig, config.optim)


NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    log_every: int = 10
    save_every: int = 100
    keep: int = 4
    eval_every: int = 250
    eval_batches: int = 8
    eval_store: str = ""
    eval_audio: int = 0
    eval_audio_steps: int = 450
    eval_codec_dir: str = ""
    level_probs: tuple[float, ...] = ()
    nonfinite: str = "stop"
    peak_flops: float = 0.0
    export_on_quit: bool = False
    init_from: str = ""
    init_from_step: int = -1

    def __post_init__(self):
        if self.nonfinite not in NONFINITE:
            raise ConfigError(f"train.nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if self.steps < 1 or self.log_every < 1 or self.save_every < 1 or self.keep < 1:
            raise ConfigError("train.steps, train.log_every, train.save_every and train.keep must be >= 1")
        probs = tuple(float(p) for p in self.level_probs)
        if probs and (any(p < 0 for p in probs) or sum(probs) <= 0):
            raise ConfigError(f"train.level_probs must be non-negative with a positive sum, got {probs}")
        object.__setattr__(self, "level_probs", probs)


def train_config(config) -> TrainConfig:
    return _from_dict(TrainConfig, config.train)
