"""Dynamic batching: concurrent requests become the rows of one decoder call.

A single worker thread owns the model. It waits for a request, then gathers more for up to `max_wait_ms`
or until `max_batch` rows, and decodes them together. Every sampling value the decoder traces (temperatures,
top-k/p, min-p, penalties, step limits, context) is an array with one value per row, so each row keeps its
request's own settings; what the decoder compiles in (the sampler mode, beam width, penalty sign handling,
RAS window) must agree within a batch: a request that differs waits for the next batch. The batch is padded
to a power of two with rows whose step limit is 1, so the compiled programs are one per batch bucket.

Rows are vocoded on a second thread while the worker decodes the next batch, at most one batch ahead: the
worker hands batch k+1 to the vocoder only once batch k is vocoded, so it gathers batch k+2 after batch k's
clients have their audio and could send again. Without that bound a vocoder slower than the decoder lets
the worker run ahead in small batches, whose fixed cost then competes with the vocoding for the CPU.

Each row is prepared (phonemised) inside the batch: a row that fails fails alone, with its error, and its
batch-mates are decoded. If the decoder itself fails, the rows are retried one by one so that only the bad
one fails. After the AR and NAR, a batch's rows are vocoded together (TTS.decode_rows: EnCodec's LSTM once over the
padded batch) and answered shortest first, each as soon as its audio is made: a short row waits for the
batch's AR loop, not for its longer mates' audio. A batch's rows are vocoded `vocoder_threads` (default 2) at
once, each on its own torch thread (EnCodec, 16 rows of 2 s on 2 cores: 0.83 s against 1.45 s).

Not continuous batching: the AR is one compiled `while_loop` that returns to the host only when every row
has stopped, and its KV cache is laid out for the batch's text and prompt buckets; refilling a finished row
would need the loop to exit every chunk and a prefill into one row of a live cache (docs/serving.md).

A request's `seed` makes it reproducible only when it is decoded alone: a batch draws from one key.

A best-of-N request (`best_of` > 1) is decoded alone, outside the dynamic batch, on this same worker (which
owns the model): its N candidates are already a batch of N rows (valle_jax.best_of.pick_best), scored by the
engine's judge, and the best kept. It does not wait for batch-mates, and no batch waits behind it longer than
its own decode and scoring.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from valle_jax import best_of as B
from valle_jax.decoding import Knobs, Settings, make_inputs
from valle_jax.tts import TTS, Prompt

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (HTTP 429)."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new requests (HTTP 503)."""


class EmptyAudio(RuntimeError):
    """The AR produced no frame for this request (the stop token came first)."""


@dataclasses.dataclass
class Job:
    text: str
    voice: Prompt
    language: str
    settings: Settings
    best_of: int = 1  # > 1: decoded alone, the best of that many candidates
    future: Future = dataclasses.field(default_factory=Future)
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def static_key(self) -> tuple:
        """The choices compiled into the decoder: rows of one batch must share them. A best-of job's key
        is its own, so it is always a batch of one."""
        if self.best_of > 1:
            return ("best_of", id(self))
        s = self.settings
        return (s.mode, max(s.beam_width, 1), s.sign_aware_penalties, s.ras_window)


@dataclasses.dataclass(frozen=True)
class Result:
    wav: np.ndarray  # float32, 24 kHz
    frames: int
    stopped: bool  # False: the AR ran to max_ar_steps
    batch_size: int  # requests gathered into its batch (failed rows counted, padding rows not)
    queued_s: float  # from submit to the start of its batch
    best_of: B.BestOf | None = None  # a best-of request's candidates and their scores


@dataclasses.dataclass
class Observer:
    """Callbacks the server's metrics hang on (no-ops by default)."""

    batch: callable = lambda size: None  # noqa: E731
    queue_depth: callable = lambda depth: None  # noqa: E731
    best_of: callable = lambda n: None  # noqa: E731


# rows of a batch vocoded at once (2 cores, tiny model, 16 clients: 1.3x the requests/s of 1; docs/serving.md)
VOCODER_THREADS = 2


