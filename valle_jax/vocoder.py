"""Vocos (charactr/vocos-encodec-24khz): EnCodec codes -> 24 kHz waveform, the reference's default decoder.

    vocos = Vocos.load(vocoder_dir=None, device="cpu")   # HF cache, or a folder with config.yaml + pytorch_model.bin
    wav = vocos.decode(codes_TQ)                          # float32, 24 kHz, T * 320 samples

The `vocos` package builds its EnCodec feature extractor by downloading the pretrained EnCodec weights
(`EncodecModel.encodec_model_24khz(pretrained=True)`) even though decoding from codes needs only the
codebook table, which the Vocos checkpoint carries itself (`feature_extractor.codebook_weights`). So this
module builds the package's backbone and head from the checkpoint's config.yaml and holds the table in a
small module of its own (`CodebookTable`): loading never touches EnCodec's weights or the network beyond
the Vocos files. The features are the sum over levels of each code's table row, as Vocos computes them
(`codes_to_features`), conditioned on the bandwidth id of 6 kbps (8 levels, the codes VALL-E makes).

`build_random_vocos` saves a randomly initialised Vocos in the same layout for tests and machines without
the weights (its audio is noise-like, not speech).
"""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from valle_jax.atomic import atomic_path, write_text
from valle_jax.audio import HOP_LENGTH
from valle_jax.codec import import_encodec

VOCOS_REPO = "charactr/vocos-encodec-24khz"
CONFIG_NAME, WEIGHTS_NAME = "config.yaml", "pytorch_model.bin"
INFO_NAME = "vocoder_info.json"  # written beside a random Vocos: marks it as not-speech
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0)  # kbps, the checkpoint's bandwidth ids in order
BANDWIDTH_ID = BANDWIDTHS.index(6.0)  # VALL-E's codes are EnCodec at 6 kbps (8 levels)
BINS = 1024  # codes per EnCodec level
TABLE_LEVELS = 16  # the checkpoint stacks the codebooks of its largest bandwidth (12 kbps: 16 levels)


class VocoderUnavailable(RuntimeError):
    """No Vocos weights could be loaded."""


def _unavailable(*_, **__):
    raise RuntimeError("torchaudio's mel scale is unavailable beside torch+cpu (valle_jax's torchaudio stand-in)")


def vocos_module():
    """The `vocos` package. It imports encodec and torchaudio, whose PyPI build cannot load beside
    torch+cpu (valle_jax.codec installs a stand-in). Its heads module also imports two mel-scale helpers
    by name, used only by a head the EnCodec checkpoint does not have (IMDCTSymExpHead): the stand-in
    gets them as functions that raise if ever called."""
    import_encodec()
    stand_in = sys.modules.get("torchaudio")
    if getattr(stand_in, "__valle_jax_stand_in__", False) and "torchaudio.functional" not in sys.modules:
        functional = types.ModuleType("torchaudio.functional")
        functional.functional = types.ModuleType("torchaudio.functional.functional")
        functional.functional._hz_to_mel = functional.functional._mel_to_hz = _unavailable
        sys.modules["torchaudio.functional"] = stand_in.functional = functional
        sys.modules["torchaudio.functional.functional"] = functional.functional
    try:
        import vocos  # noqa: PLC0415 - needs the torchaudio stand-in installed before it imports
    except ImportError as e:
        raise VocoderUnavailable(f"the vocos package is not installed ({e}): pip install -e '.[serve]'") from e
    return vocos


class CodebookTable(torch.nn.Module):
    """The EnCodec codebooks stacked as Vocos stores them: [levels * BINS, dim] under the checkpoint's
    `feature_extractor.codebook_weights` key."""

    def __init__(self, levels: int, dim: int):
        super().__init__()
        self.codebook_weights = torch.nn.Parameter(torch.zeros(levels * BINS, dim), requires_grad=False)

    def features(self, codes_QBT: torch.Tensor) -> torch.Tensor:
        """codes [Q, B, T] -> features [B, dim, T]: each level's row of the table, summed over levels."""
        offsets = torch.arange(codes_QBT.shape[0], device=codes_QBT.device) * BINS
        rows = codes_QBT + offsets[:, None, None]
        return torch.nn.functional.embedding(rows, self.codebook_weights).sum(dim=0).transpose(1, 2)


