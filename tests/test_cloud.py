"""Workdirs on object stores (docs/cloud.md) without a network: a gs:// bucket served by an fsspec
filesystem over a local directory, reached through etils.epath's own fsspec backend exactly as a real
bucket is (with gcsfs), that refuses appends and renames as an object store does. The training run
on an object store is in tests/test_training.py (test_object_store_workdir_resumes_like_a_local_run)."""

import importlib
import io
import json
import logging

import jax
import numpy as np
import pytest
import soundfile
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from configs import tiny
from valle_jax import appending, atomic
from valle_jax.audio import write_wav
from valle_jax.checkpointing import params_of, read_config, read_params, save_model
from valle_jax.config import model_config
from valle_jax.models.valle import abstract_model
from valle_jax.train import _ObjectStoreLog, log_file
from valle_jax.training import lock as lock_module
from valle_jax.training.lock import WorkdirBusy, WorkdirLock
from valle_jax.training.monitor import MetricsWriter


class _Bucket(LocalFileSystem):
    """gs://BUCKET/... kept under `root`; no append, no rename (what GCS lacks)."""

    protocol = ("gs", "gcs")
    root = "/nonexistent"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for scheme in ("gs://", "gcs://"):
            if path.startswith(scheme):
                return f"{cls.root}/{path[len(scheme) :]}".rstrip("/")
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):  # names as GCS gives them: BUCKET/PATH, without our local root
        return [p.removeprefix(self.root + "/") for p in super().glob(path, **kwargs)]

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise AssertionError(f"append to {path}: an object store cannot append")
        return super()._open(path, mode, **kwargs)

    def mv(self, *args, **kwargs):
        raise AssertionError(f"rename {args}: not atomic on an object store")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local directory that gs://bucket/ is."""
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setattr(_Bucket, "root", str(tmp_path / "gcs"))
    monkeypatch.setitem(registry, "gcs", _Bucket)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.0)
    yield tmp_path / "gcs" / "bucket"
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_path_goes_through_epath_fsspec(bucket):
    p = atomic.as_path("gs://bucket/run")
    assert str(p) == "gs://bucket/run" and p._backend is epath_backend.fsspec_backend
    assert atomic.object_store(p) and not atomic.object_store(bucket)
    atomic.write_text(p / "run.json", '{"a": 1}')  # directly under its name: no temp object, no rename
    write_wav(p / "samples" / "0_hyp.wav", np.full(480, 0.5, np.float32))  # soundfile writes a local temp
    assert sorted(x.name for x in bucket.joinpath("run").iterdir()) == ["run.json", "samples"]
    assert json.loads((p / "run.json").read_text()) == {"a": 1}
    wav, rate = soundfile.read(io.BytesIO((p / "samples" / "0_hyp.wav").read_bytes()))
    assert rate == 24000 and len(wav) == 480 and abs(wav[0] - 0.5) < 1e-4


def test_appended_file_is_parts_read_back_in_order(bucket):
    path = epath.Path("gs://bucket/run/metrics.jsonl")
    lines = [json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(12)]
    first = appending.AppendFile(path, flush_secs=3600, part_bytes=100)
    first.write(lines[0])
    first.flush()  # not due (and the part not full): nothing uploaded yet
    assert not appending.exists(path)
    for line in lines[1:5]:
        first.write(line)
        first.flush()  # the part fills up: uploaded
    assert appending.exists(path)
    first.close()
    again = appending.AppendFile(path, flush_secs=0.0, part_bytes=100)  # a resumed run: new parts
    for line in lines[5:]:
        again.write(line)
        again.flush()
    again.close()
    assert appending.read_text(path) == "".join(lines)
    names = sorted(p.name for p in bucket.joinpath("run").iterdir())
    assert "metrics.jsonl" not in names and len(names) >= 3 and names[0] == "metrics.jsonl.part-00000"
    # a local file keeps the local layout: one file, appended
    local = bucket.parent.parent / "local.jsonl"
    for chunk in (lines[:5], lines[5:]):
        f = appending.AppendFile(local)
        f.write("".join(chunk))
        f.close()
    assert local.read_text() == appending.read_text(local) == "".join(lines)


def test_lock_metrics_tensorboard_and_log_on_gs(bucket):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = atomic.as_path("gs://bucket/run")
    lock = WorkdirLock(run).acquire()
    assert json.loads((run / "lock").read_text())["token"] == lock.me["token"]
    with pytest.raises(WorkdirBusy, match="in use by PID"):
        WorkdirLock(run).acquire()
    writer = MetricsWriter(run)
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": 4.0 - step})
    writer.write_audio(3, "eval_audio/0_hyp", np.zeros(2400, np.float32), 24000, "h@loU")
    writer.sync()
    handler = log_file(run)
    assert isinstance(handler, _ObjectStoreLog)
    logger = logging.getLogger("test_cloud")
    logger.addHandler(handler)
    try:
        logger.warning("resumed from step 2")
    finally:
        logger.removeHandler(handler)
        handler.close()
    writer.close()
    lock.release()
    assert not (run / "lock").exists()
    rows = [json.loads(x) for x in appending.read_text(run / "metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/loss"] == 1.0
    assert appending.read_text(run / "log.txt") == "resumed from step 2\n"
    events = EventAccumulator(str(bucket / "run" / "tb"), size_guidance={"scalars": 0, "audio": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [3.0, 2.0, 1.0]
    assert "eval_audio/0_hyp" in events.Tags()["audio"]
    assert all(".part-" in p.name for p in (bucket / "run" / "tb").iterdir())


def test_model_directory_on_gs_is_replaced_marker_last(bucket):
    cfg = model_config(tiny.get_config())
    rng = np.random.default_rng(0)
    shapes = params_of(abstract_model(cfg))
    made = [jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes) for _ in range(2)]
    out = "gs://bucket/run/export"
    for params in made:  # the second replaces the first
        save_model(out, cfg, params, {"a": 1}, {"step": 3}, overwrite=True, fmt="safetensors")
    assert sorted(p.name for p in (bucket / "run" / "export").iterdir()) == [
        "config.json",
        "model.safetensors",
        "symmap.json",
    ]
    got_cfg, symmap, stats = read_config(out)
    assert got_cfg == cfg and symmap == {"a": 1} and stats["step"] == 3
    back = read_params(out, cfg)
    np.testing.assert_array_equal(back["sep"], made[1]["sep"])
    with pytest.raises(FileExistsError):
        save_model(out, cfg, made[0], {"a": 1}, fmt="safetensors")
