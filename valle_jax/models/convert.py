"""Reference (mrq/vall-e, PyTorch) state dicts <-> valle_jax parameters, in plain numpy.

`infer_config` reads what the shapes tell (arch, width, depth, vocabularies, levels, version, GQA)
and needs the head count, which they do not; `from_reference` maps every key, checking names and
shapes, and raises one ConversionError listing every missing, unexpected and mis-shaped key.
PyTorch Linear weights are (out, in); ours are (in, out), with heads split out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from valle_jax.config import LLAMA_FAMILY, ModelConfig
from valle_jax.extras import require_torch

UNUSED = ("tasks_emb.weight", "model.embed_tokens.weight")  # held by the reference, never used
N_TASKS = 8  # rows of the reference's tasks_emb: its model config's `tasks` (reference.md §2.3, §8.1)
PRESET_HEADS = {256: 4, 512: 8, 1024: 16}  # reference.md §2.2
RETNET_ANGLE, RETNET_DECAY = "model.retnet_rel_pos.angle", "model.retnet_rel_pos.decay"  # buffers
MOE = "model.layers.{i}.block_sparse_moe."  # HF Mixtral's sparse MoE block (reference.md §8.3)
XMOE = "model.layers.{i}.moe_layer."  # torchscale's XMoE layer, retnet with experts (reference.md §8.4)


class ConversionError(ValueError):
    pass


def read_source(path: Path) -> tuple[dict, dict, dict]:
    """(state dict of numpy arrays, symmap or {}, stats or {}) from a .pth, .npz or .safetensors
    file (the reference's key names); a file that cannot be read is one ConversionError (its first
    line), not a traceback."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            return dict(safetensors.numpy.load_file(path)), {}, {}
        except Exception as e:  # SafetensorError (bad header), OSError
            raise ConversionError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    if path.suffix == ".npz":
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}, {}, {}
        except Exception as e:  # BadZipFile, ValueError, OSError, pickle errors...
            raise ConversionError(f"{path}: not a readable .npz state dict ({_first_line(e)})") from e
    torch = require_torch(f"reading {path.name} (a PyTorch checkpoint)")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError...
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint torch.load can read ({_first_line(e)}); expected the "
            "reference's fp32.pth or a torch.save'd dict of tensors"
        ) from e
    symmap, stats = {}, {}
    if isinstance(obj, dict) and "module" in obj:
        symmap = (obj.get("userdata") or {}).get("symmap") or {}
        stats = {
            k: (v.item() if hasattr(v, "item") else v)
            for k, v in (obj.get("stats") or {}).items()
            if isinstance(v, (int, float)) or hasattr(v, "item")
        }
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v.float().numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in obj.items()}, symmap, stats


def _first_line(e: Exception) -> str:
    """A one-line reason. torch's weights-only UnpicklingError opens with advice (load unsafely)
    that is wrong for a file that is no checkpoint at all, so only its type is kept."""
    lines = str(e).strip().splitlines()
    if not lines or "weights_only" in lines[0]:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0]}"


def normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unwraps `{"module": ...}` exports and renames legacy `retnet.` prefixes to `model.`."""
    if "module" in state and isinstance(state["module"], Mapping):
        state = state["module"]
    return {("model." + k[len("retnet.") :] if k.startswith("retnet.") else k): np.asarray(v) for k, v in state.items()}


def infer_config(state: Mapping[str, np.ndarray], heads: int | None = None, **overrides) -> ModelConfig:
    state = normalise_keys(state)
    if "sep" not in state or "text_emb.weight" not in state:
        raise ConversionError("not a reference AR+NAR state dict: 'sep' and 'text_emb.weight' are missing")
    d = state["sep"].shape[0]
    if any(k.startswith("blocks.") for k in state):
        arch, pat = "transformer", r"blocks\.(\d+)\."
    elif any(k.startswith("model.layers.") and ".self_attn." in k for k in state):
        arch, pat = "llama", r"model\.layers\.(\d+)\."
    elif any(k.startswith("model.layers.") and ".retention." in k for k in state):
        arch, pat = "retnet", r"model\.layers\.(\d+)\."
    else:
        raise ConversionError(
            "cannot tell the backbone: expected 'blocks.*' (transformer), "
            "'model.layers.*.self_attn.*' (llama) or 'model.layers.*.retention.*' (retnet) keys"
        )
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(pat, k)))
    if heads is None and arch == "retnet" and RETNET_DECAY in state:
        heads = state[RETNET_DECAY].shape[0]  # one decay per retention head
    if heads is None:
        if d not in PRESET_HEADS:
            raise ConversionError(
                f"the state dict does not say how many attention heads d_model={d} uses: "
                f"pass --heads (the reference's presets use {PRESET_HEADS})"
            )
        heads = PRESET_HEADS[d]
    if d % heads:
        raise ConversionError(f"--heads {heads} does not divide d_model {d}")
    extra = {}
    if arch == "llama" and MOE.format(i=0) + "gate.weight" in state:  # llama/mistral/mixtral, experts > 1
        arch = "mixtral"
        extra["experts"] = state[MOE.format(i=0) + "gate.weight"].shape[0]
    if arch == "retnet" and XMOE.format(i=0) + "gate.wg" in state:
        extra["experts"] = state[XMOE.format(i=0) + "gate.wg"].shape[0]
    kv_heads = 0
    if arch in LLAMA_FAMILY:
        kv_heads = state["model.layers.0.self_attn.k_proj.weight"].shape[0] // (d // heads)
        kv_heads = 0 if kv_heads == heads else kv_heads
    ffn_key = {
        "transformer": "blocks.0.ffn.block.0.weight",
        "llama": "model.layers.0.mlp.gate_proj.weight",
        "mixtral": MOE.format(i=0) + "experts.0.w1.weight",
        "retnet": XMOE.format(i=0) + "experts.0.fc1.weight" if "experts" in extra else "model.layers.0.ffn.fc1.weight",
    }[arch]
    if arch == "retnet":  # the fork adds biases (upstream torchscale has none, and a GLU gate)
        extra["retnet_variant"] = "fork" if "model.layers.0.retention.q_proj.bias" in state else "torchscale"
    cfg = dict(
        arch=arch,
        d_model=d,
        n_heads=heads,
        n_layers=n_layers,
        n_kv_heads=kv_heads,
        ffn_mult=state[ffn_key].shape[0] // d,
        **extra,
        n_tokens=state["text_emb.weight"].shape[0],
        n_prom_levels=sum(1 for k in state if re.fullmatch(r"proms_emb\.embeddings\.\d+\.weight", k)),
        n_resp_levels=sum(1 for k in state if re.fullmatch(r"resps_emb\.embeddings\.\d+\.weight", k)),
        n_langs=state["langs_emb.weight"].shape[0] if "langs_emb.weight" in state else 1,
        version=4 if "proms_emb.weight.0" in state else 3,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def reference_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key the reference state dict holds for `cfg` (the unused tables aside), with shape."""
    d, v, f, n = cfg.d_model, cfg.n_tokens, cfg.ffn_mult * cfg.d_model, cfg.n_layers
    keys = {
        "sep": (d,),
        "text_emb.weight": (v, d),
        "langs_emb.weight": (cfg.n_langs, d),
        "classifier.weight": (cfg.n_classes, d),
        "classifier.bias": (cfg.n_classes,),
        "resps_emb.embeddings.0.weight": (v + 1, d),
    }
    keys.update({f"proms_emb.embeddings.{k}.weight": (v, d) for k in range(cfg.n_prom_levels)})
    keys.update({f"resps_emb.embeddings.{k}.weight": (v, d) for k in range(1, cfg.n_resp_levels)})
    if cfg.version >= 4:
        keys.update({f"proms_emb.weight.{k}": (1,) for k in range(cfg.n_prom_levels)})
        keys.update({f"resps_emb.weight.{k}": (1,) for k in range(cfg.n_resp_levels)})
    for i in range(n):
        if cfg.arch == "transformer":
            b = f"blocks.{i}."
            keys.update(
                {
                    b + "attn.norm.weight": (d,),
                    b + "attn.norm.bias": (d,),
                    b + "attn.block.to_qkv.weight": (3 * d, d),
                    b + "attn.block.to_out.weight": (d, d),
                    b + "attn.block.to_out.bias": (d,),
                    b + "ffn.norm.weight": (d,),
                    b + "ffn.norm.bias": (d,),
                    b + "ffn.block.0.weight": (f, d),
                    b + "ffn.block.0.bias": (f,),
                    b + "ffn.block.3.weight": (d, f),
                    b + "ffn.block.3.bias": (d,),
                }
            )
        elif cfg.arch == "retnet":
            keys.update(_retnet_layer_layout(cfg, f"model.layers.{i}."))
        else:
            keys.update(_llama_layer_layout(cfg, i))
    if cfg.arch in LLAMA_FAMILY:
        keys["model.norm.weight"] = (d,)
    if cfg.arch == "retnet":
        keys["model.layer_norm.weight"] = (d,)  # the angle/decay buffers are optional (check_buffers)
        if cfg.retnet_variant == "fork":
            keys["model.layer_norm.bias"] = (d,)
    return keys


