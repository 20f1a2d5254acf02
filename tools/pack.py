"""Packs prepared utterances into a training store (ArrayRecord shards + index.json).

    python -m tools.pack SRC [SRC ...] --out STORE [--language en] [--group-language GROUP=LANG]
                         [--shard-size N] [--overwrite]

SRC is one of:
* a folder laid out `<group>/<speaker>/<id>.phn.txt` with codes beside each transcript:
  `<id>.codes.npy` (from tools.quantize) or the reference's `<id>.qnt.pt` (a (1, Q, T) tensor);
  this also imports the reference's per-speaker dataset folders;
* a reference HDF5 file (`data.h5`, SPEC §6.4): its `training` entries (`--hdf5-type` for others),
  its text ids, and the symbol map stored in it.
Speaker = `<group>_<speaker>` (the reference's default getter), group = the folder above the
speaker's. Phonemes map through the reference's symbol map, extended with unseen symbols as its
HDF5 builder does (next free id). Broken utterances are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.common import Report, find_files, setup_logging, utterance_id
from valle_jax.data import text as T
from valle_jax.data.store import StoreError, StoreWriter

CODEBOOK_SIZE = 1024


def check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be [frames > 0, levels], got shape {codes.shape}")
    if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
        raise ValueError(f"codes outside 0..{CODEBOOK_SIZE - 1} (min {codes.min()}, max {codes.max()})")
    return codes.astype(np.int16)


def load_qnt_pt(path: Path) -> np.ndarray:
    """The reference's `.qnt.pt`: a bare (1, Q, T) int64 tensor -> int16[T, Q]."""
    import torch

    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(
            f"expected a (1, levels, frames) tensor, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
        )
    return t[0].T.numpy()


def speaker_and_group(rel: Path) -> tuple[str, str]:
    """Reference default getters on `<group>/<speaker>/<file>`: ("group_speaker", "group")."""
    parts = rel.parts
    speaker = parts[-2] if len(parts) >= 2 else "speaker"
    group = parts[-3] if len(parts) >= 3 else "group"
    return f"{group}_{speaker}", group


def folder_items(root: Path, report: Report):
    """Yields (id, speaker, group, codes, tokens) of a prepared or reference-format folder."""
    for phn in find_files(root, (".phn.txt",)):
        stem = phn.parent / utterance_id(phn)
        npy, qnt = Path(f"{stem}.codes.npy"), Path(f"{stem}.qnt.pt")
        rel = phn.relative_to(root)
        try:
            if npy.exists():
                codes = np.load(npy, allow_pickle=False)
            elif qnt.exists():
                codes = load_qnt_pt(qnt)
            else:
                report.fail(phn, "no codes beside it (.codes.npy or .qnt.pt): quantize the audio first")
                continue
            codes = check_codes(codes)
            tokens = T.parse_phn_txt(phn.read_text("utf-8"))
            if not tokens:
                raise ValueError("empty phoneme file")
        except Exception as e:
            report.fail(phn, str(e))
            continue
        speaker, group = speaker_and_group(rel)
        yield str(rel.parent / utterance_id(phn)), speaker, group, codes, tokens


def hdf5_items(path: Path, kind: str, report: Report):
    """Yields (id, speaker, group, codes, text ids) of a reference HDF5 file, and sets its symmap."""
    import h5py

    with h5py.File(path, "r") as f:
        if kind not in f:
            raise StoreError(f"{path} has no '{kind}' entries (it has {sorted(f.keys())})")
        leaves = []
        f[kind].visititems(
            lambda name, obj: leaves.append(name) if isinstance(obj, h5py.Group) and "audio" in obj else None
        )
        for name in sorted(leaves):
            g = f[kind][name]
            rel = Path(name)
            try:
                if "text" not in g:
                    raise ValueError("no text (a noise entry)")
                codes = check_codes(g["audio"][:, :])
                ids = np.asarray(g["text"][:], np.int64)
            except Exception as e:
                report.fail(f"{path}:{kind}/{name}", str(e))
                continue
            _, group = speaker_and_group(rel)
            speaker = str(g.attrs.get("speaker", rel.parent.name))  # the builder stores the dir name
            yield str(rel), f"{group}_{speaker}", group, codes, ids


