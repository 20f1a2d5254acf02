"""Converts a reference (mrq/vall-e) AR+NAR checkpoint into a valle_jax model directory.

    python -m tools.convert_reference SRC --out DIR [--arch transformer|llama|retnet|mistral|mixtral] [--heads H]
        [--format orbax|safetensors] [--overwrite]

SRC: the reference's exported `fp32.pth` ({"module", "stats", "userdata": {"symmap"}}), a bare state
dict `.pth`, an `.npz` of named arrays or a `.safetensors` file with the reference's key names; or
hf://OWNER/REPO/FILE[@REV] for one of these on the Hugging Face Hub (through its cache).
Shapes give the backbone, width, depth, vocabularies,
levels and version; the head count is not in the weights: pass --heads unless the width is one of
the reference presets (256 -> 4, 512 -> 8, 1024 -> 16); retnet checkpoints record it in their decay
buffer. Both retnet layouts convert: the fork's (biases, LayerNorm) and upstream torchscale's (GLU).
Legacy `retnet.` prefixes are renamed. Llama-family keys with `block_sparse_moe` experts convert to
arch mixtral (what the reference builds for llama, mistral or mixtral with experts > 1); a dense
llama-family checkpoint is llama unless --arch mistral says it was trained with Mistral's window.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from valle_jax import hub
from valle_jax.checkpointing import MODEL_FORMATS, CheckpointError, save_model
from valle_jax.config import ARCHS, LLAMA_FAMILY
from valle_jax.data.text import reference_symmap
from valle_jax.models.convert import ConversionError, from_reference, infer_config, read_source


def convert(
    src: Path | str,
    out: Path,
    heads: int | None = None,
    arch: str | None = None,
    overwrite: bool = False,
    fmt: str = "orbax",
):
    state, symmap, stats = read_source(hub.resolve(src))
    cfg = infer_config(state, heads)
    cfg = _with_arch(cfg, arch)
    params = from_reference(state, cfg)
    return save_model(out, cfg, params, symmap or reference_symmap(), stats, overwrite, fmt=fmt), cfg


def _with_arch(cfg, arch: str | None):
    """`cfg` checked against --arch. The keys cannot tell llama from mistral (same layout: mistral
    differs by its sliding window), nor which llama-family arch an MoE checkpoint was trained as
    (the reference builds the same Mixtral for all three)."""
    if not arch or arch == cfg.arch or (cfg.moe and arch in LLAMA_FAMILY):
        return cfg
    if arch == "mistral" and cfg.arch == "llama":
        return dataclasses.replace(cfg, arch="mistral")
    raise ConversionError(f"--arch {arch}, but the keys are those of a {cfg.arch} model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.convert_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="fp32.pth, a state dict .pth, an .npz or .safetensors of named arrays, or hf://...")
    p.add_argument("--out", type=Path, required=True, help="model directory to create")
    p.add_argument("--arch", choices=ARCHS, default=None, help="check the backbone is this one")
    p.add_argument("--heads", type=int, default=None, help="attention heads (not recorded in the weights)")
    p.add_argument("--format", choices=MODEL_FORMATS, default="orbax", help="params/ (orbax) or model.safetensors")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        out, cfg = convert(args.src, args.out, args.heads, args.arch, args.overwrite, args.format)
    except (ConversionError, CheckpointError, FileExistsError, ValueError, OSError) as e:  # HubError: ValueError
        print(f"convert_reference: {e}", file=sys.stderr)
        return 2
    print(
        f"convert_reference: {args.src} -> {out} ({cfg.arch}, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"{cfg.n_layers} layers, version {cfg.version})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