def unused_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tables the reference's state dict holds but its forward never reads (reference.md §2.3, §8): the
    task table (version >= 3) and, for llama, HF LlamaModel's token embedding (vocab = the 1025
    response tokens). Its loader is strict, so an export must hold them for the file to load."""
    keys = {"tasks_emb.weight": (N_TASKS, cfg.d_model)}
    if cfg.arch in LLAMA_FAMILY:
        keys["model.embed_tokens.weight"] = (cfg.n_classes, cfg.d_model)
    return keys


def _llama_layer_layout(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """One HF Llama/Mistral/Mixtral decoder layer's keys: Mixtral's `block_sparse_moe` (a router
    `gate` and per expert w1 = gate, w3 = up, w2 = down) replaces the dense `mlp`."""
    d, f, kvd = cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.kv_heads * cfg.head_dim
    b = f"model.layers.{i}."
    keys = {
        b + "self_attn.q_proj.weight": (d, d),
        b + "self_attn.k_proj.weight": (kvd, d),
        b + "self_attn.v_proj.weight": (kvd, d),
        b + "self_attn.o_proj.weight": (d, d),
        b + "input_layernorm.weight": (d,),
        b + "post_attention_layernorm.weight": (d,),
    }
    if cfg.moe:
        m = MOE.format(i=i)
        keys[m + "gate.weight"] = (cfg.n_experts, d)
        for j in range(cfg.n_experts):
            keys.update({f"{m}experts.{j}.w1.weight": (f, d), f"{m}experts.{j}.w3.weight": (f, d)})
            keys[f"{m}experts.{j}.w2.weight"] = (d, f)
    else:
        keys.update({b + "mlp.gate_proj.weight": (f, d), b + "mlp.up_proj.weight": (f, d)})
        keys[b + "mlp.down_proj.weight"] = (d, f)
    return keys


def _retnet_layer_layout(cfg: ModelConfig, b: str) -> dict[str, tuple[int, ...]]:
    """One retnet layer's keys (reference.md §8.4 for the fork; golden/README for upstream torchscale)."""
    d, f = cfg.d_model, cfg.ffn_mult * cfg.d_model
    r = b + "retention."
    keys = {
        r + "q_proj.weight": (d, d),
        r + "k_proj.weight": (d, d),
        r + "v_proj.weight": (2 * d, d),
        r + "g_proj.weight": (2 * d, d),
        r + "out_proj.weight": (d, 2 * d),
        b + "retention_layer_norm.weight": (d,),
        b + "final_layer_norm.weight": (d,),
    }
    fork = cfg.retnet_variant == "fork"
    if fork:
        keys.update(
            {
                r + "q_proj.bias": (d,),
                r + "k_proj.bias": (d,),
                r + "v_proj.bias": (2 * d,),
                r + "g_proj.bias": (2 * d,),
                r + "out_proj.bias": (d,),
                b + "retention_layer_norm.bias": (d,),
                b + "final_layer_norm.bias": (d,),
            }
        )
    if cfg.xmoe:  # torchscale's XMoE: a 16-dim reduced gate, sub-LN experts with biases, either variant
        m = b + "moe_layer."
        keys.update({m + "gate.wg": (cfg.n_experts, 16), m + "gate.wg_reduction.weight": (16, d)})
        for j in range(cfg.n_experts):
            keys.update(_sub_ln_ffn_layout(f"{m}experts.{j}.", d, f))
    elif fork:
        keys.update(_sub_ln_ffn_layout(b + "ffn.", d, f))
    else:
        keys.update({b + "ffn.fc1.weight": (f, d), b + "ffn.fc2.weight": (d, f), b + "ffn.gate.weight": (f, d)})
    return keys


