"""`python -m valle_jax.train` end to end, as subprocesses on 8 fake CPU devices: outputs, resume
after SIGKILL == uninterrupted, SIGTERM saves, restore onto another mesh, console commands, two
processes == one, torn checkpoints ignored, SIGKILLs at random moments and a damaged checkpoint,
a full disk, export and plot of a real run, overfitting."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from tests.test_training import TEST_OVERRIDES, _corrupt
from tools import pack
from valle_jax.checkpointing import load_model, params_of
from valle_jax.export import main as export_main
from valle_jax.models.convert import from_reference, infer_config
from valle_jax.plot import main as plot_main
from valle_jax.training.checkpoint import Checkpoints

pytestmark = pytest.mark.needs_espeak
ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def overrides(store, **more) -> list[str]:
    items = {
        **TEST_OVERRIDES,
        "data.store": str(store),
        "train.steps": STEPS,
        "train.log_every": 1,
        "train.save_every": 2,
        "train.keep": 10,
        **more,
    }
    return [f"--config.{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.setdefault("JAX_PLATFORMS", "cpu")
    # these runs take many steps: full XLA optimisation (conftest's cheaper passes suit one-off programs)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def train_cmd(workdir, store, *extra, **more):
    return [
        sys.executable,
        "-m",
        "valle_jax.train",
        "--config",
        "configs/tiny.py",
        f"--workdir={workdir}",
        "--commands=off",
        *overrides(store, **more),
        *extra,
    ]


def run_train(workdir, store, env, *extra, timeout=400, **more):
    p = subprocess.run(
        train_cmd(workdir, store, *extra, **more), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the latest line for a step wins, as after a resume)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def final_params(workdir, step):
    c = Checkpoints(Path(workdir) / "checkpoints", async_save=False)
    try:
        params, _, _ = c.restore_params(step)
    finally:
        c.close()

    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def start(cmd, env, log_path, **kw):
    """A background run whose stderr goes to a file (a pipe nobody reads would fill and block it)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), text=True, **kw
    )
    proc.log_path = log_path
    return proc


def finish(proc, timeout=300) -> str:
    proc.wait(timeout=timeout)
    return Path(proc.log_path).read_text()


def wait_for(predicate, proc, timeout=300, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (rc {proc.returncode}) before {what}: {Path(proc.log_path).read_text()[-3000:]}"
            )
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def finished_checkpoints(workdir):
    d = Path(workdir) / "checkpoints"
    return (
        sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())
        if d.exists()
        else []
    )


