"""Packs prepared utterances into a training store (ArrayRecord shards + index.json).

    python -m tools.pack SRC [SRC ...] --out STORE [--language en] [--group-language GROUP=LANG]
                         [--levels Q] [--text-tokens N] [--shard-size N] [--overwrite]

SRC is one of:
* a folder laid out `<group>/<speaker>/<id>.phn.txt` with codes beside each transcript:
  `<id>.codes.npy` (from tools.quantize) or the reference's `<id>.qnt.pt` (a (1, Q, T) tensor);
  this also imports the reference's per-speaker dataset folders;
* a reference HDF5 file (`data.h5`, reference.md §6.4): its `training` entries (`--hdf5-type` for others),
  its text ids, and the symbol map stored in it;
* a valle_jax store (a folder with index.json): its utterances, with their symbols and languages.
Several folders are read as one tree (the outputs of sharded tools.quantize / tools.phonemize runs:
a transcript's codes may be in another folder), so packing the N shards' folders gives the store
that packing one unsharded folder gives; folders and stores merge into one store.
Speaker = `<group>_<speaker>` (the reference's default getter), group = the folder above the
speaker's. Phonemes map through the reference's symbol map, extended with unseen symbols as its
HDF5 builder does (next free id).

Every broken utterance is reported and skipped, and the exit code is then 1 (as tools.quantize):
codes that are not [frames, levels] integers in 0..1023, codes or transcripts missing their
partner, text ids outside the symbol map or the model's text table, and codes whose level count
differs from the store's. The store's level count is `--levels`, else the count most inputs have.
A symbol map with an id past the text table is refused whole (exit 2): see docs/data.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from tools.common import Report, add_language_flags, find_files, setup_logging, utterance_id
from valle_jax.config import ModelConfig
from valle_jax.data import languages
from valle_jax.data import text as T
from valle_jax.data.store import INDEX_NAME, Store, StoreError, StoreWriter
from valle_jax.extras import require_torch

CODEBOOK_SIZE = 1024
# EnCodec 24 kHz gives at most 32 levels (24 kbps): a bigger second axis is a transposed array
MAX_LEVELS = 32
# rows of the model's text embedding (model.n_tokens): every text id must index one of them
TEXT_TOKENS = ModelConfig.n_tokens
CODES_SUFFIXES = (".codes.npy", ".qnt.pt")
PHN_SUFFIX = ".phn.txt"


@dataclass(frozen=True)
class Candidate:
    """An utterance the scan found, with its codes' shape checked; `load` reads it in full."""

    label: str  # how reports name it: its transcript's path, or `data.h5:kind/name`
    uid: str
    speaker: str
    group: str
    frames: int
    levels: int
    load: Callable[[], tuple[np.ndarray, object]]  # -> (codes, phoneme tokens or text ids)
    lang: str | None = None  # the language a source store gave it (None: --language / --group-language)


# ---- codes ----


def check_shape(shape: Sequence[int], dtype) -> tuple[int, int]:
    """(frames, levels) of a codes array from its shape and dtype alone; ValueError says what is wrong."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        # truncating 3.7 to 3 would hide a file that is not codec output at all (features, audio)
        raise ValueError(f"codes are {dtype}, not integers: codebook indices must be stored as integers")
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"codes must be [frames > 0, levels > 0], got shape {tuple(shape)}")
    frames, levels = (int(x) for x in shape)
    if levels > MAX_LEVELS:
        raise ValueError(
            f"shape {tuple(shape)}: {levels} levels is more than any codec setting gives ({MAX_LEVELS}); "
            "a transposed [levels, frames] array? codes are [frames, levels]"
        )
    return frames, levels


def check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    check_shape(codes.shape, codes.dtype)
    if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
        raise ValueError(f"codes outside 0..{CODEBOOK_SIZE - 1} (min {codes.min()}, max {codes.max()})")
    return codes.astype(np.int16)


def load_qnt_pt(path: Path) -> np.ndarray:
    """The reference's `.qnt.pt`: a bare (1, Q, T) int64 tensor -> int16[T, Q]."""
    torch = require_torch(f"reading {path.name} (the reference's PyTorch codes)")

    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(
            f"expected a (1, levels, frames) tensor, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
        )
    return t[0].T.numpy()


