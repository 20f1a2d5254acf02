"""The training loop: build or resume the state on the mesh, then step, log, evaluate and save.

Nothing in the loop waits on the device except where it must: a step's metrics are fetched after
the next step has been dispatched, and checkpoints are written asynchronously. The step is compiled
ahead of time once per batch shape (the pipeline's buckets), so compile time is visible in the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from valle_jax.checkpointing import params_of
from valle_jax.config import ConfigError, data_config, mesh_config, model_config, optim_config, train_config
from valle_jax.data.pipeline import make_iterator
from valle_jax.data.store import Store
from valle_jax.export import RUN_FILE, export, run_stats
from valle_jax.models.valle import model_from_params, seq_len
from valle_jax.training import control, monitor, sharding
from valle_jax.training.checkpoint import Checkpoints, abstract_like
from valle_jax.training.inject import load_embeddings
from valle_jax.training.optim import make_optimizer
from valle_jax.training.step import (
    DEVICE_KEYS,
    abstract_model,
    init_params,
    make_eval_step,
    make_train_step,
    train_flops,
)

log = logging.getLogger("valle_jax.train")

EXIT_OK, EXIT_NONFINITE = 0, 3


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, config, workdir: str | Path, commands: str = "auto", devices=None):
        self.config = config
        self.workdir = Path(workdir).absolute()
        self.data_cfg = data_config(config)
        self.model_cfg = model_config(config)
        self.mesh_cfg = mesh_config(config)
        self.optim_cfg = optim_config(config)
        self.train_cfg = train_config(config)
        if not self.data_cfg.store:
            raise ConfigError("config.data.store is empty: pass --config.data.store=STORE (python -m tools.pack)")
        self.primary = jax.process_index() == 0
        self.accum = self.optim_cfg.grad_accum
        self.mesh = sharding.make_mesh(self.mesh_cfg, devices)
        dp = sharding.data_parallel_size(self.mesh, self.mesh_cfg)
        if self.data_cfg.batch_size % dp:
            raise ConfigError(
                f"data.batch_size={self.data_cfg.batch_size} is not divisible by the "
                f"{dp} data-parallel devices of mesh {dict(self.mesh.shape)}"
            )
        self.store = Store(self.data_cfg.store)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_run_file()

        abstract = abstract_model(self.model_cfg)
        self.graph = nnx.graphdef(abstract)
        abstract_params = params_of(abstract)
        self.param_sh = sharding.param_shardings(abstract, self.mesh, self.mesh_cfg)
        self.injected = load_embeddings(self.optim_cfg.embeddings, self.model_cfg) if self.optim_cfg.embeddings else {}
        self.tx, self.schedule, self.frozen = make_optimizer(
            self.optim_cfg, abstract_params, self.train_cfg.steps, [f"^{k}$" for k in self.injected]
        )
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        self.replicated = NamedSharding(self.mesh, P())
        self.state_sh = {
            "params": self.param_sh,
            "opt_state": sharding.mirror_shardings(abstract_opt, abstract_params, self.param_sh, self.mesh),
            "step": self.replicated,
            "rng": self.replicated,
        }
        self.batch_sh = sharding.batch_sharding(self.mesh, self.mesh_cfg)
        self.batch_shardings = {k: self.batch_sh for k in DEVICE_KEYS}

        probs = self.train_cfg.level_probs
        self._train_step = jax.jit(
            make_train_step(self.graph, self.model_cfg, self.tx, probs),
            in_shardings=(self.state_sh, self.batch_shardings, self.replicated),
            out_shardings=(self.state_sh, self.replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            make_eval_step(self.graph, self.model_cfg, probs),
            in_shardings=(self.param_sh, self.batch_shardings, self.replicated),
            out_shardings=self.replicated,
        )
        self.compiled: dict[tuple, object] = {}
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", keep=self.train_cfg.keep)
        self.writer = monitor.MetricsWriter(self.workdir, enabled=self.primary)
        self._codec = self._decoder = None  # for evaluation audio, made on first use
        self._audio_off = False  # set when the codec for evaluation audio cannot be loaded
        self.peak_flops, self.peak_source = monitor.device_peak_flops(self.train_cfg.peak_flops)
        self.commands = (
            control.CommandReader(enabled={"on": True, "off": False, "auto": None}[commands])
            if self.primary
            else control.CommandReader(enabled=False)
        )
        self.lr_override: float | None = None
        self.stats = {"samples": 0, "tokens_processed": 0, "positions": 0, "train_seconds": 0.0}

    # ---- set-up -------------------------------------------------------------------------------
    def _check_run_file(self) -> None:
        """The workdir remembers its model config and symmap; resuming with another model is an error."""
        path = self.workdir / RUN_FILE
        model = dataclasses.asdict(self.model_cfg)
        if path.exists():
            old = json.loads(path.read_text("utf-8"))
            keys = (
                "arch",
                "d_model",
                "n_heads",
                "n_layers",
                "n_kv_heads",
                "ffn_mult",
                "n_tokens",
                "n_prom_levels",
                "n_resp_levels",
                "n_langs",
                "version",
            )
            changed = {k: (old["model"].get(k), model[k]) for k in keys if old["model"].get(k) != model[k]}
            if changed:
                raise ConfigError(
                    f"{self.workdir} holds a run of another model (old, new): {changed}; use a new --workdir"
                )
            if old["symmap"] != self.store.symmap:
                raise ConfigError(f"{self.store.path} uses another phoneme map than the run in {self.workdir}")
        if self.primary:
            from valle_jax.atomic import write_text

            write_text(
                path,
                json.dumps(
                    {"model": model, "symmap": self.store.symmap, "config": self.config.to_dict()},
                    indent=1,
                    default=list,
                ),
            )

    def _fresh_state(self) -> dict:
        seed, cfg, tx = int(self.config.seed), self.model_cfg, self.tx

        def init():
            params = init_params(cfg, seed)
            return {
                "params": params,
                "opt_state": tx.init(params),
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(seed + 1)),
            }

        return jax.jit(init, out_shardings=self.state_sh)()

    def _inject(self, state: dict) -> dict:
        if not self.injected:
            return state
        params = dict(state["params"])
        for k, v in self.injected.items():
            params[k] = jax.device_put(v, self.param_sh[k])
        log.info("injected and froze %s from %s", sorted(self.injected), self.optim_cfg.embeddings)
        return {**state, "params": params}

    def restore_or_init(self):
        step = self.checkpoints.latest_step()
        data_state = None
        if step is None:
            state = self._fresh_state()
            log.info("started a new run in %s", self.workdir)
        else:
            abstract = abstract_like(jax.eval_shape(self._fresh_state), self.state_sh)
            state, data_state, meta = self.checkpoints.restore(step, abstract)
            self.stats.update(meta.get("stats", {}))
            log.info("resumed from step %d of %s", step, self.workdir)
        return self._inject(state), data_state, step or 0

    def _iterator(self, data_state):
        it = make_iterator(
            self.store, self.data_cfg, process_index=jax.process_index(), process_count=jax.process_count()
        )
        if data_state is not None:
            it.set_state(data_state)
        return it

    def _global_batch(self, local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sh, np.asarray(local[k])) for k in DEVICE_KEYS}

    def _compiled_step(self, state, batch, lr):
        key = tuple((k, batch[k].shape) for k in DEVICE_KEYS)
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self._train_step.lower(state, batch, lr).compile()
            log.info(
                "compiled the train step for text %d, prompt %d, response %d frames in %.1f s (%d shapes so far)",
                batch["text"].shape[1],
                batch["prompt"].shape[1],
                batch["resp"].shape[1],
                time.perf_counter() - t0,
                len(self.compiled),
            )
        return self.compiled[key]

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        stop = control.StopRequest().install()
        try:
            return self._run(stop)
        finally:
            stop.uninstall()
            self.checkpoints.close()
            self.writer.close()

    def _run(self, stop) -> int:
        cfg = self.train_cfg
        state, data_state, step = self.restore_or_init()
        it = self._iterator(data_state)
        self._log_setup(state, step)
        averager = monitor.Averager()
        pending = None  # (step, metrics on device) of the last dispatched batch, fetched one batch late
        last_saved = step
        t_interval, flops_interval, steps_interval = time.perf_counter(), 0.0, 0
        multi = jax.process_count() > 1
        exit_code = EXIT_OK
        try:
            while step < cfg.steps:
                lr_scale = self._lr_scale(step)
                for _ in range(self.accum):
                    local = next(it)
                    batch = self._global_batch(local)
                    state, metrics = self._compiled_step(state, batch, lr_scale)(state, batch, lr_scale)
                    flops_interval += train_flops(self.model_cfg, self.data_cfg.batch_size, seq_len(local))
                    if pending is not None:
                        self._consume(averager, *pending)
                    pending = (step + 1, metrics)
                step += 1
                steps_interval += 1

                at_sync = (not multi) or step % cfg.log_every == 0 or step == cfg.steps
                commands = []
                if at_sync:
                    want_stop, commands = control.agree(bool(stop), self._poll_commands(multi))
                    if want_stop and not stop:
                        stop.signal = -1  # another host was asked to stop
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._consume(averager, *pending)
                    pending = None
                    now = time.perf_counter()
                    self._log(step, averager, now - t_interval, flops_interval, steps_interval)
                    averager.reset()
                    t_interval, flops_interval, steps_interval = now, 0.0, 0
                for cmd in commands:
                    self._command(cmd, state, it, step)
                    if cmd.name == "quit":
                        stop.signal = stop.signal or -2
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    self.evaluate(state["params"], step)
                if step % cfg.save_every == 0 or step == cfg.steps or stop:
                    if pending is not None:
                        self._consume(averager, *pending)
                        pending = None
                    self._save(step, state, it)
                    last_saved = step
                if stop:
                    if cfg.export_on_quit:
                        self._export(state, step)
                    log.info("stopped at step %d (checkpoint saved)", step)
                    break
        except NonFiniteLoss as e:
            log.error(
                "%s; the run stops here and the last good checkpoint (step %d) is kept; "
                "set --config.train.nonfinite=skip to skip such steps instead",
                e,
                last_saved,
            )
            exit_code = EXIT_NONFINITE
        self.checkpoints.wait()
        if exit_code == EXIT_OK and step >= cfg.steps:
            log.info("finished %d steps; checkpoints in %s", step, self.checkpoints.directory)
        return exit_code

    def _poll_commands(self, multi: bool) -> list:
        cmds = self.commands.poll()
        if multi and len(cmds) > 1:  # one command per sync point across hosts; keep the rest for later
            for c in cmds[1:]:
                self.commands.queue.put(c)
            cmds = cmds[:1]
        return cmds

    def _lr_scale(self, step: int) -> np.ndarray:
        if self.lr_override is None:
            return np.float32(1.0)
        scheduled = float(self.schedule(step))
        return np.float32(self.lr_override / scheduled) if scheduled > 0 else np.float32(1.0)

    def current_lr(self, step: int) -> float:
        return self.lr_override if self.lr_override is not None else float(self.schedule(step))

    def _consume(self, averager: monitor.Averager, step: int, metrics) -> None:
        m = jax.device_get(metrics)
        if not bool(m["finite"]):
            if self.train_cfg.nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss {float(m['loss'])} or gradient norm {float(m['grad_norm'])} "
                    f"at step {step} (the update was not applied)"
                )
            log.warning("step %d: non-finite loss or gradient; update skipped", step)
        m["nll_per_level"] = m["loss_per_level"] * m["tokens_per_level"]
        averager.add(m)
        self.stats["samples"] += self.data_cfg.batch_size
        self.stats["tokens_processed"] += int(m["ref_tokens"])
        self.stats["positions"] += int(m["positions"])

    def _log(self, step: int, avg: monitor.Averager, seconds: float, flops: float, steps: int) -> None:
        if avg.n == 0:
            return
        self.stats["train_seconds"] += seconds
        scalars = {
            "train/loss": float(avg.mean("loss")),
            "train/acc_top10": float(avg.mean("acc_top10")),
            "train/grad_norm": float(avg.mean("grad_norm")),
            "train/lr": self.current_lr(step),
            "perf/step_time_s": seconds / max(steps, 1),
            "perf/tokens_per_s": float(avg.sums["positions"]) / max(seconds, 1e-9),
            "perf/tflops_per_device": flops / max(seconds, 1e-9) / jax.device_count() / 1e12,
            "perf/mfu": flops / max(seconds, 1e-9) / (self.peak_flops * jax.device_count()),
            "stats/tokens_processed": float(self.stats["tokens_processed"]),
            "stats/samples": float(self.stats["samples"]),
        }
        for lv, (nll, tok) in enumerate(zip(avg.sums["nll_per_level"], avg.sums["tokens_per_level"])):
            if tok > 0:  # token-weighted over the interval, like the overall loss of each step
                scalars[f"train/loss_level{lv}"] = float(nll / tok)
        self.writer.write(step, scalars)
        if self.primary:
            log.info(monitor.console_line(step, self.train_cfg.steps, scalars))

    def _log_setup(self, state, step: int) -> None:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
        n_frozen = sum(
            int(np.prod(x.shape)) for x, f in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(self.frozen)) if f
        )
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
        if self.commands.enabled:
            log.info("reading commands from stdin: %s", control.HELP)

    # ---- side jobs ----------------------------------------------------------------------------
    def _meta(self, step: int) -> dict:
        return {
            "step": step,
            "micro_step": step * self.accum,
            "stats": dict(self.stats),
            "lr_override": self.lr_override,
        }

    def _save(self, step: int, state: dict, it) -> None:
        if step in self.checkpoints.all_steps():
            return
        t0 = time.perf_counter()
        self.checkpoints.save(step, state, it.get_state(), self._meta(step))
        log.info("checkpoint %d queued (%.2f s blocking)", step, time.perf_counter() - t0)

    def _gather_params(self, params: dict) -> dict:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(params, tiled=True)
        return jax.device_get(params)

    def _export(self, state: dict, step: int) -> None:
        params = self._gather_params(state["params"])
        if self.primary:
            out = export(
                params,
                self.model_cfg,
                self.store.symmap,
                run_stats(self._meta(step)),
                self.workdir / "export",
                overwrite=True,
            )
            log.info("exported step %d to %s", step, out)

    def _command(self, cmd: control.Command, state: dict, it, step: int) -> None:
        log.info("command: %s%s", cmd.name, f" {cmd.value:g}" if cmd.name == "lr" else "")
        if cmd.name in ("save", "export", "quit"):
            self._save(step, state, it)
        if cmd.name == "export":
            self._export(state, step)
        elif cmd.name == "eval":
            self.evaluate(state["params"], step)
        elif cmd.name == "lr":
            self.lr_override = cmd.value

    def evaluate(self, params: dict, step: int) -> dict:
        """Validation loss / top-10 accuracy (per level too) over `train.eval_batches` batches of
        the validation store, read in order, with levels drawn from a fixed key per batch (so
        successive evaluations are comparable)."""
        cfg = dataclasses.replace(self.data_cfg, store=self.train_cfg.eval_store or self.data_cfg.store, num_workers=0)
        it = make_iterator(
            cfg.store,
            cfg,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_epochs=1,
            shuffle=False,
            drop_remainder=False,
        )
        sums, first = None, None
        t0 = time.perf_counter()
        for i, local in zip(range(self.train_cfg.eval_batches), it):
            first = local if first is None else first
            key = jax.random.key_data(jax.random.fold_in(jax.random.key(int(self.config.seed) + 2), i))
            out = self._eval_step(params, self._global_batch(local), key)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if sums is None:
            return {}
        s = jax.device_get(sums)
        n = max(float(s["tokens"]), 1.0)
        scalars = {"val/loss": float(s["nll"]) / n, "val/acc_top10": float(s["top10"]) / n}
        for lv, (nll, tok) in enumerate(zip(s["nll_per_level"], s["tokens_per_level"])):
            if tok > 0:
                scalars[f"val/loss_level{lv}"] = float(nll / tok)
        self.writer.write(step, scalars)
        log.info(
            "eval at step %d: loss %.4f, top-10 accuracy %.3f (%.1f s)",
            step,
            scalars["val/loss"],
            scalars["val/acc_top10"],
            time.perf_counter() - t0,
        )
        if self.train_cfg.eval_audio > 0:
            self._eval_audio(params, first, step)
        return scalars

    def _eval_audio(self, params: dict, batch: dict, step: int) -> None:
        """Synthesises the first `train.eval_audio` validation utterances (their text and prompt)
        with the current parameters, and writes hypothesis, reference and prompt wavs (SPEC §7.6)."""
        params = self._gather_params(params)  # every process takes part (a collective); the primary writes
        if not self.primary or self._audio_off:
            return
        from valle_jax.audio import write_wav
        from valle_jax.codec import Codec
        from valle_jax.decoding import Decoder, Inputs, Settings

        t0 = time.perf_counter()
        try:
            if self._codec is None:
                self._codec = Codec.load(self.train_cfg.eval_codec_dir or None)
        except Exception as e:  # no codec: say so once and keep training (other hosts still gather)
            log.warning("eval audio disabled: %s", e)
            self._audio_off = True
            return
        if self._decoder is None:
            self._decoder = Decoder(model_from_params(dataclasses.replace(self.model_cfg, dtype="float32"), params))
        else:
            self._decoder.params = nnx.state(model_from_params(self._decoder.cfg, params))
        n = min(self.train_cfg.eval_audio, len(batch["text_len"]))
        inputs = Inputs(*(np.asarray(batch[k][:n]) for k in ("text", "text_len", "lang", "prompt", "prompt_len")))
        out = self._decoder.generate(
            inputs, Settings(max_ar_steps=self.train_cfg.eval_audio_steps, ar_temp=0.95, nar_temp=0.5, seed=step)
        )
        folder = self.workdir / "samples" / f"{step:08d}"
        for i, codes in enumerate(out.codes):
            write_wav(folder / f"{i}_hyp.wav", self._codec.decode(codes) if len(codes) else np.zeros(1, np.float32))
            write_wav(folder / f"{i}_ref.wav", self._codec.decode(batch["resp"][i, : batch["resp_len"][i]]))
            write_wav(folder / f"{i}_prompt.wav", self._codec.decode(batch["prompt"][i, : batch["prompt_len"][i]]))
        log.info("eval audio at step %d: %d samples in %s (%.1f s)", step, n, folder, time.perf_counter() - t0)


def train(config, workdir: str | Path, commands: str = "auto") -> int:
    return Trainer(config, workdir, commands).run()
