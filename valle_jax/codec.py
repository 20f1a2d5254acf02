"""EnCodec 24 kHz (torch): waveforms <-> codes int16[T, 8] at 75 frames/s.

The package's audio in and out (with valle_jax/vocoder.py): it needs the codec extra (torch, encodec;
`pip install 'valle-jax[codec]'`, which CodecUnavailable names when they are missing), and loads torch
only when a codec is made, so importing it stays light. Weights come from, in this order:
a local directory (`codec_dir`, holding `encodec_24khz-d7cc33bc.th`), or the encodec package's
own pretrained loader (the torch hub cache under $TORCH_HOME, downloading when the network allows).

`build_random_codec` makes a *usable* randomly initialised codec for machines without the
pretrained weights: a fresh EnCodec encodes everything to code 0 (its RVQ codebooks start at zero
and are only k-means-initialised in training), so its codebooks are filled with real encoder
frames instead. Its codes are varied and decode to audio, but that audio is not speech.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from valle_jax.atomic import atomic_path, write_text
from valle_jax.audio import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, num_frames
from valle_jax.extras import MissingExtra, require_codec_package

CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"  # the name the encodec package and torch hub use
INFO_NAME = "codec_info.json"  # written beside a random codec: marks it as not-speech
BANDWIDTH_LEVELS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # kbps -> RVQ levels


class CodecUnavailable(RuntimeError):
    """EnCodec cannot be used: no weights could be loaded, or the codec extra is not installed."""


def _torchaudio_stand_in() -> types.ModuleType:
    """A `torchaudio` module that lets `import encodec` succeed without the real one.

    PyPI's torchaudio is a CUDA build whose native library does not load beside the CPU torch
    build; encodec imports it at module level but its model code never calls it. We do resampling
    and audio I/O ourselves (valle_jax.audio), so any use of the stand-in is a bug: it says so.
    """
    mod = types.ModuleType("torchaudio")

    def _missing(name):
        raise AttributeError(
            f"torchaudio.{name} is unavailable: valle_jax replaces torchaudio with a stand-in "
            "(its PyPI build cannot load beside torch+cpu); use valle_jax.audio instead"
        )

    mod.__getattr__ = _missing  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchaudio.transforms")
    transforms.__getattr__ = _missing  # type: ignore[attr-defined]
    mod.transforms = transforms
    mod.__valle_jax_stand_in__ = True
    return mod


def import_encodec():
    """Imports the encodec package, installing the torchaudio stand-in when needed."""
    if "encodec" in sys.modules:
        return sys.modules["encodec"]
    _require("torch")
    try:
        importlib.import_module("torchaudio")
    except (ImportError, OSError):
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        stand_in = _torchaudio_stand_in()
        sys.modules["torchaudio"] = stand_in
        sys.modules["torchaudio.transforms"] = stand_in.transforms
    return _require("encodec")


def _require(name: str):
    """torch or encodec, or CodecUnavailable naming the extra that installs them."""
    try:
        return require_codec_package(name, "audio in and out (EnCodec)")
    except MissingExtra as e:
        raise CodecUnavailable(str(e)) from e


def _new_model(pretrained: bool):
    encodec = import_encodec()
    with warnings.catch_warnings():  # encodec uses torch's old weight_norm API: noise for our users
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        return encodec.EncodecModel.encodec_model_24khz(pretrained=pretrained)


def load_encodec_model(codec_dir: str | os.PathLike | None = None):
    """Returns an EncodecModel (eval mode) from `codec_dir` or the package's pretrained loader."""
    torch = _require("torch")
    if codec_dir is not None:
        path = Path(codec_dir)
        ckpt = path / CHECKPOINT_NAME if path.is_dir() else path
        if not ckpt.is_file():
            raise CodecUnavailable(
                f"no codec checkpoint at {ckpt}: --codec-dir must be a directory holding "
                f"{CHECKPOINT_NAME} (the pretrained EnCodec 24 kHz weights, or a random codec made by "
                "`python -m tools.make_random_codec`)"
            )
        model = _new_model(pretrained=False)
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise CodecUnavailable(f"{ckpt}: not a loadable EnCodec 24 kHz state dict ({e})") from e
        return model.eval()
    try:
        return _new_model(pretrained=True)
    except Exception as e:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_NAME
        raise CodecUnavailable(
            f"the pretrained EnCodec 24 kHz weights could not be loaded ({type(e).__name__}: {e}). "
            f"Either allow the download once (it is cached at {hub}), place the weights there or in a "
            "directory passed as --codec-dir, or, for tests without network, build a random codec with "
            "`python -m tools.make_random_codec DIR` (its audio is not speech)"
        ) from e