def load_codes_file(path: Path) -> np.ndarray:
    if path.name.endswith(".qnt.pt"):
        return load_qnt_pt(path)
    return np.load(path, allow_pickle=False)


def codes_file_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a codes file; a .npy is memory-mapped, so the scan reads only its header."""
    if path.name.endswith(".qnt.pt"):
        codes = load_qnt_pt(path)
    else:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    return codes.shape, codes.dtype


# ---- finding utterances ----


def speaker_and_group(rel: Path) -> tuple[str, str]:
    """Reference default getters on `<group>/<speaker>/<file>`: ("group_speaker", "group")."""
    parts = rel.parts
    speaker = parts[-2] if len(parts) >= 2 else "speaker"
    group = parts[-3] if len(parts) >= 3 else "group"
    return f"{group}_{speaker}", group


def load_folder_utterance(codes_path: Path, phn: Path) -> tuple[np.ndarray, list[str]]:
    codes = load_codes_file(codes_path)
    tokens = T.parse_phn_txt(phn.read_text("utf-8"))
    if not tokens:
        raise ValueError("empty phoneme file")
    return codes, tokens


def stems(roots: Sequence[Path], suffixes: Sequence[str], report: Report) -> dict[Path, Path]:
    """{relative path of an utterance up to its id: its file} over all roots. Within a root the
    first suffix found wins (.codes.npy before .qnt.pt); an utterance in two roots (the shards of a
    sharded run are disjoint, so this is a mistake) is reported, and the first root's is kept."""
    found: dict[Path, tuple[Path, Path]] = {}
    for root in roots:
        for path in find_files(root, suffixes):
            rel = path.relative_to(root).parent / utterance_id(path)
            if rel not in found:
                found[rel] = (root, path)
            elif found[rel][0] != root:
                report.fail(path, f"the same utterance is also in {found[rel][1]}: that one is packed")
    return {rel: path for rel, (_, path) in found.items()}


def folder_candidates(roots: Sequence[Path], report: Report) -> Iterator[Candidate]:
    """The utterances of prepared or reference-format folders, each transcript with its codes. The
    folders are one tree for this: a transcript's codes may lie in another folder (the outputs of
    sharded tools.quantize and tools.phonemize runs), and the order is the relative paths' order,
    so packing the shards' folders gives the store packing one folder gives."""
    phns = stems(roots, (PHN_SUFFIX,), report)
    codes_of = stems(roots, CODES_SUFFIXES, report)
    for rel, codes in sorted(codes_of.items()):
        if rel not in phns:
            report.fail(codes, f"codes but no transcript ({PHN_SUFFIX}) beside them: phonemize the text first")
    for rel, phn in sorted(phns.items()):
        codes_path = codes_of.get(rel)
        if codes_path is None:
            report.fail(phn, "no codes beside it (.codes.npy or .qnt.pt): quantize the audio first")
            continue
        try:
            frames, levels = check_shape(*codes_file_header(codes_path))
        except Exception as e:
            report.fail(phn, str(e))
            continue
        speaker, group = speaker_and_group(rel.parent / phn.name)
        load = functools.partial(load_folder_utterance, codes_path, phn)
        yield Candidate(str(phn), str(rel), speaker, group, frames, levels, load)


def load_store_utterance(store: Store, i: int, inverse: Mapping[int, str]) -> tuple[np.ndarray, list[str]]:
    codes, text = store.read(i)
    return codes, [inverse[int(t)] for t in text[1:-1]]  # the symbols between <s> and </s>


