"""The grain pipeline: store -> filtered, speaker-aware, length-bucketed, fixed-shape batches.

How it stays deterministic, resumable and fast:
* Everything decided per epoch (which utterances, in which batches, in which order) is planned from
  the index alone by `BatchPlan`, a pure function of (seed, epoch): no record is opened to plan.
* Batch k is then built by `BatchAssembler` from (k, its rows) with a random generator seeded by
  (seed, k, global row). A batch therefore depends neither on the worker count nor on the host
  count: host h of n gets rows [h*B/n, (h+1)*B/n) of exactly the global batch a single host sees.
* The grain dataset is a MapDataset over batch numbers, so the iterator's state is a position
  and restores exactly.
* Shapes: text is padded to one of `text_buckets`, the response to one of `resp_buckets`, the
  prompt to `prompt_frames`. A batch takes the largest bucket among its rows, and rows are
  grouped by bucket before batching, so the set of batch shapes is small and known in advance.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
from absl import flags

from valle_jax.audio import FRAME_RATE
from valle_jax.config import DataConfig
from valle_jax.data.batch import pad_batch
from valle_jax.data.store import Store

log = logging.getLogger(__name__)

_PLAN_STREAM, _ROW_STREAM = 0, 1  # separate random streams for planning and per-row sampling


def bucket_index(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """Index of the smallest bucket >= each length (len(buckets) where none fits)."""
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


@dataclass(frozen=True)
class Eligible:
    """Utterances that pass the filters, grouped by speaker and speaker group."""

    utts: np.ndarray  # int64[N]: store indices
    speaker_utts: tuple[np.ndarray, ...]  # per kept speaker: its eligible store indices
    group_speakers: tuple[np.ndarray, ...]  # per kept group: indices into speaker_utts
    utt_speaker: np.ndarray  # int64[len(store)]: store index -> position in speaker_utts (-1: not kept)
    n_filtered: dict  # reason -> count of utterances dropped

    def draw(self, rng: np.random.Generator, sample_type: str, n: int) -> np.ndarray:
        """n store indices: uniform speaker (or group, then speaker), then a uniform utterance of it."""
        if sample_type == "group":
            groups = rng.integers(len(self.group_speakers), size=n)
            members = np.concatenate(self.group_speakers)
            speakers = members[_uniform_member(rng, groups, [len(g) for g in self.group_speakers])]
        else:
            speakers = rng.integers(len(self.speaker_utts), size=n)
        flat = np.concatenate(self.speaker_utts)
        return flat[_uniform_member(rng, speakers, [len(u) for u in self.speaker_utts])]


def _uniform_member(rng: np.random.Generator, which: np.ndarray, sizes: list[int]) -> np.ndarray:
    """For each entry of `which`, a uniform position inside its list, as an index into the lists
    concatenated (vectorised: one draw per entry, no Python loop)."""
    sizes = np.asarray(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return offsets[which] + (rng.random(len(which)) * sizes[which]).astype(np.int64)


def select(store: Store, cfg: DataConfig) -> Eligible:
    """Applies reference.md §6.5's filters (phones, duration, min utterances per speaker) and the buckets."""
    n = len(store)
    keep = np.ones(n, bool)
    dropped = {}

    def drop(mask, reason):
        dropped[reason] = int((keep & ~mask).sum())
        keep[:] &= mask

    lo, hi = cfg.phones_range
    drop((store.phones >= lo) & (store.phones <= hi), "phones_range")
    lo, hi = cfg.duration_range
    drop((store.durations >= lo) & (store.durations <= hi), "duration_range")
    drop(store.phones <= cfg.text_buckets[-1], "longer than the largest text bucket")
    drop(store.frames <= cfg.resp_buckets[-1], "longer than the largest response bucket")
    counts = np.bincount(store.speaker[keep], minlength=len(store.speaker_names))
    drop(counts[store.speaker] >= cfg.min_utterances, "min_utterances")

    utts = np.flatnonzero(keep)
    speakers = np.unique(store.speaker[utts])
    speaker_utts = tuple(utts[store.speaker[utts] == s] for s in speakers)
    spk_group = np.asarray([store.group[u[0]] for u in speaker_utts], np.int64)
    group_speakers = tuple(np.flatnonzero(spk_group == g) for g in np.unique(spk_group))
    utt_speaker = np.full(n, -1, np.int64)
    for i, us in enumerate(speaker_utts):
        utt_speaker[us] = i
    return Eligible(utts, speaker_utts, group_speakers, utt_speaker, dropped)


