"""The FastAPI application: endpoints, limits and their HTTP answers, Prometheus metrics.

    POST /v1/tts      text, voice (an id, or an uploaded wav or voice file), language, format, settings, best_of
                      -> audio
    POST /v1/voices   an uploaded wav or voice file (.npz of python -m valle_jax.voice make) -> {"id", "seconds"}
    GET  /v1/voices   the voices this replica knows
    GET  /healthz     {"status": "ok" | "draining", "queue": N}
    GET  /metrics     Prometheus text: requests by endpoint and status, latency and batch-size histograms, queue depth

/v1/tts takes JSON (`{"text", "voice", "language", "format", "settings": {...}}`) or a multipart form with the
same fields (`settings` as a JSON string) and the reference in the file field `audio`. `best_of` N > 1
decodes N candidates alone (outside the dynamic batch) and answers the best; every candidate's scores come
in the header `X-Best-Of-Scores` (JSON, valle_jax.best_of.BestOf.as_dict). Errors are JSON
`{"error": message}`: 404 unknown voice id, 406 no acceptable audio type, 413 text, upload or reference audio
over the limits, 422 unusable input (empty text, unknown symbols, bad audio, bad settings), 429 queue full,
503 shutting down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import time
from contextlib import asynccontextmanager

import soundfile as sf
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from valle_jax import best_of as B
from valle_jax.audio import SAMPLE_RATE, AudioError
from valle_jax.data.text import TextError
from valle_jax.decoding import DecodeError, Settings
from valle_jax.serve.engine import Draining, EmptyAudio, Engine, Observer, QueueFull
from valle_jax.serve.voices import TooLong, UnknownVoice, VoiceStore
from valle_jax.tts import settings_of

FORMATS = {
    "wav": ("audio/wav", "WAV", "PCM_16"),
    "flac": ("audio/flac", "FLAC", "PCM_16"),
    "ogg": ("audio/ogg", "OGG", "VORBIS"),
}
MIME = {mime: name for name, (mime, _, _) in FORMATS.items()} | {"audio/x-wav": "wav", "audio/wave": "wav"}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_text_chars: int = 1000
    max_audio_seconds: float = 30.0  # reference audio in, and the longest audio a request may ask for
    max_upload_bytes: int = 10 * 2**20
    max_best_of: int = B.MAX_BEST_OF  # candidates one request may ask for (they are one batch: memory)


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# exception -> status; anything else is a 500
STATUS = [
    (UnknownVoice, 404),
    (TooLong, 413),
    (QueueFull, 429),
    (Draining, 503),
    ((TextError, AudioError, DecodeError, EmptyAudio, ValueError, TypeError), 422),
]


def status_of(e: Exception) -> int:
    return e.status if isinstance(e, HttpError) else next((s for t, s in STATUS if isinstance(e, t)), 500)


def message_of(e: Exception) -> str:
    if isinstance(e, UnknownVoice):
        return f"unknown voice id {e.args[0]!r}: upload the voice again (POST /v1/voices)"
    return str(e) if isinstance(e, HttpError) or status_of(e) != 500 else f"internal error ({type(e).__name__})"


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "valle_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "valle_tts_latency_seconds",
            "POST /v1/tts wall time",
            registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.batch = Histogram(
            "valle_batch_size", "requests decoded together", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.queue = Gauge("valle_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.best_of = Histogram(
            "valle_best_of_candidates",
            "candidates decoded per best-of request (best_of > 1)",
            registry=self.registry,
            buckets=(2, 4, 8, 16, 32, 64),
        )

    def observer(self) -> Observer:
        return Observer(batch=self.batch.observe, queue_depth=self.queue.set, best_of=self.best_of.observe)


def encode_audio(wav, fmt: str) -> bytes:
    _, container, subtype = FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, wav, SAMPLE_RATE, format=container, subtype=subtype)
    return buf.getvalue()


def pick_format(field: str | None, accept: str | None) -> str:
    if field:
        if field not in FORMATS:
            raise HttpError(422, f"format must be one of {sorted(FORMATS)}, got {field!r}")
        return field
    if not accept:
        return "wav"
    for part in accept.split(","):
        mime = part.split(";")[0].strip().lower()
        if mime in ("*/*", "audio/*"):
            return "wav"
        if mime in MIME:
            return MIME[mime]
    raise HttpError(406, f"none of the accepted types {accept!r} is served; ask for one of {sorted(MIME)}")


def parse_settings(raw, limits: Limits) -> Settings:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise HttpError(422, f"settings must be a JSON object ({e})") from e
    if not isinstance(raw, dict):
        raise HttpError(422, "settings must be a JSON object of sampling settings")
    settings = settings_of(**raw)  # DecodeError / TypeError on bad names and values: 422
    if settings.max_ar_steps > limits.max_audio_seconds * 75:
        raise HttpError(
            422,
            f"max_ar_steps={settings.max_ar_steps} asks for more than this server's "
            f"{limits.max_audio_seconds:g} s of audio ({int(limits.max_audio_seconds * 75)} steps)",
        )
    return settings


def parse_best_of(raw, settings: Settings, limits: Limits) -> int:
    """The request's `best_of` (absent: 1), checked against the settings (best_of.check_best_of) and the
    server's limit: HTTP 422 when unusable."""
    if raw is None:
        return 1
    if isinstance(raw, str):  # a form field
        try:
            raw = int(raw.strip())
        except ValueError as e:
            raise HttpError(422, f"best_of must be an integer, got {raw!r}") from e
    B.check_best_of(raw, settings, B.NO_ASR)  # DecodeError: 422 (the server's own judge is checked at start)
    if raw > limits.max_best_of:
        raise HttpError(422, f"best_of={raw} is over this server's limit of {limits.max_best_of} candidates")
    return int(raw)