def store_candidates(path: Path, report: Report) -> Iterator[Candidate]:
    """The utterances of a valle_jax store, as symbols (its ids mean what its own map says) and
    with its languages."""
    store = Store(path)
    inverse: dict[int, str] = {}
    for sym, i in store.symmap.items():
        inverse.setdefault(int(i), sym)  # ids two symbols share ('?' and 'p') map back to the first
    code_of = {v: k for k, v in store.lang_symmap.items()}
    for i, uid in enumerate(store.ids):
        yield Candidate(
            f"{path}:{uid}",
            uid,
            str(store.speaker_names[store.speaker[i]]),
            str(store.group_names[store.group[i]]),
            int(store.frames[i]),
            store.n_levels,
            functools.partial(load_store_utterance, store, i, inverse),
            lang=code_of[int(store.lang[i])],
        )


def load_hdf5_entry(g: h5py.Group) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(g["text"][:])
    if ids.dtype.kind not in "iu":
        raise ValueError(f"text ids are {ids.dtype}, not integers")
    return g["audio"][:, :], ids.astype(np.int64)


def hdf5_candidates(f: h5py.File, path: Path, kind: str, report: Report) -> Iterator[Candidate]:
    """The utterances of an open reference HDF5 file's `kind` entries."""
    if kind not in f:
        raise StoreError(f"{path} has no '{kind}' entries (it has {sorted(f.keys())})")
    leaves = []
    f[kind].visititems(
        lambda name, obj: (
            leaves.append(name) if isinstance(obj, h5py.Group) and ("audio" in obj or "text" in obj) else None
        )
    )
    for name in sorted(leaves):
        g = f[kind][name]
        label = f"{path}:{kind}/{name}"
        try:
            if "text" not in g:
                raise ValueError("codes but no text (a noise entry)")
            if "audio" not in g:
                raise ValueError("text but no codes (audio)")
            frames, levels = check_shape(g["audio"].shape, g["audio"].dtype)
        except Exception as e:
            report.fail(label, str(e))
            continue
        rel = Path(name)
        _, group = speaker_and_group(rel)
        speaker = str(g.attrs.get("speaker", rel.parent.name))  # the builder stores the dir name
        yield Candidate(
            label, str(rel), f"{group}_{speaker}", group, frames, levels, functools.partial(load_hdf5_entry, g)
        )


def hdf5_symmap(f: h5py.File) -> dict[str, int]:
    if "symmap" in f:
        raw = f["symmap"][()]
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    return T.reference_symmap()


# ---- level count ----


def choose_levels(candidates: Sequence[Candidate], levels: int | None) -> tuple[int, str]:
    """The store's level count and why: `--levels`, else the count most inputs have.

    Never the first file's: one odd file must not decide the fate of every good one.
    """
    if levels is not None:
        return levels, "--levels"
    counts = Counter(c.levels for c in candidates).most_common()
    if not counts:
        raise StoreError("no usable utterances: the store would be empty")
    (best, n), *others = counts
    if others and others[0][1] == n:
        raise StoreError(
            f"as many inputs have {best} codec levels as {others[0][0]} ({n} each): pass --levels to choose"
        )
    return best, f"the majority: {n} of {len(candidates)} inputs"


def keep_level_count(candidates: Sequence[Candidate], n_levels: int, report: Report) -> list[Candidate]:
    kept = []
    for c in candidates:
        if c.levels == n_levels:
            kept.append(c)
            continue
        hint = " (a transposed [levels, frames] array?)" if c.frames == n_levels else ""
        report.fail(c.label, f"{c.levels} codec levels, the store has {n_levels}{hint}")
    return kept


# ---- text ids ----


def check_symmap(symmap: Mapping[str, int], text_tokens: int) -> None:
    """Every id the map gives must index the model's text table.

    A map that breaks this is refused whole rather than remapped: remapping would silently change
    what each id means to a checkpoint trained on that map, and would hide a corrupt file.
    """
    bad = {s: i for s, i in symmap.items() if not isinstance(i, int) or not 0 <= i < text_tokens}
    if bad:
        shown = ", ".join(f"{s!r} -> {i!r}" for s, i in list(bad.items())[:10])
        raise StoreError(
            f"the symbol map gives ids outside 0..{text_tokens - 1} ({shown}): the model's text table has "
            f"{text_tokens} rows (model.n_tokens). Fix the map, or pass --text-tokens for a larger table"
        )