class BatchPlan:
    """Random-access source: batch number -> this host's rows (store indices), for any epoch.

    An epoch draws N = len(eligible) utterances (each once for "path"; for "speaker" / "group" a
    uniform speaker or group, then a uniform utterance of it), sorts them by bucket, cuts them
    into global batches (dropping the N mod B left over) and shuffles the batch order.
    """

    def __init__(
        self,
        store: Store,
        cfg: DataConfig,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ):
        if cfg.batch_size % process_count:
            raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} hosts")
        self.cfg = cfg
        self.eligible = select(store, cfg)
        n = len(self.eligible.utts)
        if n == 0:
            raise ValueError(f"no utterance of {store.path} passes the data filters ({self.eligible.n_filtered})")
        if drop_remainder and n < cfg.batch_size:
            raise ValueError(f"only {n} utterances pass the data filters, fewer than data.batch_size={cfg.batch_size}")
        self.store_repr = repr(store)
        self.text_bucket = bucket_index(store.phones, cfg.text_buckets)
        self.resp_bucket = bucket_index(store.frames, cfg.resp_buckets)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = cfg.batch_size // process_count
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        self.batches_per_epoch = n // cfg.batch_size if drop_remainder else -(-n // cfg.batch_size)
        self.num_epochs = num_epochs
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self.num_epochs is None:  # "forever": as many batches as an index can count
            return sys.maxsize // 2
        return self.batches_per_epoch * self.num_epochs

    def __repr__(self) -> str:
        return (
            f"BatchPlan({self.store_repr}, {self.cfg}, host={self.process_index}/{self.process_count}, "
            f"epochs={self.num_epochs}, shuffle={self.shuffle}, drop_remainder={self.drop_remainder})"
        )

    def epoch(self, epoch: int) -> np.ndarray:
        """int64[batches_per_epoch, batch_size]: store indices of every global batch (-1 = padding)."""
        if epoch not in self._epochs:
            self._epochs = {epoch: self._plan_epoch(epoch)}  # consumers move forward: keep one
        return self._epochs[epoch]

    def _plan_epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, _PLAN_STREAM, epoch])
        e = self.eligible
        if self.cfg.sample_type == "path":
            utts = rng.permutation(e.utts) if self.shuffle else e.utts
        else:
            utts = e.draw(rng, self.cfg.sample_type, len(e.utts))
        b = self.cfg.batch_size
        # drop the remainder while the order is still random, so long utterances are not the ones
        # always left out
        utts = utts[: self.batches_per_epoch * b]
        # group rows of one bucket together (stable sort keeps the random order inside a bucket)
        key = self.text_bucket[utts] * len(self.cfg.resp_buckets) + self.resp_bucket[utts]
        utts = utts[np.argsort(key, kind="stable")]
        if not self.drop_remainder:
            utts = np.concatenate([utts, np.full(self.batches_per_epoch * b - len(utts), -1)])
        batches = utts.reshape(self.batches_per_epoch, b)
        return rng.permutation(batches) if self.shuffle else batches

    def global_rows(self, k: int) -> np.ndarray:
        return self.epoch(k // self.batches_per_epoch)[k % self.batches_per_epoch]

    def __getitem__(self, k: int) -> np.ndarray:
        lo = self.process_index * self.local_batch
        return self.global_rows(int(k))[lo : lo + self.local_batch]


class BatchAssembler:
    """(batch number, rows) -> a dict of fixed-shape numpy arrays. Picklable, touches no JAX.

    Keys: text int32[B, Tb], text_len int32[B], lang int32[B], prompt int16[B, P, Qp], prompt_len
    int32[B], resp int16[B, Rb, Q], resp_len int32[B], utt int32[B] (store index, -1 for padding
    rows), speaker int32[B], row_valid bool[B]. Validity masks are `arange(width) < len`.
    """

    def __init__(self, store: Store, plan: BatchPlan):
        self.store, self.cfg = store, plan.cfg
        self.eligible = plan.eligible
        self.text_bucket, self.resp_bucket = plan.text_bucket, plan.resp_bucket
        self.row_offset = plan.process_index * plan.local_batch

    def __repr__(self) -> str:
        return f"BatchAssembler({self.store!r}, {self.cfg})"

    def prompt(self, utt: int, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """reference.md §6.6: other utterances of the same speaker stitched to prompt_duration ± 1 s."""
        cfg = self.cfg
        if rng.random() >= cfg.random_utterance:
            return target[: cfg.prompt_frames]  # the target itself (capped to the prompt size)
        trim = max(1, int(cfg.prompt_duration * FRAME_RATE) + int(rng.integers(-FRAME_RATE, FRAME_RATE + 1)))
        same = self.eligible.speaker_utts[self.eligible.utt_speaker[utt]]
        others = same[same != utt]
        choices = others if len(others) else same  # the target itself only when nothing else exists
        parts, total = [], 0
        for _ in range(cfg.max_prompts):
            codes, _ = self.store.read(choices[rng.integers(len(choices))])
            parts.append(codes[:trim])
            total += len(parts[-1])
            if total >= trim or rng.random() > cfg.random_utterance:
                break
        return np.concatenate(parts)[:trim]

    def __call__(self, k: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        cfg = self.cfg
        valid = rows >= 0
        live = rows[valid]
        tb = cfg.text_buckets[int(self.text_bucket[live].max())] if len(live) else cfg.text_buckets[0]
        rb = cfg.resp_buckets[int(self.resp_bucket[live].max())] if len(live) else cfg.resp_buckets[0]
        texts, langs, prompts, resps, speakers = [], [], [], [], []
        for i, utt in enumerate(rows):
            if utt < 0:  # a padding row: empty segments
                codes, text = np.zeros((0, self.store.n_levels), np.int16), np.zeros(0, np.int16)
                prompt, lang, speaker = codes[:, : cfg.prompt_levels], 0, 0
            else:
                rng = np.random.default_rng([cfg.seed, _ROW_STREAM, int(k), self.row_offset + i])
                codes, text = self.store.read(utt)
                prompt = self.prompt(int(utt), codes, rng)[:, : cfg.prompt_levels]
                lang, speaker = self.store.lang[utt], self.store.speaker[utt]
            texts.append(text), langs.append(lang), prompts.append(prompt), resps.append(codes)
            speakers.append(speaker)
        out = pad_batch(texts, langs, prompts, resps, text_cap=tb, prompt_cap=cfg.prompt_frames, resp_cap=rb)
        out.update(
            utt=np.where(valid, rows, -1).astype(np.int32), speaker=np.asarray(speakers, np.int32), row_valid=valid
        )
        return out


def batch_shapes(cfg: DataConfig, n_levels: int = 8, local_batch: int | None = None) -> set[tuple]:
    """Every (text, prompt, resp) array shape the pipeline can emit: the compile budget."""
    b = local_batch or cfg.batch_size
    return {
        ((b, t), (b, cfg.prompt_frames, cfg.prompt_levels), (b, r, n_levels))
        for t in cfg.text_buckets
        for r in cfg.resp_buckets
    }


def make_dataset(
    store: Store | str,
    cfg: DataConfig,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
):
    """The grain IterDataset of this host's batches (dicts of numpy arrays)."""
    import grain  # noqa: PLC0415 - optional heavy dependency: grain

    store = store if isinstance(store, Store) else Store(store)
    plan = BatchPlan(store, cfg, process_index, process_count, num_epochs, shuffle, drop_remainder)
    log.info(
        "data: %d eligible utterances, %d speakers, %d batches/epoch; dropped %s",
        len(plan.eligible.utts),
        len(plan.eligible.speaker_utts),
        plan.batches_per_epoch,
        plan.eligible.n_filtered,
    )
    ds = grain.MapDataset.source(plan).map_with_index(BatchAssembler(store, plan))
    if cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
            flags.FLAGS.mark_as_parsed()
        # each worker builds whole batches; which worker builds a batch changes nothing in it
        return ds.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=max(1, cfg.prefetch))
        )
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.prefetch))


def make_iterator(store: Store | str, cfg: DataConfig, **kw):
    """A checkpointable iterator: `it.get_state()` / `it.set_state(state)` restore exactly."""
    return iter(make_dataset(store, cfg, **kw))
