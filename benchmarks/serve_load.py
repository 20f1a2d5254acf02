"""Load test of the HTTP server (valle_jax.serve): requests/s and latency under concurrent clients, against
the same requests served one at a time.

    python benchmarks/serve_load.py [--sizes tiny,quarter] [--clients 1,4,16,64] [--audio-seconds 2]
        [--max-batch 16] [--max-wait-ms 20] [--bad 0.1] [--per-client 4] [--vocoder encodec|vocos] [--arch ARCH]
        [--vocoder-threads N]

For each model size (randomly initialised, saved locally, a random codec built from espeak-ng speech; with
--vocoder vocos a random Vocos of the real one's size, dim 384 and 8 layers, decodes the audio) the script
starts two servers in fresh processes, both warmed up for the requests' step bucket:
  - sequential: --max-batch 1, one client: every request decoded alone (the baseline, and a lone request's
    latency);
  - batched: --max-batch N --max-wait-ms W, with 1, 4, 16, 64 concurrent clients.
Each client sends requests back to back until the run's list is done (max(--per-client * clients, 16)
requests; fewer per client keeps the quarter model's run short). A
request asks for --audio-seconds of audio (the random model never stops, so every row runs its full step
limit) with its own temperature and top-k. A fraction --bad of the requests is bad (empty text, an unknown
language that fails inside its batch, or an out-of-range setting): every good one must be answered 200, every
bad one 4xx, and the server must still be up afterwards. Printed: requests/s, p50/p95/p99 latency, the mean
batch size the good requests were decoded in, and the ratios to the sequential baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import portpicker

from tools import make_demo_corpus
from tools.common import find_files
from valle_jax.audio import load_audio
from valle_jax.checkpointing import params_of, save_model
from valle_jax.codec import build_random_codec
from valle_jax.config import SIZES, ModelConfig
from valle_jax.data.text import reference_symmap
from valle_jax.models import init_model
from valle_jax.vocoder import build_random_vocos

TEXTS = [  # up to 30 phoneme ids each: one text bucket (32), the one the server's warm-up compiles
    "Hello there.",
    "A short one.",
    "How are you today?",
    "Please call Stella.",
    "Good morning, Sam.",
    "It is getting late.",
]
BAD = [
    {"text": "  "},  # 422 before the queue
    {"language": "xx"},  # 422 inside its batch (its row fails alone)
    {"settings": {"top_p": 2.0}},  # 422 before the queue
]


def setup(size: str, arch: str, root: Path) -> tuple[Path, Path, Path]:
    """(model dir, codec dir, a voice wav)."""
    corpus = root / "corpus"
    make_demo_corpus.build(corpus, voices=2, sentences=3).finish()
    wavs = find_files(corpus, (".wav",))
    codec = build_random_codec([load_audio(f) for f in wavs], root / "codec")
    d, h, n = SIZES[size]
    cfg = ModelConfig(arch=arch, d_model=d, n_heads=h, n_layers=n)
    save_model(root / size, cfg, params_of(init_model(cfg, 0)), reference_symmap())
    return root / size, codec, wavs[0]


class Server:
    def __init__(
        self,
        model: Path,
        codec: Path,
        steps: int,
        max_batch: int,
        max_wait_ms: float,
        vocos: Path | None = None,
        vocoder_threads: int = 2,
    ):
        self.port = portpicker.pick_unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "valle_jax.serve",
            "--checkpoint",
            str(model),
            "--codec-dir",
            str(codec),
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--max-queue",
            "1024",
            "--warm-up-steps",
            str(steps),
            "--vocoder-threads",
            str(vocoder_threads),
        ]
        if vocos is not None:
            cmd += ["--vocoder", "vocos", "--vocoder-dir", str(vocos)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def requests_for(n: int, voice: str, steps: int, bad: float) -> list[dict]:
    out = []
    every = round(1 / bad) if bad > 0 else 0
    for i in range(n):
        body = {
            "text": TEXTS[i % len(TEXTS)],
            "voice": voice,
            "settings": {"max_ar_steps": steps, "ar_temp": 0.7 + 0.05 * (i % 7), "top_k": [0, 50, 100][i % 3]},
        }
        if every and i % every == every - 1:
            fault = BAD[(i // every) % len(BAD)]
            body = body | fault | {"settings": body["settings"] | fault.get("settings", {})}
        out.append(body)
    return out


async def run_load(url: str, bodies: list[dict], clients: int) -> dict:
    todo = list(enumerate(bodies))
    results = []

    async def client(http):
        while todo:
            i, body = todo.pop(0)
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/tts", json=body)
            bad = body["text"].strip() == "" or body.get("language") == "xx" or body["settings"].get("top_p", 1) > 1
            results.append(
                {
                    "latency": time.perf_counter() - t0,
                    "status": r.status_code,
                    "bad": bad,
                    "batch": int(r.headers.get("x-batch-size", 0)),
                }
            )

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - t0
    good = [r for r in results if not r["bad"]]
    lat = sorted(r["latency"] for r in good)
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]  # noqa: E731
    return {
        "clients": clients,
        "requests": len(results),
        "good": len(good),
        "rps": len(good) / wall,
        "p50": q(0.50),
        "p95": q(0.95),
        "p99": q(0.99),
        "mean_batch": statistics.mean(r["batch"] for r in good),
        "good_ok": all(r["status"] == 200 for r in good),
        "bad_4xx": all(400 <= r["status"] < 500 for r in results if r["bad"]),
        "bad": len(results) - len(good),
    }


def bench(size: str, args) -> list[dict]:
    steps = int(args.audio_seconds * 75)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, codec, voice_wav = setup(size, args.arch, Path(tmp))
        vocos = build_random_vocos(Path(tmp) / "vocos", dim=384, layers=8) if args.vocoder == "vocos" else None
        for name, max_batch, wait, levels in (
            ("sequential", 1, 0.0, [1]),
            ("batched", args.max_batch, args.max_wait_ms, args.clients),
        ):
            server = Server(model, codec, steps, max_batch, wait, vocos, args.vocoder_threads)
            vid = httpx.post(
                f"{server.url}/v1/voices", files={"audio": ("v.wav", voice_wav.read_bytes())}, timeout=120
            ).json()["id"]
            for clients in levels:
                n = max(args.per_client * clients, 16)
                r = asyncio.run(run_load(server.url, requests_for(n, vid, steps, args.bad), clients))
                r |= {
                    "size": size,
                    "server": name,
                    "start_s": round(server.start_s, 1),
                    "alive": httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200,
                }
                rows.append(r)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            r["exit"] = server.stop()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,quarter")
    p.add_argument("--arch", default=ModelConfig().arch)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--bad", type=float, default=0.1)
    p.add_argument("--vocoder", choices=("encodec", "vocos"), default="encodec")
    p.add_argument("--vocoder-threads", type=int, default=2, help="the servers' --vocoder-threads")
    p.add_argument("--per-client", type=int, default=4, help="requests per client (at least 16 in all)")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (a shared machine: compare ratios)")
    for size in args.sizes.split(","):
        rows = bench(size, args)
        seq = next(r for r in rows if r["server"] == "sequential")
        print(f"\n{size} ({args.vocoder}): sequential {seq['rps']:.2f} req/s, lone request p50 {seq['p50']:.2f} s")
        print(
            f"{'clients':>7} {'req/s':>7} {'x seq':>6} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'p95/lone':>8} "
            f"{'batch':>6} {'bad':>4} {'all good 200':>12} {'alive':>5}"
        )
        for r in rows:
            if r["server"] == "batched":
                print(
                    f"{r['clients']:>7} {r['rps']:>7.2f} {r['rps'] / seq['rps']:>6.2f} {r['p50']:>7.2f} "
                    f"{r['p95']:>7.2f} {r['p99']:>7.2f} {r['p95'] / seq['p50']:>8.2f} {r['mean_batch']:>6.1f} "
                    f"{r['bad']:>4} {str(r['good_ok'] and r['bad_4xx']):>12} {str(r['alive']):>5}"
                )
        print(f"exit status after SIGTERM: {[r.get('exit') for r in rows if 'exit' in r]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
