"""The training store: ArrayRecord shards of utterances plus an `index.json`.

Layout of a store directory:
    index.json                      format, version, symmap, lang map, shard names, and one column
                                    per field over all utterances (id, speaker, group, lang,
                                    frames, phones), in record order
    shard-00000.array_record ...    one record per utterance: header + codes int16[T, Q] + text

The index holds everything filters and batch planning need, so they never open a record.
A store is written into a temp directory and renamed into place: a killed pack leaves no store.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from valle_jax.atomic import publish_dir, temp_dir_beside
from valle_jax.audio import FRAME_RATE

FORMAT = "valle_jax.store"
VERSION = 1
INDEX_NAME = "index.json"
_HEADER = struct.Struct("<4sIII")  # magic, frames, levels, phones
_MAGIC = b"VJU1"


class StoreError(ValueError):
    """A store that is missing, incomplete, or of another format or version."""


def encode_record(codes_TQ: np.ndarray, text: np.ndarray) -> bytes:
    codes = np.ascontiguousarray(codes_TQ, dtype="<i2")
    text = np.ascontiguousarray(text, dtype="<i2")
    return _HEADER.pack(_MAGIC, codes.shape[0], codes.shape[1], text.shape[0]) + codes.tobytes() + text.tobytes()


def decode_record(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Record bytes -> (codes int16[T, Q], text int16[N])."""
    magic, frames, levels, phones = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise StoreError(f"not a valle_jax utterance record (magic {magic!r})")
    off = _HEADER.size
    codes = np.frombuffer(raw, "<i2", frames * levels, off).reshape(frames, levels)
    text = np.frombuffer(raw, "<i2", phones, off + 2 * frames * levels)
    return codes, text


@dataclass(frozen=True)
class Utterance:
    id: str
    speaker: str
    group: str
    lang: str
    codes: np.ndarray  # int16[T, Q]
    text: np.ndarray  # int16[N]: phoneme ids with <s> ... </s>