def _sub_ln_ffn_layout(b: str, d: int, f: int) -> dict[str, tuple[int, ...]]:
    """torchscale's FeedForwardNetwork with sub-LN: the fork's feed-forward and every XMoE expert."""
    return {
        b + "fc1.weight": (f, d),
        b + "fc1.bias": (f,),
        b + "fc2.weight": (d, f),
        b + "fc2.bias": (d,),
        b + "ffn_layernorm.weight": (f,),
        b + "ffn_layernorm.bias": (f,),
    }


def check_buffers(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> None:
    """A retnet checkpoint's angle and decay buffers must be what the config recomputes (they are
    not parameters here), or its numerics would silently differ."""
    from valle_jax.models import retention as R  # noqa: PLC0415 - jax: the key tables need only numpy

    expected = {
        RETNET_ANGLE: np.asarray(R.angles(cfg.head_dim, cfg.rope_base)),
        RETNET_DECAY: np.asarray(R.decay_rates(cfg.n_heads)),
    }
    for key, want in expected.items():
        if key in state and not np.allclose(state[key], want, rtol=1e-5, atol=1e-7):
            raise ConversionError(
                f"{key} differs from what base {cfg.rope_base:g} and {cfg.n_heads} heads give: "
                f"{np.asarray(state[key]).tolist()} vs {want.tolist()}"
            )


def check_keys(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> None:
    expected = reference_layout(cfg)
    ignorable = set(UNUSED) | {k for k in state if k.endswith(("rotary_emb.inv_freq", "sin_emb.omega"))}
    ignorable |= {RETNET_ANGLE, RETNET_DECAY}  # buffers: checked by value (check_buffers), not stored
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - ignorable)
    misshaped = sorted(
        f"{k}: {tuple(state[k].shape)}, expected {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        parts = [
            f"{len(missing)} missing: {missing}" if missing else "",
            f"{len(unexpected)} unexpected: {unexpected}" if unexpected else "",
            f"{len(misshaped)} mis-shaped: {misshaped}" if misshaped else "",
        ]
        raise ConversionError(
            f"the state dict does not fit a {cfg.arch} model with d_model={cfg.d_model}, "
            f"{cfg.n_layers} layers, {cfg.n_heads} heads; " + "; ".join(p for p in parts if p)
        )


def from_reference(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Reference state dict -> the nested dict of float32 arrays of `nnx.state(VALLE(cfg), nnx.Param)`."""
    s = normalise_keys(state)
    check_keys(s, cfg)
    if cfg.arch == "retnet":
        check_buffers(s, cfg)
    f32 = lambda k: np.asarray(s[k], np.float32)  # noqa: E731
    d, h, g, dh, n = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers
    out = {
        "text_emb": f32("text_emb.weight"),
        "lang_emb": f32("langs_emb.weight"),
        "sep": f32("sep"),
        "prom_emb": np.stack([f32(f"proms_emb.embeddings.{k}.weight") for k in range(cfg.n_prom_levels)]),
        "resp_emb_ar": f32("resps_emb.embeddings.0.weight"),
        "resp_emb_nar": np.stack([f32(f"resps_emb.embeddings.{k}.weight") for k in range(1, cfg.n_resp_levels)]),
        "classifier": f32("classifier.weight").T.copy(),
        "classifier_bias": f32("classifier.bias"),
    }
    if cfg.version >= 4:
        out["prom_level_w"] = np.concatenate([f32(f"proms_emb.weight.{k}") for k in range(cfg.n_prom_levels)])
        out["resp_level_w"] = np.concatenate([f32(f"resps_emb.weight.{k}") for k in range(cfg.n_resp_levels)])

    def stack(fmt, fn=lambda w: w):
        return np.stack([fn(f32(fmt.format(i=i))) for i in range(n)])

    if cfg.arch == "transformer":
        b = "blocks.{i}."
        out["backbone"] = {
            "attn_norm_scale": stack(b + "attn.norm.weight"),
            "attn_norm_bias": stack(b + "attn.norm.bias"),
            "qkv": stack(b + "attn.block.to_qkv.weight", lambda w: w.T.reshape(d, 3, h, dh)),
            "out": stack(b + "attn.block.to_out.weight", lambda w: w.T.reshape(h, dh, d)),
            "out_bias": stack(b + "attn.block.to_out.bias"),
            "ffn_norm_scale": stack(b + "ffn.norm.weight"),
            "ffn_norm_bias": stack(b + "ffn.norm.bias"),
            "ffn_in": stack(b + "ffn.block.0.weight", lambda w: w.T),
            "ffn_in_bias": stack(b + "ffn.block.0.bias"),
            "ffn_out": stack(b + "ffn.block.3.weight", lambda w: w.T),
            "ffn_out_bias": stack(b + "ffn.block.3.bias"),
        }
    elif cfg.arch == "retnet":
        out["backbone"] = _retnet_from_reference(f32, stack, cfg)
    else:
        b = "model.layers.{i}."
        out["backbone"] = {
            "attn_norm": stack(b + "input_layernorm.weight"),
            "q": stack(b + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, dh)),
            "k": stack(b + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, g, dh)),
            "v": stack(b + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, g, dh)),
            "o": stack(b + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, dh, d)),
            "mlp_norm": stack(b + "post_attention_layernorm.weight"),
            "final_norm": f32("model.norm.weight"),
        }
        out["backbone"].update(_moe_from_reference(f32, cfg) if cfg.moe else _mlp_from_reference(stack))
    return out


def _mlp_from_reference(stack) -> dict:
    b = "model.layers.{i}.mlp."
    return {
        "gate": stack(b + "gate_proj.weight", lambda w: w.T),
        "up": stack(b + "up_proj.weight", lambda w: w.T),
        "down": stack(b + "down_proj.weight", lambda w: w.T),
    }


def _moe_from_reference(f32, cfg: ModelConfig) -> dict:
    """Mixtral's experts, stacked [layers, experts, in, out] (torch's Linear is (out, in))."""

    def experts(name):
        return np.stack(
            [
                np.stack([f32(f"{MOE.format(i=i)}experts.{j}.{name}.weight").T for j in range(cfg.n_experts)])
                for i in range(cfg.n_layers)
            ]
        )

    router = np.stack([f32(MOE.format(i=i) + "gate.weight").T for i in range(cfg.n_layers)])
    return {"router": router, "w1": experts("w1"), "w3": experts("w3"), "w2": experts("w2")}


def _retnet_from_reference(f32, stack, cfg: ModelConfig) -> dict:
    d, h, dk = cfg.d_model, cfg.n_heads, cfg.head_dim
    b, r = "model.layers.{i}.", "model.layers.{i}.retention."
    heads = lambda width: lambda w: w.T.reshape(d, h, width)  # noqa: E731  (out, in) -> (in, heads, width)
    bb = {
        "attn_norm": stack(b + "retention_layer_norm.weight"),
        "q": stack(r + "q_proj.weight", heads(dk)),
        "k": stack(r + "k_proj.weight", heads(dk)),
        "v": stack(r + "v_proj.weight", heads(2 * dk)),
        "g": stack(r + "g_proj.weight", heads(2 * dk)),
        "o": stack(r + "out_proj.weight", lambda w: w.T.reshape(h, 2 * dk, d)),
        "mlp_norm": stack(b + "final_layer_norm.weight"),
        "final_norm": f32("model.layer_norm.weight"),
    }
    fork = cfg.retnet_variant == "fork"
    if fork:
        bb.update(
            {
                "attn_norm_bias": stack(b + "retention_layer_norm.bias"),
                "q_bias": stack(r + "q_proj.bias", lambda w: w.reshape(h, dk)),
                "k_bias": stack(r + "k_proj.bias", lambda w: w.reshape(h, dk)),
                "v_bias": stack(r + "v_proj.bias", lambda w: w.reshape(h, 2 * dk)),
                "g_bias": stack(r + "g_proj.bias", lambda w: w.reshape(h, 2 * dk)),
                "o_bias": stack(r + "out_proj.bias"),
                "mlp_norm_bias": stack(b + "final_layer_norm.bias"),
                "final_norm_bias": f32("model.layer_norm.bias"),
            }
        )
    if cfg.xmoe:
        bb.update(_xmoe_from_reference(f32, stack, cfg))
        return bb
    bb.update({"fc1": stack(b + "ffn.fc1.weight", lambda w: w.T), "fc2": stack(b + "ffn.fc2.weight", lambda w: w.T)})
    if fork:
        bb.update(
            {
                "fc1_bias": stack(b + "ffn.fc1.bias"),
                "ffn_norm": stack(b + "ffn.ffn_layernorm.weight"),
                "ffn_norm_bias": stack(b + "ffn.ffn_layernorm.bias"),
                "fc2_bias": stack(b + "ffn.fc2.bias"),
            }
        )
    else:
        bb["gate"] = stack(b + "ffn.gate.weight", lambda w: w.T)
    return bb


# our XMoE parameter -> (torchscale's name under moe_layer.experts.{j}., transposed)
XMOE_EXPERT_KEYS = {
    "expert_fc1": ("fc1.weight", True),
    "expert_fc1_bias": ("fc1.bias", False),
    "expert_norm": ("ffn_layernorm.weight", False),
    "expert_norm_bias": ("ffn_layernorm.bias", False),
    "expert_fc2": ("fc2.weight", True),
    "expert_fc2_bias": ("fc2.bias", False),
}


def _xmoe_from_reference(f32, stack, cfg: ModelConfig) -> dict:
    """torchscale's XMoE layers: the gate's wg_reduction (16, d) -> [layers, d, 16], wg (E, 16) as it
    is, and each expert's Linear (out, in) -> [layers, experts, in, out]."""
    out = {"gate_reduce": stack(XMOE + "gate.wg_reduction.weight", lambda w: w.T), "gate_wg": stack(XMOE + "gate.wg")}

    def expert(i: int, j: int, name: str, transposed: bool) -> np.ndarray:
        w = f32(f"{XMOE.format(i=i)}experts.{j}.{name}")
        return w.T if transposed else w

    for ours, key in XMOE_EXPERT_KEYS.items():
        layers = [np.stack([expert(i, j, *key) for j in range(cfg.n_experts)]) for i in range(cfg.n_layers)]
        out[ours] = np.stack(layers)
    return out


def _retnet_to_reference(bb: dict, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
    d = cfg.d_model
    t = lambda w: np.ascontiguousarray(w.reshape(w.shape[0], -1).T)  # noqa: E731  (in, ...) -> (out, in)
    b = f"model.layers.{i}."
    r = b + "retention."
    out = {
        b + "retention_layer_norm.weight": bb["attn_norm"][i],
        b + "final_layer_norm.weight": bb["mlp_norm"][i],
        r + "q_proj.weight": t(bb["q"][i]),
        r + "k_proj.weight": t(bb["k"][i]),
        r + "v_proj.weight": t(bb["v"][i]),
        r + "g_proj.weight": t(bb["g"][i]),
        r + "out_proj.weight": np.ascontiguousarray(bb["o"][i].reshape(-1, d).T),
    }
    fork = cfg.retnet_variant == "fork"
    if fork:
        flat = lambda w: np.ascontiguousarray(w.reshape(-1))  # noqa: E731
        out.update(
            {
                r + "q_proj.bias": flat(bb["q_bias"][i]),
                r + "k_proj.bias": flat(bb["k_bias"][i]),
                r + "v_proj.bias": flat(bb["v_bias"][i]),
                r + "g_proj.bias": flat(bb["g_bias"][i]),
                r + "out_proj.bias": bb["o_bias"][i],
                b + "retention_layer_norm.bias": bb["attn_norm_bias"][i],
                b + "final_layer_norm.bias": bb["mlp_norm_bias"][i],
            }
        )
    if cfg.xmoe:
        m = XMOE.format(i=i)
        out[m + "gate.wg_reduction.weight"] = t(bb["gate_reduce"][i])
        out[m + "gate.wg"] = np.ascontiguousarray(bb["gate_wg"][i])
        for j in range(cfg.n_experts):
            for ours, (name, transposed) in XMOE_EXPERT_KEYS.items():
                w = bb[ours][i, j]
                out[f"{m}experts.{j}.{name}"] = t(w) if transposed else np.ascontiguousarray(w)
        return out
    out.update({b + "ffn.fc1.weight": t(bb["fc1"][i]), b + "ffn.fc2.weight": t(bb["fc2"][i])})
    if fork:
        out.update(
            {
                b + "ffn.fc1.bias": bb["fc1_bias"][i],
                b + "ffn.fc2.bias": bb["fc2_bias"][i],
                b + "ffn.ffn_layernorm.weight": bb["ffn_norm"][i],
                b + "ffn.ffn_layernorm.bias": bb["ffn_norm_bias"][i],
            }
        )
    else:
        out[b + "ffn.gate.weight"] = t(bb["gate"][i])
    return out


def _transposed(w: np.ndarray) -> np.ndarray:
    """A [d_in, ..., d_out] matrix as torch's Linear stores it: [d_out, d_in] (leading axes merged)."""
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T) if w.ndim > 2 else np.ascontiguousarray(w.T)


def _transformer_to_reference(bb: Mapping, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
    """One transformer block's keys (`blocks.{i}.*`)."""
    b, d = f"blocks.{i}.", cfg.d_model
    return {
        b + "attn.norm.weight": bb["attn_norm_scale"][i],
        b + "attn.norm.bias": bb["attn_norm_bias"][i],
        b + "attn.block.to_qkv.weight": np.ascontiguousarray(bb["qkv"][i].reshape(d, -1).T),
        b + "attn.block.to_out.weight": np.ascontiguousarray(bb["out"][i].reshape(-1, d).T),
        b + "attn.block.to_out.bias": bb["out_bias"][i],
        b + "ffn.norm.weight": bb["ffn_norm_scale"][i],
        b + "ffn.norm.bias": bb["ffn_norm_bias"][i],
        b + "ffn.block.0.weight": _transposed(bb["ffn_in"][i]),
        b + "ffn.block.0.bias": bb["ffn_in_bias"][i],
        b + "ffn.block.3.weight": _transposed(bb["ffn_out"][i]),
        b + "ffn.block.3.bias": bb["ffn_out_bias"][i],
    }


def _llama_to_reference(bb: Mapping, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
    """One llama/mistral/mixtral decoder layer's keys (`model.layers.{i}.*`)."""
    b, d = f"model.layers.{i}.", cfg.d_model
    out = {
        b + "input_layernorm.weight": bb["attn_norm"][i],
        b + "self_attn.q_proj.weight": np.ascontiguousarray(bb["q"][i].reshape(d, -1).T),
        b + "self_attn.k_proj.weight": np.ascontiguousarray(bb["k"][i].reshape(d, -1).T),
        b + "self_attn.v_proj.weight": np.ascontiguousarray(bb["v"][i].reshape(d, -1).T),
        b + "self_attn.o_proj.weight": np.ascontiguousarray(bb["o"][i].reshape(-1, d).T),
        b + "post_attention_layernorm.weight": bb["mlp_norm"][i],
    }
    if not cfg.moe:
        out[b + "mlp.gate_proj.weight"] = _transposed(bb["gate"][i])
        out[b + "mlp.up_proj.weight"] = _transposed(bb["up"][i])
        out[b + "mlp.down_proj.weight"] = _transposed(bb["down"][i])
        return out
    m = MOE.format(i=i)
    out[m + "gate.weight"] = _transposed(bb["router"][i])
    for j in range(cfg.n_experts):
        out.update({f"{m}experts.{j}.{w}.weight": _transposed(bb[w][i, j]) for w in ("w1", "w3", "w2")})
    return out


def to_reference(params: Mapping, cfg: ModelConfig, with_unused: bool = False) -> dict[str, np.ndarray]:
    """valle_jax parameters -> the reference's state dict (the inverse of `from_reference`).

    With `with_unused`, also the tables the reference holds but never reads (`unused_layout`), which
    its default strict loading requires (what `valle_jax.export` writes); without, exactly the keys
    `from_reference` reads, for round trips."""
    p = {k: v for k, v in params.items()}
    bb = {k: np.asarray(v, np.float32) for k, v in p["backbone"].items()}
    a = lambda k: np.asarray(p[k], np.float32)  # noqa: E731
    out = {
        "text_emb.weight": a("text_emb"),
        "langs_emb.weight": a("lang_emb"),
        "sep": a("sep"),
        "resps_emb.embeddings.0.weight": a("resp_emb_ar"),
        "classifier.weight": a("classifier").T.copy(),
        "classifier.bias": a("classifier_bias"),
    }
    out.update({f"proms_emb.embeddings.{k}.weight": a("prom_emb")[k] for k in range(cfg.n_prom_levels)})
    out.update({f"resps_emb.embeddings.{k}.weight": a("resp_emb_nar")[k - 1] for k in range(1, cfg.n_resp_levels)})
    if cfg.version >= 4:
        out.update({f"proms_emb.weight.{k}": a("prom_level_w")[k : k + 1] for k in range(cfg.n_prom_levels)})
        out.update({f"resps_emb.weight.{k}": a("resp_level_w")[k : k + 1] for k in range(cfg.n_resp_levels)})
    layer_to_reference = {
        "transformer": _transformer_to_reference,
        "llama": _llama_to_reference,
        "mistral": _llama_to_reference,
        "mixtral": _llama_to_reference,
        "retnet": _retnet_to_reference,
    }[cfg.arch]
    for i in range(cfg.n_layers):
        out.update(layer_to_reference(bb, cfg, i))
    if cfg.arch in LLAMA_FAMILY:
        out["model.norm.weight"] = bb["final_norm"]
    if cfg.arch == "retnet":
        from valle_jax.models import retention as R  # noqa: PLC0415 - jax: the key tables need only numpy

        out["model.layer_norm.weight"] = bb["final_norm"]
        if cfg.retnet_variant == "fork":
            out["model.layer_norm.bias"] = bb["final_norm_bias"]
        out[RETNET_ANGLE] = np.asarray(R.angles(cfg.head_dim, cfg.rope_base))
        out[RETNET_DECAY] = np.asarray(R.decay_rates(cfg.n_heads))
    if with_unused:
        # Zeros, not the reference's random init: nothing reads these tables (no gradient ever reaches
        # them, so a reference-trained file holds its init values, which carry no information either),
        # and zeros keep exports deterministic, compressible and plainly "unused" to whoever looks.
        out.update({k: np.zeros(shape, np.float32) for k, shape in unused_layout(cfg).items()})
    return out