def vocos_files(vocoder_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(config.yaml, pytorch_model.bin) from `vocoder_dir`, else from the Hugging Face cache (downloading
    when the network allows). Raises VocoderUnavailable naming what is missing and where it was looked for."""
    if vocoder_dir is not None:
        d = Path(vocoder_dir)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (d / n).is_file()]
        if missing:
            raise VocoderUnavailable(
                f"{d}: no Vocos weights ({' and '.join(missing)} missing); --vocoder-dir must hold the files of "
                f"{VOCOS_REPO} ({CONFIG_NAME}, {WEIGHTS_NAME})"
            )
        return d / CONFIG_NAME, d / WEIGHTS_NAME
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only for the Hugging Face cache path

    try:  # the cache first: a download attempt offline retries for ~20 s before it gives up
        return tuple(Path(hf_hub_download(VOCOS_REPO, n, local_files_only=True)) for n in (CONFIG_NAME, WEIGHTS_NAME))  # type: ignore[return-value]
    except Exception:
        pass
    try:
        return tuple(Path(hf_hub_download(VOCOS_REPO, name)) for name in (CONFIG_NAME, WEIGHTS_NAME))  # type: ignore[return-value]
    except Exception as e:  # offline: LocalEntryNotFoundError; others: HTTP errors
        raise VocoderUnavailable(
            f"the Vocos weights {VOCOS_REPO} ({CONFIG_NAME}, {WEIGHTS_NAME}) are not in the Hugging Face cache "
            f"and could not be downloaded ({type(e).__name__}). Download them once (huggingface-cli download "
            f"{VOCOS_REPO}), pass a folder holding them as --vocoder-dir, or use --vocoder encodec"
        ) from e


def _instantiate(spec: dict):
    module, name = spec["class_path"].rsplit(".", 1)
    vocos_module()
    cls = getattr(__import__(module, fromlist=[name]), name)
    return cls(**spec.get("init_args", {}))


def _build(config: dict):
    """An untrained Vocos of `config`'s backbone and head, with our codebook table as its features."""
    vocos = vocos_module()
    dim = config["backbone"]["init_args"]["input_channels"]
    return vocos.Vocos(CodebookTable(TABLE_LEVELS, dim), _instantiate(config["backbone"]), _instantiate(config["head"]))


@dataclass
class Vocos:
    """Vocos decoding of EnCodec codes; numpy in, numpy out."""

    model: torch.nn.Module
    device: str = "cpu"
    is_random: bool = False

    @classmethod
    def load(cls, vocoder_dir: str | os.PathLike | None = None, device: str = "cpu") -> Vocos:
        config_path, weights_path = vocos_files(vocoder_dir)
        try:
            model = _build(yaml.safe_load(config_path.read_text()))
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            # a checkpoint saved with the package's feature extractor may hold EnCodec's weights too
            state = {k: v for k, v in state.items() if not k.startswith("feature_extractor.encodec.")}
            model.load_state_dict(state)
        except Exception as e:
            raise VocoderUnavailable(f"{weights_path}: not a loadable {VOCOS_REPO} checkpoint ({e})") from e
        random = vocoder_dir is not None and (Path(vocoder_dir) / INFO_NAME).is_file()
        return cls(model.eval().to(device), device, random)

    def decode_batch(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """codes [T_i, Q] each -> float32 waveforms of T_i * 320 samples. One item at a time: the backbone's
        convolutions and the ISTFT look ahead, so right-padding would change a shorter item's last frames;
        and nothing is lost: it works at 75 frames/s in products large enough alone (dim 384, 8 layers,
        2 s rows, one thread: 0.033 CPU-s per row alone, 0.030 in a batch of 16)."""
        return [self.decode(c) for c in codes]

    def decode(self, codes_TQ: np.ndarray) -> np.ndarray:
        if len(codes_TQ) == 0:
            return np.zeros((0,), np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(codes_TQ, np.int64).T[:, None]).to(self.device)  # [Q, 1, T]
            feats = self.model.feature_extractor.features(x)
            bandwidth = torch.tensor([BANDWIDTH_ID], device=self.device)
            wav = self.model.decode(feats, bandwidth_id=bandwidth)[0].cpu().numpy().astype(np.float32)
        return wav[: len(codes_TQ) * HOP_LENGTH]


def random_config(dim: int = 64, layers: int = 2) -> dict:
    """The checkpoint's config.yaml layout (feature extractor, backbone, head), with a small backbone
    (the real one: dim 384, intermediate 1152, 8 layers)."""
    return {
        "feature_extractor": {
            "class_path": "vocos.feature_extractors.EncodecFeatures",
            "init_args": {"encodec_model": "encodec_24khz", "bandwidths": list(BANDWIDTHS), "train_codebooks": False},
        },
        "backbone": {
            "class_path": "vocos.models.VocosBackbone",
            "init_args": {
                "input_channels": 128,
                "dim": dim,
                "intermediate_dim": 3 * dim,
                "num_layers": layers,
                "adanorm_num_embeddings": len(BANDWIDTHS),
            },
        },
        "head": {
            "class_path": "vocos.heads.ISTFTHead",
            "init_args": {"dim": dim, "n_fft": 4 * HOP_LENGTH, "hop_length": HOP_LENGTH, "padding": "same"},
        },
    }


def build_random_vocos(out_dir: str | os.PathLike, seed: int = 0, dim: int = 64, layers: int = 2) -> Path:
    """Saves a randomly initialised Vocos (small backbone, random codebook table) to `out_dir` in the
    checkpoint's layout; returns the folder, usable as --vocoder-dir. Its audio is not speech."""
    torch.manual_seed(seed)
    config = random_config(dim, layers)
    model = _build(config)
    with torch.no_grad():
        model.feature_extractor.codebook_weights.normal_()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG_NAME, yaml.safe_dump(config))
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        torch.save(model.state_dict(), tmp)
    write_text(out / INFO_NAME, json.dumps({"random": True, "seed": seed, "note": "random Vocos: not speech"}))
    return out


__all__ = ["Vocos", "VocoderUnavailable", "VOCOS_REPO", "build_random_vocos", "vocos_files"]