@pytest.fixture(scope="session")
def straight(store_path, codec_dir, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    p = run_train(
        workdir,
        store_path,
        env,
        **{
            "train.eval_every": STEPS,
            "train.eval_batches": 1,
            "train.eval_audio": 2,
            "train.eval_audio_steps": 16,
            "train.eval_codec_dir": str(codec_dir),
        },
    )
    return workdir, p.stderr


def test_run_outputs_export_and_plot(straight, tmp_path):
    workdir, log = straight
    assert "compiled the train step for text 64, prompt 150, response 320" in log
    assert log.count("compiled the train step") == 1  # one bucket, one compile
    assert f"finished {STEPS} steps" in log
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
    assert finished_checkpoints(workdir) == [2, 4, 6, 8]
    line = next(ln for ln in log.splitlines() if f"step {STEPS}/{STEPS}" in ln)
    for part in ("loss", "acc", "lr", "tok/s", "s/step", "MFU", "ETA"):
        assert part in line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    for tag in (
        "train/loss",
        "train/acc_top10",
        "train/grad_norm",
        "train/lr",
        "perf/tokens_per_s",
        "perf/mfu",
        "perf/step_time_s",
        "train/loss_level0",
    ):
        assert tag in ea.Tags()["scalars"], tag
    assert len(ea.Scalars("train/loss")) == STEPS
    # the final evaluation synthesised two validation utterances with the trained parameters
    assert "eval audio at step 8: 2 samples" in log
    names = sorted(p.name for p in (workdir / "samples" / "00000008").iterdir())
    assert names == [f"{i}_{kind}.wav" for i in range(2) for kind in ("hyp", "prompt", "ref")]
    heard = EventAccumulator(str(workdir / "tb"), size_guidance={"audio": 0, "tensors": 0})
    heard.Reload()  # the same samples in TensorBoard, each with its phonemes
    assert {f"eval_audio/{i}_{k}" for i in range(2) for k in ("hyp", "prompt", "ref")} <= set(heard.Tags()["audio"])
    assert any(tag.startswith("eval_audio/0_hyp") for tag in heard.Tags()["tensors"])
    assert (workdir / "log.txt").read_text().count("step ") >= STEPS

    assert export_main(["--workdir", str(workdir), "--out", str(tmp_path / "model")]) == 0
    model, cfg, symmap = load_model(tmp_path / "model")
    assert cfg.d_model == 48 and len(symmap) > 100
    params8 = final_params(workdir, STEPS)

    np.testing.assert_array_equal(np.asarray(params_of(model)["sep"]), params8["sep"])
    assert export_main(["--workdir", str(workdir), "--out", str(tmp_path / "fp32.pth"), "--step", "4"]) == 0
    import torch

    ref = torch.load(tmp_path / "fp32.pth", weights_only=True)
    assert ref["userdata"]["symmap"] == symmap and ref["stats"]["step"] == 4
    state = {k: v.numpy() for k, v in ref["module"].items()}
    back = from_reference(state, infer_config(state, heads=4))
    np.testing.assert_array_equal(back["sep"], final_params(workdir, 4)["sep"])
    assert export_main(["--workdir", str(workdir), "--out", str(tmp_path / "model")]) == 1  # exists: refused

    assert plot_main(["--workdir", str(workdir), "--ys", "loss,acc,lr", "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        plot_main(["--workdir", str(workdir), "--xs", "tokens", "--ys", "nope", "--out", str(tmp_path / "n.png")]) == 1
    )


def test_sigkill_then_resume_equals_uninterrupted(straight, store_path, env, tmp_path):
    ref_dir, _ = straight
    workdir = tmp_path / "killed"
    proc = start(train_cmd(workdir, store_path), env, tmp_path / "killed.log")
    wait_for(lambda: finished_checkpoints(workdir), proc, what="a first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = finished_checkpoints(workdir)
    assert done and done[-1] < STEPS, "the kill came too late to test anything"
    p = run_train(workdir, store_path, env)
    assert f"resumed from step {done[-1]}" in p.stderr
    assert "taking over the lock" in p.stderr  # SIGKILL left the lock behind: it does not block a restart
    ref, got = losses(ref_dir), losses(workdir)
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-6)
    a, b = final_params(ref_dir, STEPS), final_params(workdir, STEPS)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_sigterm_saves_and_resumes_onto_another_mesh(straight, store_path, env, tmp_path):
    ref_dir, _ = straight
    workdir = tmp_path / "term"
    proc = start(
        train_cmd(workdir, store_path, **{"train.steps": 1000, "train.save_every": 1000}), env, tmp_path / "term.log"
    )
    wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 2, proc, what="step 2")
    proc.send_signal(signal.SIGTERM)
    # once the checkpoint is saved, a Ctrl-C says so and the run still exits cleanly
    deadline = time.time() + 120
    while proc.poll() is None and "(checkpoint saved)" not in Path(proc.log_path).read_text():
        assert time.time() < deadline, "no checkpoint saved after SIGTERM"
        time.sleep(0.01)
    late = proc.poll() is None
    if late:
        proc.send_signal(signal.SIGINT)
    err = finish(proc, timeout=30)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    if late:
        assert "is complete; the run is exiting" in err or "the run is over and its files are closed" in err, err[
            -2000:
        ]
    stopped = finished_checkpoints(workdir)
    assert len(stopped) == 1 and 2 <= stopped[0] < STEPS, (stopped, err[-2000:])
    assert f"stopped at step {stopped[0]} (checkpoint saved)" in err
    # resume on a (2, 2, 2) mesh: parameters and optimizer state are resharded on restore
    p = run_train(workdir, store_path, env, "--config.mesh.shape=(2,2,2)")
    assert f"resumed from step {stopped[0]}" in p.stderr and "'data': 2, 'fsdp': 2, 'tensor': 2" in p.stderr
    ref, got = losses(ref_dir), losses(workdir)
    steps = sorted(got)
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-4)
    a, b = final_params(ref_dir, STEPS), final_params(workdir, STEPS)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_torn_checkpoint_is_never_restored(straight, store_path, env, tmp_path):
    ref_dir, _ = straight
    workdir = tmp_path / "torn"
    shutil.copytree(ref_dir, workdir)
    for step in (6, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    # what a save killed half-way leaves: orbax's temporary directory, and a step dir without its commit
    torn = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ref_dir / "checkpoints" / "6", torn)
    (torn / "params" / "garbage").write_bytes(b"\0" * 10)
    p = run_train(workdir, store_path, env)
    assert "resumed from step 4" in p.stderr
    assert not torn.exists()
    np.testing.assert_allclose(losses(workdir)[STEPS], losses(ref_dir)[STEPS], rtol=1e-6)