def collapse_space_ids(ids: np.ndarray, space_id: int) -> np.ndarray:
    """One word-boundary id per gap, as the reference's HDF5 loader does."""
    keep = np.ones(len(ids), bool)
    keep[1:] = ~((ids[1:] == space_id) & (ids[:-1] == space_id))
    return ids[keep]


class TextIds:
    """Turns an utterance's text into checked ids; grows the map with unseen phoneme symbols."""

    def __init__(self, symmap: Mapping[str, int], text_tokens: int):
        self.symmap = dict(symmap)
        self.text_tokens = text_tokens
        self.new_symbols: list[str] = []
        self._known = set(self.symmap.values())

    def __call__(self, text) -> np.ndarray:
        if isinstance(text, np.ndarray):  # HDF5: ids already
            ids = collapse_space_ids(text, self.symmap.get(T.SPACE, 3))
        else:
            ids = np.asarray(T.encode(text, self._with_symbols(text)))
        self._check(ids)
        return ids

    def _with_symbols(self, tokens: Sequence[str]) -> dict[str, int]:
        unseen = [t for t in dict.fromkeys(tokens) if t not in self.symmap]
        if not unseen:
            return self.symmap
        extended = T.extend_symmap(self.symmap, unseen)
        past = [t for t in unseen if extended[t] >= self.text_tokens]
        if past:  # leave the map as it was: the utterance is skipped
            raise ValueError(
                f"new phoneme symbols {past} would get ids past the text table's {self.text_tokens} rows "
                "(model.n_tokens)"
            )
        self.symmap = extended
        self._known.update(extended[t] for t in unseen)
        self.new_symbols += unseen
        return extended

    def _check(self, ids: np.ndarray) -> None:
        outside = sorted({int(i) for i in ids if not 0 <= i < self.text_tokens})
        if outside:
            raise ValueError(
                f"text ids {outside} outside the text table (ids 0..{self.text_tokens - 1}, model.n_tokens)"
            )
        unknown = sorted({int(i) for i in ids} - self._known)
        if unknown:
            raise ValueError(f"text ids {unknown} are not in the symbol map")


# ---- packing ----


def split_sources(sources: Sequence[Path]) -> tuple[Path | None, list[Path], list[Path]]:
    """(the HDF5 file or None, the folders, the stores); one HDF5 file, or any number of folders
    and stores (a folder holding index.json)."""
    missing = [s for s in sources if not s.exists()]
    if missing:
        raise StoreError(f"sources do not exist: {[str(m) for m in missing]}")
    h5 = [s for s in sources if s.is_file()]
    stores = [s for s in sources if s.is_dir() and (s / INDEX_NAME).is_file()]
    folders = [s for s in sources if s.is_dir() and s not in stores]
    if h5 and (folders or stores) or len(h5) > 1:
        raise StoreError(
            "pack one HDF5 file, or any number of folders and stores, per store (an HDF5 file keeps its symbol map)"
        )
    return (h5[0] if h5 else None), folders, stores


def unique_ids(candidates: Sequence[Candidate], report: Report) -> list[Candidate]:
    """The first candidate of each utterance id (stores merged twice, or overlapping sources)."""
    seen: dict[str, str] = {}
    out = []
    for c in candidates:
        if c.uid in seen:
            report.fail(c.label, f"utterance {c.uid} is already packed from {seen[c.uid]}")
            continue
        seen[c.uid] = c.label
        out.append(c)
    return out


def check_options(language: str, group_language: Mapping[str, str], levels: int | None, text_tokens: int) -> None:
    for lang in [language, *group_language.values()]:
        try:
            languages.check(lang)
        except T.TextError as e:
            raise StoreError(str(e)) from None
    if levels is not None and not 1 <= levels <= MAX_LEVELS:
        raise StoreError(f"--levels must be in 1..{MAX_LEVELS}, got {levels}")
    if text_tokens < 1:
        raise StoreError(f"--text-tokens must be positive, got {text_tokens}")