def scores_header(pick: B.BestOf) -> str:
    """Every candidate's scores as compact JSON (a non-finite score as null: JSON has no NaN)."""
    clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # noqa: E731
    d = pick.as_dict()
    d["candidates"] = [{k: clean(v) for k, v in c.items()} for c in d["candidates"]]
    return json.dumps(d, separators=(",", ":"))


def create_app(engine: Engine, voices: VoiceStore, limits: Limits, metrics: Metrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)  # after uvicorn has answered the open requests: drains the rest

    app = FastAPI(title="valle_jax", lifespan=lifespan)
    app.state.engine, app.state.voices, app.state.metrics = engine, voices, metrics

    def answer_error(endpoint: str, e: Exception) -> JSONResponse:
        status = status_of(e)
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": message_of(e)}, status_code=status)

    async def body_of(request: Request) -> tuple[dict, bytes | None]:
        """(fields, uploaded file or None) of a JSON or multipart request; 413 past the upload limit."""
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_upload_bytes:
            raise HttpError(413, f"the request is {int(size)} bytes; at most {limits.max_upload_bytes} are accepted")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                fields = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HttpError(422, f"the body is not JSON ({e})") from e
            if not isinstance(fields, dict):
                raise HttpError(422, "the JSON body must be an object")
            return fields, None
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_part_size=limits.max_upload_bytes)
            upload = form.get("audio")
            data = await upload.read() if upload is not None and not isinstance(upload, str) else None
            if data is not None and len(data) > limits.max_upload_bytes:
                raise HttpError(413, f"the upload is {len(data)} bytes; at most {limits.max_upload_bytes}")
            return {k: v for k, v in form.items() if isinstance(v, str)}, data
        raise HttpError(422, "send application/json or multipart/form-data")

    @app.get("/healthz")
    async def healthz():
        metrics.requests.labels("healthz", "200").inc()
        return {"status": "draining" if engine.draining else "ok", "queue": engine.depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/voices")
    async def list_voices():
        metrics.requests.labels("voices", "200").inc()
        return {"voices": await run_in_threadpool(voices.list)}

    @app.post("/v1/voices")
    async def add_voice(request: Request):
        try:
            fields, data = await body_of(request)
            if data is None:
                raise HttpError(422, "upload the voice as the multipart file field 'audio' (a wav or .npz voice file)")
            length = float(fields.get("input_prompt_length", 3.0))
            vid, voice = await run_in_threadpool(voices.add, data, length)
        except Exception as e:
            return answer_error("voices", e)
        metrics.requests.labels("voices", "200").inc()
        return {"id": vid, "seconds": round(voice.seconds, 3)}

    @app.post("/v1/tts")
    async def tts(request: Request):
        t0 = time.perf_counter()
        try:
            fields, data = await body_of(request)
            fmt = pick_format(fields.get("format"), request.headers.get("accept"))
            text = fields.get("text")
            if not isinstance(text, str) or not text.strip():
                raise HttpError(422, "text is empty: nothing to synthesise")
            if len(text) > limits.max_text_chars:
                raise HttpError(413, f"the text is {len(text)} characters; at most {limits.max_text_chars}")
            language = str(fields.get("language", "en"))
            settings = parse_settings(fields.get("settings", {}), limits)
            best_of = parse_best_of(fields.get("best_of"), settings, limits)
            length = float(fields.get("input_prompt_length", 3.0))
            if data is not None:
                _, voice = await run_in_threadpool(voices.add, data, length)
            elif fields.get("voice"):
                voice = voices.get(str(fields["voice"]))
            else:
                raise HttpError(422, "no voice: give a voice id ('voice') or upload reference audio ('audio')")
            job = engine.submit(" ".join(text.split()), voice, language, settings, best_of)
            result = await asyncio.wrap_future(job)
            audio = await run_in_threadpool(encode_audio, result.wav, fmt)
        except Exception as e:
            return answer_error("tts", e)
        metrics.requests.labels("tts", "200").inc()
        metrics.latency.observe(time.perf_counter() - t0)
        headers = {
            "X-Batch-Size": str(result.batch_size),
            "X-Frames": str(result.frames),
            "X-Stopped": str(result.stopped).lower(),
            "X-Queued-Seconds": f"{result.queued_s:.3f}",
            "X-Settings": json.dumps(dataclasses.asdict(settings), separators=(",", ":")),
        }
        if result.best_of is not None:
            headers["X-Best-Of-Scores"] = scores_header(result.best_of)
        return Response(audio, media_type=FORMATS[fmt][0], headers=headers)

    return app