def hdf5_symmap(path: Path) -> dict[str, int]:
    import h5py

    with h5py.File(path, "r") as f:
        if "symmap" in f:
            raw = f["symmap"][()]
            return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    return T.reference_symmap()


def collapse_space_ids(ids: np.ndarray, space_id: int) -> np.ndarray:
    """One word-boundary id per gap, as the reference's HDF5 loader does."""
    keep = np.ones(len(ids), bool)
    keep[1:] = ~((ids[1:] == space_id) & (ids[:-1] == space_id))
    return ids[keep]


def pack(
    sources: list[Path],
    out: Path,
    language: str = "en",
    group_language: dict[str, str] | None = None,
    records_per_shard: int = 8192,
    overwrite: bool = False,
    hdf5_type: str = "training",
    progress: bool = True,
) -> Report:
    report = Report("pack")
    group_language = group_language or {}
    for lang in [language, *group_language.values()]:
        if lang not in T.LANG_SYMMAP:
            raise StoreError(f"unknown language {lang!r}; known: {sorted(T.LANG_SYMMAP)}")
    h5 = [s for s in sources if s.is_file()]
    folders = [s for s in sources if s.is_dir()]
    missing = [s for s in sources if not s.exists()]
    if missing:
        raise StoreError(f"sources do not exist: {[str(m) for m in missing]}")
    if h5 and folders or len(h5) > 1:
        raise StoreError("pack one HDF5 file, or any number of folders, per store (their symbol maps differ)")

    if h5:
        symmap = hdf5_symmap(h5[0])
        items = hdf5_items(h5[0], hdf5_type, report)
    else:
        symmap = T.reference_symmap()
        items = (it for root in folders for it in folder_items(root, report))
    writer = StoreWriter(out, symmap, T.LANG_SYMMAP, records_per_shard, overwrite)
    seconds, new_symbols = 0.0, []
    try:
        for uid, speaker, group, codes, text in tqdm(items, desc="packing", unit="utt", disable=not progress):
            if h5:
                ids = collapse_space_ids(text, writer.symmap.get(T.SPACE, 3))
            else:
                unseen = [t for t in dict.fromkeys(text) if t not in writer.symmap]
                if unseen:
                    writer.symmap = T.extend_symmap(writer.symmap, unseen)
                    new_symbols += unseen
                ids = np.asarray(T.encode(text, writer.symmap))
            writer.add(uid, speaker, group, group_language.get(group, language), codes, ids)
            seconds += len(codes) / 75
            report.done += 1
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    report.extra.append(
        f"store {path}: {report.done} utterances, {len(set(writer.columns['speaker']))} speakers, "
        f"{len(set(writer.columns['group']))} groups, {seconds / 3600:.2f} h of audio"
    )
    if new_symbols:
        report.extra.append(f"new symbols added to the symbol map: {new_symbols}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.pack",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("sources", type=Path, nargs="+", help="prepared/reference folders, or one reference HDF5 file")
    p.add_argument("--out", type=Path, required=True, help="store directory to create")
    p.add_argument("--language", default="en", help="language of every group not named by --group-language")
    p.add_argument(
        "--group-language",
        action="append",
        default=[],
        metavar="GROUP=LANG",
        help="language of one speaker group (repeatable)",
    )
    p.add_argument("--shard-size", type=int, default=8192, help="utterances per ArrayRecord shard")
    p.add_argument("--hdf5-type", default="training", help="which entries of an HDF5 file: training, validation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = p.parse_args(argv)
    setup_logging()
    try:
        group_language = dict(x.split("=", 1) for x in args.group_language)
    except ValueError:
        p.error("--group-language takes GROUP=LANG")
    try:
        report = pack(
            args.sources, args.out, args.language, group_language, args.shard_size, args.overwrite, args.hdf5_type
        )
    except (StoreError, FileExistsError) as e:
        print(f"pack: {e}", file=sys.stderr)
        return 2
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