def is_random_codec(codec_dir: str | os.PathLike | None) -> bool:
    if codec_dir is None:
        return False
    info = Path(codec_dir) / INFO_NAME
    return info.is_file() and bool(json.loads(info.read_text()).get("random", False))


@dataclass
class Codec:
    """EnCodec at a fixed bandwidth; numpy in, numpy out."""

    model: object
    bandwidth: float = 6.0
    device: str = "cpu"
    is_random: bool = False

    @classmethod
    def load(cls, codec_dir=None, bandwidth: float = 6.0, device: str = "cpu") -> Codec:
        if bandwidth not in BANDWIDTH_LEVELS:
            raise ValueError(f"bandwidth {bandwidth} kbps not supported; choose one of {sorted(BANDWIDTH_LEVELS)}")
        model = load_encodec_model(codec_dir)
        model.set_target_bandwidth(bandwidth)
        model.to(device)
        return cls(model, bandwidth, device, is_random_codec(codec_dir))

    @property
    def n_levels(self) -> int:
        return BANDWIDTH_LEVELS[self.bandwidth]

    def encode_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encodes mono 24 kHz float waveforms as one batch; returns int16[T_i, Q] each.

        The 24 kHz model is causal (convolutions and LSTM), so right-padding a short item to the
        batch's length does not change its codes: item i keeps its first ceil(n_i / 320) frames.
        """
        import torch  # noqa: PLC0415 - optional heavy dependency: torch

        if not wavs:
            return []
        lengths = [len(w) for w in wavs]
        with torch.inference_mode():
            emb = self._embed(wavs)  # [B, D, T]
            codes = self.model.quantizer.encode(emb, self.model.frame_rate, self.model.bandwidth)  # [Q, B, T]
        codes = codes.transpose(0, 1).cpu().numpy().astype(np.int16)
        return [np.ascontiguousarray(codes[i, :, : num_frames(n)].T) for i, n in enumerate(lengths)]

    def _embed(self, wavs):
        """Encoder output [B, D, T] of right-padded waveforms.

        On CPU the strided convolutions before the LSTM run one item at a time (their activations,
        at the full sample rate, stay in cache; batching them was measured 1.5-2x slower), then the
        LSTM and the rest run on the padded batch at 75 frames/s, where batching pays.
        """
        import torch  # noqa: PLC0415 - optional heavy dependency: torch

        def padded(arrays, axis_len):
            out = torch.zeros(
                (len(arrays), *arrays[0].shape[1:-1], axis_len), dtype=arrays[0].dtype, device=arrays[0].device
            )
            for i, a in enumerate(arrays):
                out[i, ..., : a.shape[-1]] = a[0]
            return out

        tensors = [torch.from_numpy(np.asarray(w, np.float32))[None, None].to(self.device) for w in wavs]
        if self.device != "cpu":
            return self.model.encoder(padded(tensors, max(t.shape[-1] for t in tensors)))
        layers = list(self.model.encoder.model)
        split = next(i for i, m in enumerate(layers) if type(m).__name__ == "SLSTM")
        front, back = torch.nn.Sequential(*layers[:split]), torch.nn.Sequential(*layers[split:])
        feats = [front(t) for t in tensors]
        return back(padded(feats, max(f.shape[-1] for f in feats)))

    def encode(self, wav: np.ndarray) -> np.ndarray:
        return self.encode_batch([wav])[0]

    def decode(self, codes_TQ: np.ndarray) -> np.ndarray:
        """int codes [T, Q] -> float32 waveform of T * 320 samples at 24 kHz."""
        return self.decode_batch([codes_TQ])[0]

    def decode_batch(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """int codes [T_i, Q] each -> float32 waveforms of T_i * 320 samples (see `decode_rows`)."""
        return list(self.decode_rows(codes))

    def decode_rows(self, codes: Sequence[np.ndarray], map_rows: Callable = map) -> Iterator[np.ndarray]:
        """The waveforms of `codes` [T_i, Q] in order, each yielded as soon as it is made.

        The 24 kHz decoder is causal, so a right-padded row decodes to the same samples as the row alone
        (within float rounding). On CPU the codebook lookup, the first convolution and the LSTM (at 75
        frames/s, where a batch pays: the LSTM is a sequence of small products) run once on the padded
        batch; the upsampling convolutions, whose activations at up to 24 kHz fall out of cache when
        batched (2-thread EnCodec, 16 rows of 2 s: 0.237 CPU-s per row batched, 0.132 one at a time,
        0.114 split this way), run row by row, so the caller can answer a row before its batch-mates
        are done. `map_rows` runs those rows (`map`: one after another on this thread; an executor's
        `map`: several at once, each on one torch thread, which scales where one op's own threads do
        not). On an accelerator the whole batch is one call.
        """
        import torch  # noqa: PLC0415 - optional heavy dependency: torch

        codes = [np.asarray(c) for c in codes]
        frames = [len(c) for c in codes]
        if not codes or max(frames) == 0:
            yield from (np.zeros((0,), np.float32) for _ in codes)
            return
        # inference mode is entered per call, never across a yield (it would leak into the caller's code)
        with torch.inference_mode():
            # the codebook sum per row (rows may carry different numbers of levels), right-padded with zeros
            emb = None
            for i, c in enumerate(codes):
                if len(c):
                    row = torch.from_numpy(np.asarray(c, np.int64).T[:, None]).to(self.device)  # [Q, 1, T]
                    e = self.model.quantizer.decode(row)
                    if emb is None:
                        emb = e.new_zeros((len(codes), e.shape[1], max(frames)))
                    emb[i, :, : len(c)] = e[0]
            if self.device != "cpu":
                whole = self.model.decoder(emb)[:, 0].cpu().numpy().astype(np.float32)
            else:
                layers = list(self.model.decoder.model)
                split = next(i for i, m in enumerate(layers) if type(m).__name__ == "SLSTM") + 1
                front, back = torch.nn.Sequential(*layers[:split]), torch.nn.Sequential(*layers[split:])
                feats = front(emb)

        def upsample(i: int) -> np.ndarray:
            n = frames[i]
            if n == 0:
                return np.zeros((0,), np.float32)
            if self.device != "cpu":
                return whole[i, : n * HOP_LENGTH]
            with torch.inference_mode():  # thread-local: entered on the thread that runs the row
                return back(feats[i : i + 1, :, :n])[0, 0, : n * HOP_LENGTH].cpu().numpy().astype(np.float32)

        yield from map_rows(upsample, range(len(codes)))


def build_random_codec(wavs: Sequence[np.ndarray], out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Saves a usable randomly initialised EnCodec 24 kHz to `out_dir`; returns the directory.

    Weights are random (seeded); each RVQ codebook is filled with encoder frames of `wavs` drawn at
    random, following the residual chain (layer k is filled from what layers < k left over), so
    real audio maps to many distinct codes per level. About 1.5 s on 2 cores.
    """
    torch = _require("torch")
    torch.manual_seed(seed)
    model = _new_model(pretrained=False)
    with torch.inference_mode():
        frames = torch.cat(
            [model.encoder(torch.from_numpy(np.asarray(w, np.float32))[None, None])[0].T for w in wavs]
        )  # [N, D]
        gen = torch.Generator().manual_seed(seed)
        residual = frames
        for layer in model.quantizer.vq.layers:
            book = layer._codebook
            size = book.embed.shape[0]
            pick = torch.randint(0, residual.shape[0], (size,), generator=gen)
            # noise keeps duplicate picks apart (exact near-ties would make codes flip with float noise)
            embed = residual[pick] + 0.03 * residual.std() * torch.randn(size, residual.shape[1], generator=gen)
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1.0)
            residual = residual - book.decode(book.encode(residual))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CHECKPOINT_NAME) as tmp:
        torch.save(model.state_dict(), tmp)
    write_text(
        out / INFO_NAME, json.dumps({"random": True, "seed": seed, "note": "random EnCodec: its audio is not speech"})
    )
    return out


__all__ = [
    "Codec",
    "CodecUnavailable",
    "build_random_codec",
    "load_encodec_model",
    "import_encodec",
    "FRAME_RATE",
    "SAMPLE_RATE",
    "CHECKPOINT_NAME",
]