def write_candidates(
    writer: StoreWriter,
    candidates: Sequence[Candidate],
    text_ids: TextIds,
    lang_of: Callable[[Candidate], str],
    report: Report,
    progress: bool,
) -> float:
    """Loads, checks and writes each candidate; returns the seconds of audio written."""
    seconds = 0.0
    for c in tqdm(candidates, desc="packing", unit="utt", disable=not progress):
        try:
            codes, text = c.load()
            codes = check_codes(codes)
            if codes.shape[1] != c.levels:  # the file changed since the scan
                raise ValueError(f"{codes.shape[1]} codec levels, the store has {c.levels}")
            ids = text_ids(text)
        except Exception as e:
            report.fail(c.label, str(e))
            continue
        writer.add(c.uid, c.speaker, c.group, lang_of(c), codes, ids)
        seconds += len(codes) / 75
        report.done += 1
    return seconds


def pack(
    sources: list[Path],
    out: Path,
    language: str = "en",
    group_language: dict[str, str] | None = None,
    records_per_shard: int = 8192,
    overwrite: bool = False,
    hdf5_type: str = "training",
    progress: bool = True,
    levels: int | None = None,
    text_tokens: int = TEXT_TOKENS,
) -> Report:
    """Packs `sources` into a store at `out`. Broken utterances are reported and skipped;
    StoreError (or FileExistsError) only for what spoils the whole store."""
    report = Report("pack")
    group_language = group_language or {}
    check_options(language, group_language, levels, text_tokens)
    h5, folders, stores = split_sources(sources)
    writer = StoreWriter(out, {}, {}, records_per_shard, overwrite)  # fails fast on an existing store
    try:
        with contextlib.ExitStack() as stack:
            # two passes: a scan that reads only shapes, to choose the level count, then the writing
            if h5:
                f = stack.enter_context(h5py.File(h5, "r"))
                symmap = hdf5_symmap(f)
                candidates = list(hdf5_candidates(f, h5, hdf5_type, report))
            else:
                symmap = T.reference_symmap()
                candidates = list(folder_candidates(folders, report)) if folders else []
                candidates += [c for store in stores for c in store_candidates(store, report)]
                candidates = unique_ids(candidates, report)
            check_symmap(symmap, text_tokens)
            n_levels, why = choose_levels(candidates, levels)
            usable = keep_level_count(candidates, n_levels, report)
            text_ids = TextIds(symmap, text_tokens)
            lang_of = lambda c: group_language.get(c.group, c.lang or language)  # noqa: E731
            # en=0, ja=1 (the reference's), then the other codes in use
            writer.lang_symmap = languages.store_langs([language, *(lang_of(c) for c in usable)])
            seconds = write_candidates(writer, usable, text_ids, lang_of, report, progress)
        writer.symmap = text_ids.symmap
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    report.extra.append(
        f"store {path}: {report.done} utterances, {len(set(writer.columns['speaker']))} speakers, "
        f"{len(set(writer.columns['group']))} groups, {seconds / 3600:.2f} h of audio"
    )
    report.extra.append(f"{n_levels} codec levels ({why})")
    if text_ids.new_symbols:
        report.extra.append(f"new symbols added to the symbol map: {text_ids.new_symbols}")
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
    add_language_flags(p, "language of every group not named by --group-language")
    p.add_argument(
        "--levels", type=int, default=None, help="codec levels per utterance (default: what most inputs have)"
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=TEXT_TOKENS,
        help=f"rows of the model's text table (model.n_tokens, default {TEXT_TOKENS}): text ids must be below it",
    )
    p.add_argument("--shard-size", type=int, default=8192, help="utterances per ArrayRecord shard")
    p.add_argument("--hdf5-type", default="training", help="which entries of an HDF5 file: training, validation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = p.parse_args(argv)
    setup_logging()
    try:
        report = pack(
            args.sources,
            args.out,
            args.language,
            dict(args.group_language),
            args.shard_size,
            args.overwrite,
            args.hdf5_type,
            levels=args.levels,
            text_tokens=args.text_tokens,
        )
    except (StoreError, FileExistsError) as e:
        print(f"pack: {e}", file=sys.stderr)
        return 2
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
