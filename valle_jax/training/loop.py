"""The training loop: build or resume the state on the mesh, then step, log, evaluate and save.

Nothing in the loop waits on the device except where it must: a step's metrics are fetched after
the next step has been dispatched (training.meter), and checkpoints are written asynchronously. The
step is compiled ahead of time once per batch shape (training.compiled), so compile time shows in
the log. What happens every N steps is a list of `Every(n, action)` (training.periodic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from valle_jax import runs
from valle_jax.atomic import as_path, io_error_line
from valle_jax.checkpointing import params_of
from valle_jax.config import ConfigError, data_config, mesh_config, model_config, optim_config, train_config
from valle_jax.data.pipeline import make_iterator
from valle_jax.data.store import Store
from valle_jax.models import lora as LR
from valle_jax.models.lora import lora_config
from valle_jax.models.valle import abstract_model, seq_len
from valle_jax.training import control, init_from, lora_state, monitor, sharding
from valle_jax.training import state as S
from valle_jax.training.checkpoint import Checkpoints, CheckpointWriteError
from valle_jax.training.compiled import CompiledSteps, jit_eval_step, jit_train_step
from valle_jax.training.evaluation import AudioSamples, Evaluator
from valle_jax.training.exporting import export_params
from valle_jax.training.inject import load_embeddings
from valle_jax.training.meter import Meter, NonFiniteLoss
from valle_jax.training.optim import LearningRate, make_optimizer
from valle_jax.training.periodic import Every, run_due

log = logging.getLogger("valle_jax.train")

EXIT_OK, EXIT_NONFINITE, EXIT_WRITE = 0, 3, 4


@dataclasses.dataclass
class Progress:
    """What the loop carries from one step to the next."""

    state: dict  # params, opt_state, step, rng, on the mesh
    data: Any  # the grain iterator (its position is saved with each checkpoint)
    step: int  # optimizer steps taken
    last_saved: int | None  # the newest checkpoint written or restored (None: none yet)


class Trainer:
    def __init__(self, config, workdir: str | Path, commands: str = "auto", devices=None):
        self.config, self.workdir = config, as_path(workdir)  # local, or gs://... (docs/cloud.md)
        self.data_cfg, self.model_cfg = data_config(config), model_config(config)
        self.mesh_cfg, self.optim_cfg, self.train_cfg = mesh_config(config), optim_config(config), train_config(config)
        if not self.data_cfg.store:
            raise ConfigError("config.data.store is empty: pass --config.data.store=STORE (python -m tools.pack)")
        self.primary = jax.process_index() == 0
        self.accum = self.optim_cfg.grad_accum
        self.mesh = sharding.make_mesh(self.mesh_cfg, devices)
        self._check_batch_divides()
        sharding.check_expert_axis(self.mesh, self.model_cfg)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", keep=self.train_cfg.keep)
        store = Store(self.data_cfg.store)
        self.lora = lora_config(config)
        resuming = bool(self.checkpoints.all_steps())
        # a resume, a fresh run from train.init_from (its weights, merged vocabularies), or a random start
        self.start_from = init_from.plan(
            self.train_cfg, self.model_cfg, store, self.workdir, resuming, need_base=self.lora.enabled
        )
        if self.lora.enabled and self.start_from.params is None:
            raise ConfigError("model.lora trains adapters on a pretrained model: set train.init_from to the base model")
        self.model_cfg, self.symmap = self.start_from.model, self.start_from.vocab.symmap
        self.store = init_from.wrap(store, self.start_from.vocab)
        langs = self.store.lang_symmap
        runs.check_languages(self.model_cfg, langs, np.unique(self.store.lang), self.store.path)
        runs.check_run(self.workdir, self.model_cfg, self.symmap, self.store.path, langs)
        if self.primary:
            runs.write_run(self.workdir, self.model_cfg, self.symmap, self.config.to_dict(), langs)
        self._build_steps()
        self.writer = monitor.MetricsWriter(self.workdir, enabled=self.primary)
        self.peak_flops, self.peak_source = monitor.device_peak_flops(self.train_cfg.peak_flops)
        self.meter = Meter(
            self.writer, self.model_cfg, self.data_cfg, self.train_cfg, self.peak_flops, self.lr.at, self.primary
        )
        # eval batches' ids are the run's: both stores are read through the run's map (init_from.into_run)
        audio = AudioSamples(self.train_cfg, self.model_cfg, self.workdir, self.primary, self.writer, self.symmap)
        seed = int(self.config.seed)
        self.evaluate = Evaluator(
            self.eval_step, self.layout.global_batch, self.data_cfg, self.train_cfg, seed, self.writer, audio
        )
        self.evaluate.open_store = lambda path: init_from.into_run(Store(path), self.symmap, self.model_cfg.n_tokens)
        self.evaluate.check_store()
        self.console = control.Console(commands, self.primary, self._command_handlers())
        self.stop = control.StopRequest()  # run() installs its signal handlers

    def _check_batch_divides(self) -> None:
        dp = sharding.data_parallel_size(self.mesh, self.mesh_cfg)
        if self.data_cfg.batch_size % dp:
            raise ConfigError(
                f"data.batch_size={self.data_cfg.batch_size} is not divisible by the "
                f"{dp} data-parallel devices of mesh {dict(self.mesh.shape)}"
            )

    def _build_steps(self) -> None:
        """The optimizer, the state's layout on the mesh and the jitted train and eval steps."""
        abstract = abstract_model(self.model_cfg)
        graph, abstract_params = nnx.graphdef(abstract), params_of(abstract)
        embeddings = self.optim_cfg.embeddings
        self.injected = load_embeddings(embeddings, self.model_cfg) if embeddings else {}
        merge, self.full_params = None, lambda state: state["params"]
        if self.lora.enabled:  # the optimizer sees only the adapters; injected tables go into the frozen base
            # the adapted matrices, and the table rows this run grew (new phonemes, languages): those train too
            self.lora_targets = LR.find_targets(abstract, self.lora) + LR.grown_rows(
                abstract, *self.start_from.grown_rows()
            )
            trained = jax.eval_shape(lambda: LR.init_adapters(self.lora_targets, self.lora, 0))
            extra_frozen = []
        else:
            trained, extra_frozen = abstract_params, [f"^{k}$" for k in self.injected]
        self.tx, schedule, self.frozen = make_optimizer(self.optim_cfg, trained, self.train_cfg.steps, extra_frozen)
        self.lr = LearningRate(schedule)
        abstract_opt = jax.eval_shape(self.tx.init, trained)
        if self.lora.enabled:
            self.layout = lora_state.make_layout(
                self.mesh, self.mesh_cfg, abstract, self.lora_targets, trained, abstract_opt
            )
            merge = lora_state.merge_fn(self.lora_targets, self.lora)
            self.full_params = lora_state.merger(self.lora_targets, self.lora, self.layout)
        else:
            self.layout = S.make_layout(self.mesh, self.mesh_cfg, abstract, abstract_params, abstract_opt)
        probs = self.train_cfg.level_probs
        self.train_step = jit_train_step(graph, self.model_cfg, self.tx, probs, self.layout, merge)
        self.eval_step = jit_eval_step(graph, self.model_cfg, probs, self.layout)
        self.compiled = CompiledSteps(self.train_step)

    # ---- set-up -------------------------------------------------------------------------------
    def restore_or_init(self) -> tuple[dict, Any, int]:
        """(state, data iterator state or None, step): the newest good checkpoint's, or a fresh run's."""
        data_state, step = None, 0
        seed = int(self.config.seed)
        if self.lora.enabled:
            return self._restore_or_init_lora(seed)
        if not self.checkpoints.all_steps() and self.start_from.params is not None:
            state = init_from.initial_state(self.start_from.params, self.tx, seed, self.layout)
            log.info(
                "started a new run in %s from the %s (fresh optimizer, step 0)", self.workdir, self.start_from.origin
            )
        elif not self.checkpoints.all_steps():
            state = S.fresh_state(self.model_cfg, self.tx, seed, self.layout)
            log.info("started a new run in %s", self.workdir)
        else:
            abstract = S.abstract_state(self.model_cfg, self.tx, seed, self.layout)
            (state, data_state, meta), step = self.checkpoints.newest_good(
                lambda s: self.checkpoints.restore(s, abstract), lambda restored: restored[0]["params"]
            )
            self.meter.stats.update(meta.get("stats", {}))
            log.info("resumed from step %d of %s", step, self.workdir)
            if self.train_cfg.init_from:
                log.info("train.init_from (%s) is not used: the workdir has checkpoints", self.train_cfg.init_from)
        return S.inject(state, self.injected, self.layout, self.optim_cfg.embeddings), data_state, step

    def _restore_or_init_lora(self, seed: int) -> tuple[dict, Any, int]:
        """A LoRA run: fresh adapters on the init_from base, or the checkpoint's adapters on the base
        loaded again (checkpoints hold the adapters and their optimizer state only)."""
        base, data_state, step = self.start_from.params, None, 0
        if not self.checkpoints.all_steps():
            state = lora_state.initial_state(base, self.lora_targets, self.lora, self.tx, seed, self.layout)
            log.info(
                "started a new LoRA run in %s (rank %d on %d matrices; grown table rows trained: %s) on the %s",
                self.workdir,
                self.lora.rank,
                sum(isinstance(t, LR.Target) for t in self.lora_targets),
                {t.name: len(t.ids) for t in self.lora_targets if isinstance(t, LR.GrownRows)} or "none",
                self.start_from.origin,
            )
        else:
            base_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), base)
            abstract = lora_state.abstract_state(
                base_abstract, self.lora_targets, self.lora, self.tx, seed, self.layout
            )
            (state, data_state, meta), step = self.checkpoints.newest_good(
                lambda s: self.checkpoints.restore(s, abstract), lambda restored: restored[0]["params"]
            )
            state["base"] = jax.device_put(base, self.layout.params)
            self.meter.stats.update(meta.get("stats", {}))
            log.info("resumed the LoRA run %s from step %d on the %s", self.workdir, step, self.start_from.origin)
        if self.injected:
            state["base"] = S.inject({"params": state["base"]}, self.injected, self.layout, self.optim_cfg.embeddings)[
                "params"
            ]
        return state, data_state, step

    def iterator(self, data_state=None):
        it = make_iterator(
            self.store, self.data_cfg, process_index=jax.process_index(), process_count=jax.process_count()
        )
        if data_state is not None:
            it.set_state(data_state)
        return it

    def start(self) -> Progress:
        state, data_state, step = self.restore_or_init()
        it = self.iterator(data_state)
        self._log_setup(state)
        self.meter.restart_clock()
        return Progress(state, it, step, last_saved=step if step else None)

    def _log_setup(self, state: dict) -> None:
        leaves = jax.tree.leaves(state["params"])
        n_params = sum(int(np.prod(x.shape)) for x in leaves)
        n_frozen = sum(int(np.prod(x.shape)) for x, f in zip(leaves, jax.tree.leaves(self.frozen)) if f)
        log.info(
            "model %s: %.2fM parameters (%.2fM frozen); mesh %s over %d devices (%d processes); "
            "global batch %d x %d accumulation; optimizer %s, schedule %s; MFU against %.3g FLOP/s per device (%s)",
            self.model_cfg.arch,
            n_params / 1e6,
            n_frozen / 1e6,
            dict(self.mesh.shape),
            jax.device_count(),
            jax.process_count(),
            self.data_cfg.batch_size,
            self.accum,
            self.optim_cfg.name,
            self.optim_cfg.schedule,
            self.peak_flops,
            self.peak_source,
        )
        if self.console.enabled:
            log.info("reading commands from stdin: %s", control.HELP)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, stop: control.StopRequest | None = None) -> int:
        """Trains to `train.steps` or until stopped; returns the exit status. SIGTERM/SIGINT are
        handled by `stop` (a new StopRequest, uninstalled on return, unless one is given)."""
        own = stop is None
        self.stop = stop = (stop or control.StopRequest()).install()
        try:
            try:
                code = self._run(stop)
            except BaseException:
                self._close(quiet=True)  # the first error is the one to report
                raise
            self._close()
            return code
        finally:
            if own:
                stop.uninstall()

    def _close(self, quiet: bool = False) -> None:
        """Waits for the last checkpoint and closes the files; with `quiet`, errors are logged in one line."""
        for close in (self._wait_and_close_checkpoints, self.writer.close):
            try:
                close()
            except Exception as e:
                if not quiet:
                    raise
                log.error("while closing after the error: %s", io_error_line(e) or e)

    def _wait_and_close_checkpoints(self) -> None:
        if self.stop.phase == "running":  # an abort: a periodic save may still be in flight
            with self._writing_last():
                self.checkpoints.close()
        else:
            self.checkpoints.close()

    def _writing_last(self):
        """`stop.writing` of the newest queued checkpoint, if any (what waiting for orbax finishes)."""
        queued = self.checkpoints.queued
        return self.stop.writing(queued) if queued is not None else contextlib.nullcontext()

    def periodic(self, stop: control.StopRequest) -> list[Every]:
        """What happens after a step, in this order, when its time has come."""
        cfg = self.train_cfg
        sync_every = cfg.log_every if jax.process_count() > 1 else 1  # hosts agree at log lines only
        return [
            Every(cfg.log_every, lambda p: self.meter.log(p.step)),
            Every(sync_every, lambda p: self.console.sync(stop, p)),
            Every(cfg.eval_every, lambda p: self.evaluate(self.full_params(p.state), p.step)),
            Every(cfg.save_every, self.save),
        ]

    def _run(self, stop: control.StopRequest) -> int:
        total = self.train_cfg.steps
        progress = self.start()
        if stop:  # asked while restoring: nothing new to save
            log.info("stopped before the first step; nothing new to save")
            return EXIT_OK
        periodic = self.periodic(stop)
        try:
            while progress.step < total:
                self.train_one_step(progress)
                run_due(periodic, progress, progress.step, total)
                if stop:
                    self.stop_here(progress)
                    break
            with self._writing_last():
                self.checkpoints.wait()
        except (CheckpointWriteError, OSError) as e:
            # a full disk, a read-only or unwritable workdir: stop, keeping the checkpoints complete so far
            latest = self.checkpoints.latest_step()
            kept = f"checkpoint {latest} is kept" if latest is not None else "no checkpoint has been written"
            log.error(
                "%s; the run stops here and %s: free space or make %s writable, then start again to resume",
                e if isinstance(e, CheckpointWriteError) else io_error_line(e) or e,
                kept,
                self.workdir,
            )
            return EXIT_WRITE
        except NonFiniteLoss as e:
            kept = (
                f"the last good checkpoint (step {progress.last_saved}) is kept"
                if progress.last_saved is not None
                else "no checkpoint has been written yet"
            )
            log.error(
                "%s; the run stops here and %s; set --config.train.nonfinite=skip to skip such steps instead", e, kept
            )
            self.checkpoints.wait()
            return EXIT_NONFINITE
        if stop:
            stop.saved(progress.step)
            log.info("stopped at step %d (checkpoint saved)", progress.step)
        if progress.step >= total:
            log.info("finished %d steps; checkpoints in %s", progress.step, self.checkpoints.directory)
        return EXIT_OK

    def train_one_step(self, p: Progress) -> None:
        """One optimizer step: `grad_accum` micro-batches, dispatched without waiting for the device."""
        lr_scale = self.lr.scale(p.step)
        for _ in range(self.accum):
            local = next(p.data)
            batch = self.layout.global_batch(local)
            p.state, metrics = self.compiled(p.state, batch, lr_scale)
            self.meter.dispatched(p.step + 1, metrics, seq_len(local))
        p.step += 1
        self.meter.step_done()

    def stop_here(self, p: Progress) -> None:
        """A stop was asked for (signal, `quit`, another host): save, maybe export."""
        self.save(p)
        if self.train_cfg.export_on_quit:
            self.export(p)

    # ---- side jobs ----------------------------------------------------------------------------
    def _meta(self, step: int) -> dict:
        return {
            "step": step,
            "micro_step": step * self.accum,
            "stats": dict(self.meter.stats),
            "lr_override": self.lr.override,
            **({"lora_base": self.start_from.origin} if self.lora.enabled else {}),  # what the adapters adapt
        }

    def save(self, p: Progress) -> None:
        """A checkpoint of step `p.step` (once: a second call for the same step does nothing)."""
        self.meter.flush()  # the checkpoint's stats include the last step
        self.writer.sync()  # on an object store, the metrics reach it with each checkpoint
        if self.checkpoints.has(p.step):
            return
        t0 = time.perf_counter()
        with self.stop.writing(p.step):  # a Ctrl-C does not break orbax's hand-over
            self.checkpoints.save(p.step, p.state, p.data.get_state(), self._meta(p.step))
        p.last_saved = p.step
        log.info("checkpoint %d queued (%.2f s blocking)", p.step, time.perf_counter() - t0)

    def export(self, p: Progress) -> None:
        meta = self._meta(p.step)
        langs = self.store.lang_symmap
        export_params(self.full_params(p.state), self.model_cfg, self.symmap, meta, self.workdir, self.primary, langs)

    def _command_handlers(self) -> dict:
        def set_lr(p: Progress, cmd: control.Command) -> None:
            self.lr.override = cmd.value

        def save_and_export(p: Progress, cmd: control.Command) -> None:
            self.save(p)
            self.export(p)

        return {
            "save": lambda p, cmd: self.save(p),
            "quit": lambda p, cmd: self.save(p),
            "export": save_and_export,
            "eval": lambda p, cmd: self.evaluate(self.full_params(p.state), p.step),
            "lr": set_lr,
        }


def train(config, workdir: str | Path, commands: str = "auto") -> int:
    return Trainer(config, workdir, commands).run()