class StoreWriter:
    """Writes utterances into shards; `close()` writes the index and publishes the store."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        symmap: Mapping[str, int],
        lang_symmap: Mapping[str, int],
        records_per_shard: int = 8192,
        overwrite: bool = False,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} exists; pass overwrite=True (--overwrite) to replace it")
        self._tmp = temp_dir_beside(self.out_dir)
        self.symmap = dict(symmap)
        self.lang_symmap = dict(lang_symmap)
        self.records_per_shard = records_per_shard
        self.overwrite = overwrite
        self.columns: dict[str, list] = {k: [] for k in ("id", "speaker", "group", "lang", "frames", "phones")}
        self.shards: list[str] = []
        self._writer = None
        self._n_levels: int | None = None
        self._in_shard = 0

    def _open_shard(self):
        name = f"shard-{len(self.shards):05d}.array_record"
        self.shards.append(name)
        # group_size:1 makes every record its own chunk: fastest random access, what grain wants
        self._writer = ArrayRecordWriter(str(self._tmp / name), "group_size:1")
        self._in_shard = 0

    def add(self, id: str, speaker: str, group: str, lang: str, codes_TQ: np.ndarray, text: np.ndarray) -> None:
        if lang not in self.lang_symmap:
            raise StoreError(f"{id}: language {lang!r} not in {sorted(self.lang_symmap)}")
        if self._n_levels is None:
            self._n_levels = int(codes_TQ.shape[1])
        elif codes_TQ.shape[1] != self._n_levels:
            raise StoreError(f"{id}: {codes_TQ.shape[1]} codec levels, the store has {self._n_levels}")
        if self._writer is None or self._in_shard >= self.records_per_shard:
            if self._writer is not None:
                self._writer.close()
            self._open_shard()
        self._writer.write(encode_record(codes_TQ, text))
        self._in_shard += 1
        for k, v in (
            ("id", id),
            ("speaker", speaker),
            ("group", group),
            ("lang", lang),
            ("frames", int(codes_TQ.shape[0])),
            ("phones", int(len(text))),
        ):
            self.columns[k].append(v)

    def __len__(self) -> int:
        return len(self.columns["id"])

    def close(self) -> Path:
        if self._writer is not None:
            self._writer.close()
        if not len(self):
            self.abort()
            raise StoreError("no utterances to write: the store would be empty")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "frame_rate": FRAME_RATE,
            "n_levels": self._n_levels,
            "symmap": self.symmap,
            "lang_symmap": self.lang_symmap,
            "shards": self.shards,
            "columns": self.columns,
        }
        (self._tmp / INDEX_NAME).write_text(json.dumps(index, ensure_ascii=False))
        return publish_dir(self._tmp, self.out_dir)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self._tmp, ignore_errors=True)


def shard_path(store_dir: Path, name) -> Path:
    """`store_dir / name` for a shard named in the index, which must lie inside the store directory.

    The index is data that may come from elsewhere: an absolute name or one climbing out with `..`
    would make training read (and trust) whatever file it points at.
    """
    parts = PurePath(name).parts if isinstance(name, str) else ()
    if not parts or PurePath(name).is_absolute() or ".." in parts:
        raise StoreError(
            f"{store_dir}: {INDEX_NAME} names shard {name!r}, which is outside the store directory; "
            "shard names must be relative paths inside it (as tools.pack writes them)"
        )
    return store_dir / name


class Store:
    """Random access to a store's utterances, plus its index as numpy columns.

    Picklable (grain worker processes): the ArrayRecord readers are reopened lazily.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise StoreError(
                f"{self.path} is not a valle_jax store (no {INDEX_NAME}); build one with `python -m tools.pack`"
            )
        index = json.loads(index_path.read_text("utf-8"))
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise StoreError(
                f"{self.path}: store format {index.get('format')} v{index.get('version')}, "
                f"this code reads {FORMAT} v{VERSION}"
            )
        self.symmap: dict[str, int] = index["symmap"]
        self.lang_symmap: dict[str, int] = index["lang_symmap"]
        self.n_levels: int = index["n_levels"]
        self.frame_rate: int = index["frame_rate"]
        self.shards = [shard_path(self.path, s) for s in index["shards"]]
        missing = [str(s) for s in self.shards if not s.is_file()]
        if missing:
            raise StoreError(f"{self.path}: missing shards {missing}")
        cols = index["columns"]
        self.ids: list[str] = cols["id"]
        self.frames = np.asarray(cols["frames"], np.int32)
        self.phones = np.asarray(cols["phones"], np.int32)
        self.speaker_names, self.speaker = np.unique(np.asarray(cols["speaker"], dtype=object), return_inverse=True)
        self.group_names, self.group = np.unique(np.asarray(cols["group"], dtype=object), return_inverse=True)
        self.speaker = self.speaker.astype(np.int32)
        self.group = self.group.astype(np.int32)
        self.lang = np.asarray([self.lang_symmap[x] for x in cols["lang"]], np.int32)
        self._source = None

    @property
    def durations(self) -> np.ndarray:
        """Seconds per utterance."""
        return self.frames / self.frame_rate

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # stable: grain keys worker state on it
        return f"Store({str(self.path)!r})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def _reader(self):
        if self._source is None:
            import grain  # optional heavy dependency: grain (seconds to import)  # noqa: PLC0415

            self._source = grain.sources.ArrayRecordDataSource([str(s) for s in self.shards])
        return self._source

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes int16[T, Q], text int16[N]) of utterance i."""
        return decode_record(self._reader()[int(i)])

    def __getitem__(self, i: int) -> Utterance:
        codes, text = self.read(i)
        lang = next(k for k, v in self.lang_symmap.items() if v == self.lang[i])
        return Utterance(
            self.ids[i],
            str(self.speaker_names[self.speaker[i]]),
            str(self.group_names[self.group[i]]),
            lang,
            codes,
            text,
        )