def test_console_commands_drive_the_run(store_path, env, tmp_path):
    workdir = tmp_path / "cmds"
    cmd = [
        c if c != "--commands=off" else "--commands=on" for c in train_cmd(workdir, store_path, **{"train.steps": 1000})
    ]
    proc = start(cmd, env, tmp_path / "cmds.log", stdin=subprocess.PIPE)
    wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 1, proc, what="step 1")
    proc.stdin.write("lr 0.01\nexport\nnonsense\neval\n")
    proc.stdin.flush()
    wait_for(lambda: (workdir / "export" / "config.json").exists(), proc, what="the export")
    # a second run on the same workdir stops at once, naming the holder
    second = subprocess.run(train_cmd(workdir, store_path), cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by PID {proc.pid} on this host" in second.stderr and second.stderr.strip().count("\n") == 0
    proc.stdin.write("quit\n")
    proc.stdin.close()
    err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "command: lr 0.01" in err and "unknown command 'nonsense'" in err and "command: quit" in err
    assert "eval at step" in err
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    assert lrs[0] == pytest.approx(3.25e-4) and lrs[-1] == pytest.approx(0.01)
    assert finished_checkpoints(workdir), "quit saves a checkpoint"


def test_two_processes_match_one(straight, store_path, env, tmp_path):
    ref_dir, _ = straight
    port = portpicker.pick_unused_port()
    e = dict(env, XLA_FLAGS=env.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4"))
    workdir = tmp_path / "two"
    procs = [
        start(
            train_cmd(
                workdir,
                store_path,
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                **{"train.steps": 3},
            ),
            e,
            tmp_path / f"p{i}.log",
        )
        for i in range(2)
    ]
    errs = [finish(p, 400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "over 8 devices (2 processes)" in errs[0]
    ref, got = losses(ref_dir), losses(workdir)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], rtol=1e-5)


def test_small_model_overfits_a_small_subset(prepared, env, tmp_path):
    """8 utterances of 2 speakers, the whole subset in every batch: the model must memorise them."""

    subset = tmp_path / "subset"
    speakers = sorted(p for p in prepared.iterdir() if p.is_dir())[:2]
    for spk in speakers:
        shutil.copytree(spk, subset / spk.name, ignore=lambda d, names: [n for n in names if "_004." in n])
    assert pack.pack([subset], tmp_path / "store", progress=False).finish() == 0
    workdir = tmp_path / "overfit"
    one_device = dict(env, XLA_FLAGS=env.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1"))
    run_train(
        workdir,
        tmp_path / "store",
        one_device,
        timeout=600,
        **{
            "train.steps": OVERFIT_STEPS,
            "train.log_every": 10,
            "train.save_every": 1000,
            "optim.learning_rate": 3e-3,
            "optim.warmup_steps": 10,
            "model.dropout": 0.0,
            "model.size": "",
            "model.d_model": 128,
            "model.n_heads": 4,
            "model.n_layers": 2,
        },
    )
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["train/acc_top10"] > 0.9, last
    assert last["train/loss_level0"] < 0.5 * first["train/loss_level0"], (first, last)


OVERFIT_STEPS = 150


def test_killed_at_random_moments_and_damaged_then_resumed_equals_uninterrupted(straight, store_path, env, tmp_path):
    """Three SIGKILLs of one run at seeded random moments (once the start has logged a step at or past a
    random target, 2-4, 5-6, then 7, plus 0-0.3 s: inside a step, a save or a log line), the newest
    complete checkpoint truncated after the first kill that leaves two; each start resumes from the
    newest good checkpoint (walking back past the damaged one), and the run finished at last holds
    exactly the parameters of an uninterrupted run."""
    rng = random.Random(25)
    ref_dir, _ = straight
    workdir = tmp_path / "chaos"
    damaged, expect = None, None
    for trial, (low, high) in enumerate([(2, 4), (5, 6), (7, 7)]):
        rows = _rows(workdir)
        proc = start(train_cmd(workdir, store_path), env, tmp_path / f"trial{trial}.log")
        target, delay = rng.randint(low, high), rng.uniform(0.0, 0.3)
        wait_for(lambda: _rows(workdir) > rows and _last_step(workdir) >= target, proc, what=f"step {target}")
        time.sleep(delay)
        proc.kill()
        err = finish(proc)
        if expect is not None:
            assert f"resumed from step {expect}" in err, err[-2000:]
        # the damaged step counts again once a run has saved it anew (the damaged one moved aside)
        ckpts = workdir / "checkpoints"
        done = [s for s in finished_checkpoints(workdir) if s != damaged or (ckpts / f"{s}.unreadable").exists()]
        if damaged is None and len(done) >= 2:
            _corrupt(workdir / "checkpoints" / str(done[-1]), "truncated")
            damaged, done = done[-1], done[:-1]
        expect = done[-1] if done else None
    assert damaged is not None, "no trial left two checkpoints to damage one of"
    p = run_train(workdir, store_path, env)
    assert f"resumed from step {expect}" in p.stderr or expect is None, p.stderr[-2000:]
    a, b = final_params(ref_dir, STEPS), final_params(workdir, STEPS)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def _last_step(workdir) -> int:
    """The step of metrics.jsonl's last complete line."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().split("\n")[:-1]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:  # a line a kill cut short, with the next start's first line appended to it
        return 0


def _rows(workdir) -> int:
    """Lines in metrics.jsonl (one per logged step; a resumed run appends its own)."""
    path = Path(workdir) / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(straight, store_path, env, tmp_path):
    """A real failed write under orbax: the resumed run's file-size limit (RLIMIT_FSIZE, 1 MB, set in
    the child) makes the kernel refuse the 4 MB parameter file of checkpoint 4 with EFBIG, as a full
    disk refuses with ENOSPC, inside tensorstore's writer; unlike chmod it binds root too. The run
    says so in one line naming the file and errno, exits with status 4, removes the half-written step,
    and checkpoint 2 still restores."""
    ref_dir, _ = straight
    workdir = tmp_path / "full"
    shutil.copytree(ref_dir, workdir)
    for step in (4, 6, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))

    # the limit is set by a small Python that then becomes the run (a preexec_fn would fork this JAX process)
    limit = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); "
    limit += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    cmd = train_cmd(workdir, store_path)
    p = subprocess.run([cmd[0], "-c", limit, *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 4, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"cannot write checkpoint 4 in {workdir / 'checkpoints'}: File too large (EFBIG)" in errors[0]
    assert "the run stops here and checkpoint 2 is kept" in errors[0]
    assert finished_checkpoints(workdir) == [2] and sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    np.testing.assert_array_equal(final_params(workdir, 2)["sep"], final_params(ref_dir, 2)["sep"])
