"""The HTTP server (valle_jax.serve) with a tiny random model: every endpoint, every error status, a failing
row inside a good batch whose rows keep their own settings, the metrics counters, and SIGTERM draining."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import save_tiny_model
from starlette.testclient import TestClient

from valle_jax.audio import HOP_LENGTH, SAMPLE_RATE
from valle_jax.data.text import reference_symmap
from valle_jax.decoding import Settings
from valle_jax.serve.app import Limits, Metrics, create_app
from valle_jax.serve.engine import Engine
from valle_jax.serve.voices import VoiceStore

pytestmark = pytest.mark.needs_espeak
GREEDY = {"ar_temp": 0.0, "nar_temp": 0.0, "max_ar_steps": 12}  # the random model never stops: 12 frames
LIMITS = Limits(max_text_chars=200, max_audio_seconds=5.0, max_upload_bytes=400_000)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    symmap = {k: v for k, v in reference_symmap().items() if k != "ð"}  # "the" has an unknown symbol
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", symmap=symmap)


@pytest.fixture(scope="module")
def tts(model_dir, codec_dir):
    from valle_jax import TTS

    return TTS.load(model_dir, codec_dir=codec_dir)


@pytest.fixture(scope="module")
def wav_bytes(corpus):
    return sorted(corpus.rglob("*.wav"))[0].read_bytes()


def make_app(tts, **engine):
    metrics = Metrics()
    engine = Engine(tts, observer=metrics.observer(), **engine)
    return create_app(engine, VoiceStore(tts, max_audio_seconds=LIMITS.max_audio_seconds), LIMITS, metrics)


def tts_json(client, **fields):
    return client.post("/v1/tts", json={"settings": GREEDY, **fields})


def voice_file_bytes(path, codes) -> bytes:
    from valle_jax import voice

    return voice.save(path, codes, ["ref.wav"], trimmed=True).read_bytes()


def test_endpoints_error_statuses_and_metrics(tts, wav_bytes, tmp_path):
    with TestClient(make_app(tts, max_batch=4, max_wait_ms=400)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "queue": 0}
        up = client.post("/v1/voices", files={"audio": ("v.wav", wav_bytes, "audio/wav")})
        assert up.status_code == 200 and up.json()["seconds"] == 3.0
        vid = up.json()["id"]
        assert client.post("/v1/voices", files={"audio": ("again.wav", wav_bytes)}).json()["id"] == vid  # content hash
        assert [v["id"] for v in client.get("/v1/voices").json()["voices"]] == [vid]

        ok = tts_json(client, text="Hello there.", voice=vid)
        assert ok.status_code == 200 and ok.headers["content-type"] == "audio/wav"
        wav, sr = sf.read(io.BytesIO(ok.content))
        assert sr == SAMPLE_RATE and wav.shape == (12 * HOP_LENGTH,) and ok.headers["x-frames"] == "12"
        assert json.loads(ok.headers["x-settings"])["max_ar_steps"] == 12
        flac = client.post(
            "/v1/tts", json={"text": "Hello.", "voice": vid, "settings": GREEDY}, headers={"Accept": "audio/flac"}
        )
        assert flac.headers["content-type"] == "audio/flac" and sf.read(io.BytesIO(flac.content))[0].shape == wav.shape
        form = {"text": "Hello.", "format": "ogg", "settings": json.dumps(GREEDY)}
        ogg = client.post("/v1/tts", data=form, files={"audio": ("v.wav", wav_bytes)})  # an upload in the request
        assert ogg.status_code == 200 and ogg.headers["content-type"] == "audio/ogg"
        npz = voice_file_bytes(tmp_path / "v.npz", np.random.default_rng(0).integers(0, 1024, (100, 8)))
        by_file = client.post("/v1/tts", data=form | {"format": "wav"}, files={"audio": ("v.npz", npz)})
        assert by_file.status_code == 200  # a voice file of python -m valle_jax.voice
        not_ours = io.BytesIO()
        np.savez(not_ours, codes=np.zeros((100, 8), np.int16))  # a zip, but no voice file's record

        long_wav = io.BytesIO()
        sf.write(long_wav, np.tile(sf.read(io.BytesIO(wav_bytes))[0], 3)[: 6 * 22050], 22050, format="WAV")
        errors = {
            404: tts_json(client, text="Hello.", voice="0123abcd"),
            406: client.post("/v1/tts", json={"text": "Hi.", "voice": vid}, headers={"Accept": "text/html"}),
            413: [
                tts_json(client, text="a" * 201, voice=vid),
                client.post("/v1/voices", files={"audio": ("big.wav", b"x" * 500_000)}),
                client.post("/v1/voices", files={"audio": ("long.wav", long_wav.getvalue())}),
            ],
            422: [
                tts_json(client, text="  ", voice=vid),
                tts_json(client, text="Hello.", voice=vid, settings={"top_p": 2.0}),
                tts_json(client, text="Hello.", voice=vid, settings={"temprature": 1.0}),
                tts_json(client, text="Hello.", voice=vid, settings={"max_ar_steps": 450}),  # over 5 s
                tts_json(client, text="Hello.", voice=vid, language="xx"),
                tts_json(client, text="Hello."),
                tts_json(client, text="Hello.", voice=vid, format="mp3"),
                client.post("/v1/voices", files={"audio": ("bad.wav", b"RIFF not audio")}),
                client.post("/v1/voices", files={"audio": ("bad.npz", not_ours.getvalue())}),
                client.post("/v1/tts", content=b"{", headers={"content-type": "application/json"}),
            ],
        }
        for status, responses in errors.items():
            for r in responses if isinstance(responses, list) else [responses]:
                assert r.status_code == status, (status, r.text)
                assert r.json()["error"] and "Traceback" not in r.text
        assert "unknown voice id" in errors[404].json()["error"]
        assert "top_p" in errors[422][1].json()["error"] and "temprature" in errors[422][2].json()["error"]

        # a failing row inside a good batch: three requests gathered together, one with an unknown symbol;
        # the good ones keep their own settings (12 and 8 frames) and get their audio
        asks = [("Hello there.", 12), ("the", 12), ("Hello.", 8)]
        answers = [None] * 3

        def ask(i):
            text, steps = asks[i]
            answers[i] = tts_json(client, text=text, voice=vid, settings=GREEDY | {"max_ar_steps": steps})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [200, 422, 200]
        assert "ð" in answers[1].json()["error"]
        assert [answers[i].headers["x-batch-size"] for i in (0, 2)] == ["3", "3"]
        assert [len(sf.read(io.BytesIO(answers[i].content))[0]) for i in (0, 2)] == [12 * HOP_LENGTH, 8 * HOP_LENGTH]

        metrics = client.get("/metrics").text
        count = lambda name: float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))  # noqa: E731
        assert count('valle_requests_total{endpoint="tts",status="200"}') == 6
        assert count('valle_requests_total{endpoint="tts",status="422"}') == 9  # 8 above + the bad row
        assert count('valle_requests_total{endpoint="voices",status="413"}') == 2
        assert count('valle_requests_total{endpoint="tts",status="404"}') == 1
        assert count("valle_batch_size_count") == 6 and count('valle_batch_size_bucket{le="2.0"}') == 5
        assert count("valle_tts_latency_seconds_count") == 6
        assert count("valle_queue_depth") == 0


def test_voice_dir_holds_voice_files_that_replicas_share(tts, tmp_path):
    """Uploads are kept as valle_jax.voice files named by their content hash: another replica on the same
    folder (a new VoiceStore) finds them, the same upload gets the same id on both, and a voice file made
    with python -m valle_jax.voice and copied there is the voice of its name. (An uploaded wav's file:
    test_sigterm_drains_the_queue_and_exits_0.)"""
    from valle_jax import voice
    from valle_jax.serve.voices import UnknownVoice

    folder = tmp_path / "voices"
    one, two = VoiceStore(tts, folder), VoiceStore(tts, folder)
    made = np.random.default_rng(1).integers(0, 1024, (300, 8))
    npz = voice_file_bytes(tmp_path / "alice.npz", made)
    vid, kept = one.add(npz)  # trimmed to the default 3 s
    assert np.array_equal(kept.codes, made[: 75 * 3]) and vid == two.add(npz)[0] != "alice"
    codes, sources = voice.load(folder / f"{vid}.npz")
    assert np.array_equal(codes, kept.codes) and sources == ("ref.wav",)
    assert np.array_equal(VoiceStore(tts, folder).get(vid).codes, kept.codes)  # read from the folder

    (folder / "alice.npz").write_bytes(npz)
    (folder / "junk.npz").write_bytes(b"PK\x03\x04 not a voice file")
    assert np.array_equal(two.get("alice").codes, made)  # used whole, as made
    assert [v["id"] for v in two.list()] == sorted(["alice", vid])  # the junk is no voice
    with pytest.raises(UnknownVoice):
        two.get("../voices/alice")


def test_queue_full_is_429_and_draining_is_503(tts, wav_bytes):
    app = make_app(tts, max_queue=1)
    client = TestClient(app)  # no lifespan: the worker never runs, so the queue stays full
    voice = app.state.voices.add(wav_bytes)[0]
    app.state.engine.submit("Hello.", app.state.voices.get(voice), "en", None)
    full = tts_json(client, text="Hello.", voice=voice)
    assert full.status_code == 429 and "retry later" in full.json()["error"]
    app.state.engine.stop()
    assert tts_json(client, text="Hello.", voice=voice).status_code == 503
    assert client.get("/healthz").json()["status"] == "draining"


def test_best_of_request_is_the_best_of_n_candidates(tts, wav_bytes):
    app = make_app(tts)
    with TestClient(app) as client:
        vid = app.state.voices.add(wav_bytes)[0]
        sampled = {"ar_temp": 1.0, "nar_temp": 0.0, "max_ar_steps": 12, "seed": 3}
        ok = tts_json(client, text="Hello.", voice=vid, settings=sampled, best_of=3)
        assert ok.status_code == 200, ok.text
        wav, sr = sf.read(io.BytesIO(ok.content))
        assert sr == SAMPLE_RATE and wav.shape == (12 * HOP_LENGTH,) and np.abs(wav).max() > 0
        scores = json.loads(ok.headers["x-best-of-scores"])
        assert len(scores["candidates"]) == 3 and scores["criteria"] == "mean AR log-probability"
        logprobs = [c["logprob"] for c in scores["candidates"]]
        assert scores["chosen"] == int(np.argmax(logprobs)) and len(set(logprobs)) == 3  # they differ
        assert "x-best-of-scores" not in tts_json(client, text="Hello.", voice=vid).headers  # best_of absent: 1
        form = {"text": "Hello.", "settings": json.dumps(sampled), "best_of": "3"}  # a multipart field is text
        three = client.post("/v1/tts", data=form, files={"audio": ("v.wav", wav_bytes)})  # same compiled N
        assert len(json.loads(three.headers["x-best-of-scores"])["candidates"]) == 3
        for bad, words in [(0, "1 to 64"), (65, "1 to 64"), ("x", "integer"), (True, "1 to 64")]:
            r = tts_json(client, text="Hello.", voice=vid, settings=sampled, best_of=bad)
            assert r.status_code == 422 and words in r.json()["error"], (bad, r.text)
        greedy = tts_json(client, text="Hello.", voice=vid, best_of=3)  # temperatures 0: N identical copies
        assert greedy.status_code == 422 and "sampling" in greedy.json()["error"]
        metrics = client.get("/metrics").text
        assert "valle_best_of_candidates_count 2.0" in metrics and "valle_best_of_candidates_sum 6.0" in metrics


def test_sigterm_drains_the_queue_and_exits_0(model_dir, codec_dir, wav_bytes, tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    cmd = [
        sys.executable,
        "-m",
        "valle_jax.serve",
        "--checkpoint",
        str(model_dir),
        "--codec-dir",
        str(codec_dir),
        "--port",
        str(port),
        "--warm-up",
        "none",
        "--max-wait-ms",
        "300",
        "--voice-dir",
        str(tmp_path / "v"),
        "--best-of-asr",
        "none",  # loads no ASR or verifier at start
    ]
    server = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.3)
        vid = httpx.post(f"{base}/v1/voices", files={"audio": ("v.wav", wav_bytes)}, timeout=60).json()["id"]
        assert (tmp_path / "v" / f"{vid}.npz").is_file()  # where other replicas find it
        answers = []
        body = {"text": "Hello there.", "voice": vid, "settings": GREEDY}
        threads = [
            threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/v1/tts", json=body, timeout=120)))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        while httpx.get(f"{base}/healthz", timeout=5).json()["queue"] < 3:  # all taken, waiting for batch-mates
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert server.wait(60) == 0
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(len(sf.read(io.BytesIO(a.content))[0]) == 12 * HOP_LENGTH for a in answers)
    finally:
        if server.poll() is None:
            server.kill()


def test_replicas_behind_a_round_robin_balancer_answer_alike(tts, wav_bytes, tmp_path):
    """The several-machines path: two replicas on one shared --voice-dir behind a balancer that alternates
    between them. A voice uploaded through one is used through the other, and a greedy request gets the
    same audio from either. A replica without the folder answers 404 for that id, and uploading the same
    audio to it gives the same id (content hash), so a client can recover from any replica."""
    folder = tmp_path / "voices"
    apps = []
    for _ in range(2):
        metrics = Metrics()
        engine = Engine(tts, observer=metrics.observer(), max_wait_ms=0, vocoder_threads=2)
        apps.append(create_app(engine, VoiceStore(tts, folder, max_audio_seconds=5.0), LIMITS, metrics))
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b, TestClient(make_app(tts)) as alone:
        turn = iter([a, b] * 4)
        vid = next(turn).post("/v1/voices", files={"audio": ("v.wav", wav_bytes)}).json()["id"]
        wavs = [tts_json(next(turn), text="Hello there.", voice=vid) for _ in range(2)]
        assert [w.status_code for w in wavs] == [200, 200]
        assert wavs[0].content == wavs[1].content
        assert {v["id"] for v in b.get("/v1/voices").json()["voices"]} == {vid}
        missing = tts_json(alone, text="Hello there.", voice=vid)
        assert missing.status_code == 404 and "upload" in missing.json()["error"]
        assert alone.post("/v1/voices", files={"audio": ("v.wav", wav_bytes)}).json()["id"] == vid
        assert tts_json(alone, text="Hello there.", voice=vid).content == wavs[0].content


class SlowVocoderTTS:
    """Just what the engine asks of a TTS, with a vocoder that holds its batch until released."""

    def __init__(self):
        self.release = threading.Event()
        self.vocoding = threading.Event()

    def text_ids(self, text, language):
        return [1, 5, 2]

    def language_id(self, language):
        return 0

    def decode_rows(self, rows, map_rows=map):
        self.vocoding.set()
        assert self.release.wait(30)
        for codes in rows:
            yield np.zeros(len(codes) * HOP_LENGTH, np.float32)


def test_the_decoder_runs_at_most_one_batch_ahead_of_the_vocoder():
    """Back-pressure: while batch 1 is being vocoded, batch 2 is decoded but not handed over, and batch 3
    stays in the queue (it is gathered only once batch 1's clients have their audio). Without the bound the
    worker would decode batch after batch in small pieces while the vocoder falls behind."""
    tts = SlowVocoderTTS()
    engine = Engine(tts, max_batch=1, max_wait_ms=0)
    decoded = []

    def decode(rows):
        decoded.append(len(rows))
        return [(np.zeros((4, 8), np.int32), True) for _ in rows]

    engine._decode = decode
    engine.start()
    try:
        first = engine.submit("a", None, "en", Settings())
        assert tts.vocoding.wait(30)  # batch 1 is at the vocoder, which holds it
        second = engine.submit("b", None, "en", Settings())
        deadline = time.time() + 30
        while len(decoded) < 2:  # batch 2 decoded, now waiting for the vocoder
            assert time.time() < deadline
            time.sleep(0.01)
        third = engine.submit("c", None, "en", Settings())
        time.sleep(0.3)
        assert len(decoded) == 2 and engine.depth == 1 and not first.done()
        tts.release.set()
        results = [f.result(30) for f in (first, second, third)]
        assert [r.wav.shape for r in results] == [(4 * HOP_LENGTH,)] * 3 and len(decoded) == 3
    finally:
        tts.release.set()
        engine.stop(30)