def batch_bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Engine:
    def __init__(
        self,
        tts: TTS,
        max_batch: int = 8,
        max_wait_ms: float = 20.0,
        max_queue: int = 64,
        observer: Observer | None = None,
        judge: B.Judge | None = None,
        vocoder_threads: int = VOCODER_THREADS,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or vocoder_threads < 1:
            raise ValueError("max_batch, max_queue and vocoder_threads must be >= 1 and max_wait_ms >= 0")
        self.tts, self.max_batch, self.max_wait, self.max_queue = tts, max_batch, max_wait_ms / 1000, max_queue
        self.judge = judge or B.Judge()  # what ranks best-of candidates (default: mean AR log-probability)
        self.observer = observer or Observer()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="valle-batcher", daemon=True)
        # vocoding (torch) runs beside the next batch's decoding (XLA): one thread keeps answers in order
        self._vocoding = ThreadPoolExecutor(1, thread_name_prefix="valle-vocoder")
        self._vocoder_free = threading.Semaphore(1)  # one batch vocoding, the next one decoding (module doc)
        # a batch's rows vocoded several at once, each on its own torch thread (module doc)
        self._rows = ThreadPoolExecutor(vocoder_threads, thread_name_prefix="valle-rows")

    # ---- the server's side ------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, text: str, voice: Prompt, language: str, settings: Settings, best_of: int = 1) -> Future:
        """`best_of` > 1: the request is decoded alone, as that many candidates, and the best one answered
        (check it first with best_of.check_best_of)."""
        job = Job(text, voice, language, settings, best_of)
        with self._cond:
            if self._draining:
                raise Draining("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the limit); retry later")
            self._queue.append(job)
            self.observer.queue_depth(len(self._queue))
            self._cond.notify()
        return job.future

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def depth(self) -> int:
        return len(self._queue)

    def stop(self, timeout: float | None = None) -> None:
        """Takes no new requests, decodes the waiting ones, then ends the worker."""
        with self._cond:
            self._draining = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def warm_up(
        self, batch_sizes=None, text_tokens: int = 30, prompt_seconds: float = 3.0, settings: Settings | None = None
    ) -> float:
        """Compiles the default buckets (one program per batch bucket) with a synthetic request; seconds."""
        t0 = time.perf_counter()
        settings = settings or Settings()
        voice = Prompt(np.zeros((int(75 * prompt_seconds), self.tts.cfg.n_prom_levels), np.int16))
        sizes = batch_sizes or sorted({batch_bucket(n) for n in range(1, self.max_batch + 1)})
        ids = [1] + [3] * (text_tokens - 2) + [2]
        for b in sizes:
            inputs = make_inputs([ids] * b, [voice.codes] * b, [0] * b, self.tts.cfg.n_prom_levels)
            out = self.tts.decoder.generate(inputs, settings)
        list(self._decode_rows(out.codes[:2]))  # the vocoder's first call (its one-time set-up)
        return time.perf_counter() - t0

    # ---- the worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._draining:
                    self._cond.wait()
                if not self._queue:  # draining and nothing left
                    self._vocoding.shutdown(wait=True)
                    self._rows.shutdown(wait=True)
                    return
                deadline = self._queue[0].queued_at + self.max_wait
                alone = self._queue[0].best_of > 1  # its own batch: nothing to wait for
                while len(self._queue) < self.max_batch and not self._draining and not alone:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take()
                self.observer.queue_depth(len(self._queue))
            try:
                self._run(batch)
            except Exception as e:  # never lose the worker: the batch's requests get the error
                log.exception("batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _take(self) -> list[Job]:
        """The oldest request and the waiting ones that share its compiled choices (up to max_batch)."""
        key = self._queue[0].static_key
        batch, rest = [], collections.deque()
        while self._queue:
            job = self._queue.popleft()
            (batch if job.static_key == key and len(batch) < self.max_batch else rest).append(job)
        self._queue.extend(rest)
        return batch

    def _run(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        if jobs[0].best_of > 1:  # alone (its static key is its own)
            self._run_best_of(jobs[0], started)
            return
        ready = []
        for job in jobs:  # each row's own failures: unknown symbols, unsupported language
            try:
                ready.append((job, self.tts.text_ids(job.text, job.language), self.tts.language_id(job.language)))
            except Exception as e:
                job.future.set_exception(e)
        self.observer.batch(len(jobs))  # requests gathered, the failed ones included
        if not ready:
            return
        try:
            outputs = self._decode(ready)
        except Exception:
            if len(ready) == 1:
                raise
            log.warning("a batch of %d failed; decoding its rows one by one", len(ready))
            for row in ready:
                try:
                    self._vocode([row], self._decode([row]), len(jobs), started)
                except Exception as e:
                    row[0].future.set_exception(e)
            return
        self._vocode(ready, outputs, len(jobs), started)

    def _vocode(self, rows: list[tuple], outputs: list, batch_size: int, started: float) -> None:
        """Hands decoded rows to the vocoder thread once it has finished the batch before."""
        self._vocoder_free.acquire()
        try:
            self._vocoding.submit(self._answer, rows, outputs, batch_size, started)
        except BaseException:
            self._vocoder_free.release()
            raise

    def _run_best_of(self, job: Job, started: float) -> None:
        """N candidates as one batch, scored and the best answered; vocoding and scoring stay on this thread
        (the candidates must be heard to be ranked)."""
        self.observer.batch(1)
        self.observer.best_of(job.best_of)
        try:
            ids, lang = self.tts.text_ids(job.text, job.language), self.tts.language_id(job.language)
            pick = B.pick_best(self.tts, ids, lang, job.voice.codes, job.best_of, job.settings, self.judge, job.text)
            if len(pick.codes) == 0:
                raise EmptyAudio(f"none of the {job.best_of} candidates has frames (the stop token came first)")
            stopped = pick.stopped[pick.chosen]
            job.future.set_result(Result(pick.wav, len(pick.codes), stopped, 1, started - job.queued_at, pick))
        except Exception as e:
            job.future.set_exception(e)

    def _decode(self, rows: list[tuple]) -> list[tuple[np.ndarray, bool]]:
        """(codes [frames, levels], stopped) per row: one AR and one NAR call for the whole batch."""
        tts, cfg = self.tts, self.tts.cfg
        n = len(rows)
        b = batch_bucket(n)
        padded = rows + [rows[0]] * (b - n)
        texts = [ids for _, ids, _ in padded]
        inputs = make_inputs(
            texts, [job.voice.codes for job, _, _ in padded], [lang for _, _, lang in padded], cfg.n_prom_levels
        )
        text_len = np.asarray([len(t) for t in texts])
        ar_knobs = _stack(
            [Knobs.of(job.settings, 1, text_len=text_len[i : i + 1]) for i, (job, _, _) in enumerate(padded)]
        )
        ar_knobs = ar_knobs._replace(
            max_steps=np.where(np.arange(b) < n, ar_knobs.max_steps, 1).astype(np.int32),
            min_steps=np.where(np.arange(b) < n, ar_knobs.min_steps, 0).astype(np.int32),
        )
        first = rows[0][0].settings
        ar = tts.decoder.ar(inputs, first, knobs=ar_knobs)
        length, stopped = np.asarray(ar.length), np.asarray(ar.stopped)
        levels = [job.settings.nar_levels(cfg.n_resp_levels) for job, _, _ in rows]
        if int(length[:n].max()) == 0:
            codes = np.zeros((b, 0, cfg.n_resp_levels), np.int32)
        else:
            nar_settings = dataclasses.replace(first, max_nar_levels=max(max(levels), 1))
            nar_knobs = _stack([Knobs.of(job.settings, 1, ar=False) for job, _, _ in padded])
            codes = np.asarray(tts.decoder.nar(inputs, ar, nar_settings, knobs=nar_knobs))
        return [(codes[i, : length[i], : 1 + levels[i]], bool(stopped[i])) for i in range(n)]

    def _decode_rows(self, codes: list[np.ndarray]):
        return self.tts.decode_rows(codes, self._rows.map)

    def _answer(self, rows: list[tuple], outputs: list, batch_size: int, started: float) -> None:
        try:
            order = sorted(range(len(rows)), key=lambda i: len(outputs[i][0]))  # short rows are answered first
            for i in order:
                if len(outputs[i][0]) == 0:
                    rows[i][0].future.set_exception(
                        EmptyAudio("the AR produced no frames (the stop token came first): no audio")
                    )
            order = [i for i in order if len(outputs[i][0])]
            try:
                wavs = self._decode_rows([outputs[i][0] for i in order])
                for i, wav in zip(order, wavs):
                    job, (codes, stopped) = rows[i][0], outputs[i]
                    job.future.set_result(Result(wav, len(codes), stopped, batch_size, started - job.queued_at))
            except Exception as e:  # the vocoder failed: the rows still waiting get its error
                for i in order:
                    if not rows[i][0].future.done():
                        rows[i][0].future.set_exception(e)
        finally:
            self._vocoder_free.release()


def _stack(knobs: list[Knobs]) -> Knobs:
    return Knobs(*(np.concatenate(parts) for parts in zip(*knobs)))
