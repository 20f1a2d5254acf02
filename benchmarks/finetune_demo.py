"""Fine-tuning the demo model on one held-out voice: validation loss before and after, for that voice
and for a voice the fine-tune did not use; a full fine-tune and a LoRA one side by side.

    python benchmarks/finetune_demo.py [--out /tmp/finetune_demo] [--voices 6] [--sentences 10]
        [--base-steps 200] [--steps 100]

Built like `make demo` (tools.make_demo_corpus, a random codec when the pretrained one cannot be
had, quantize, phonemize, pack), then split: voice V is held out of the base training entirely (its
first utterances are the fine-tune set, its last three its validation set); voice W's last three
utterances are held out of the base training and are the "other voice" validation set. The tiny
demo model trains on the rest (configs/demo.py, --base-steps), then fine-tunes from that run with
train.init_from on V alone for --steps steps (learning rate 3e-4), fully and with LoRA rank 16.
Stages already done in --out are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import jax
import numpy as np

from configs import demo
from tools import make_demo_corpus, pack, phonemize, quantize
from tools.common import find_files
from valle_jax.audio import load_audio
from valle_jax.training.loop import Trainer

HELD = 3  # validation utterances per voice


def prepare(out: Path, voices: int, sentences: int) -> dict[str, Path]:
    from valle_jax.codec import Codec, build_random_codec

    corpus = out / "corpus"
    if not (out / "prepared.done").exists():
        make_demo_corpus.build(corpus, voices=voices, sentences=sentences).finish()
        codec_dir = out / "codec"
        if not codec_dir.exists():
            wavs = [load_audio(f) for f in find_files(corpus, (".wav",))[::4][:12]]
            build_random_codec(wavs, codec_dir)
        quantize.quantize_dir(corpus, corpus, Codec.load(codec_dir), progress=False).finish()
        phonemize.phonemize_dir(corpus, corpus, progress=False).finish()
        (out / "prepared.done").write_text("")
    speakers = sorted({p.parent for p in corpus.rglob("*.codes.npy")})
    v, w = speakers[0], speakers[1]
    parts = {"base": out / "split" / "base", "ft": out / "split" / "ft", "v_val": out / "split" / "v_val"}
    parts["w_val"] = out / "split" / "w_val"
    stores = {k: out / "stores" / k for k in parts}
    if all((s / "index.json").exists() for s in stores.values()):
        return stores
    shutil.rmtree(out / "split", ignore_errors=True)
    for spk in speakers:
        ids = sorted({p.name.split(".")[0] for p in spk.iterdir()})
        for i, uid in enumerate(ids):
            if spk == v:
                dest = parts["v_val"] if i >= len(ids) - HELD else parts["ft"]
            elif spk == w and i >= len(ids) - HELD:
                dest = parts["w_val"]
            else:
                dest = parts["base"]
            target = dest / spk.relative_to(corpus)
            target.mkdir(parents=True, exist_ok=True)
            for f in spk.glob(uid + ".*"):
                shutil.copy(f, target / f.name)
    for k, src in parts.items():
        shutil.rmtree(stores[k], ignore_errors=True)
        pack.pack([src], stores[k], progress=False).finish()
    return stores


def config(store: Path, steps: int, **more):
    c = demo.get_config()
    c.data.store = str(store)
    c.data.min_utterances = 1
    c.data.text_buckets = (96,)  # one batch shape: one compile (the demo's utterances are short)
    c.data.resp_buckets = (450,)
    c.data.duration_range = (0.5, 6.0)
    c.train.steps = steps
    c.train.eval_every = 0
    c.train.eval_audio = 0
    c.train.eval_batches = 1
    c.train.save_every = steps
    for key, value in more.items():
        section, *sub, name = key.split(".")
        node = c[section]
        for s in sub:
            node = node[s]
        node[name] = value
    return c


def val_losses(trainer: Trainer, state: dict, stores: dict) -> dict:
    out = {}
    params = trainer.full_params(state)
    for k in ("v_val", "w_val"):
        trainer.evaluate.data_cfg = dataclasses.replace(trainer.evaluate.data_cfg, store=str(stores[k]))
        out[k] = trainer.evaluate(params, 0)["val/loss"]
    return out


def train(trainer: Trainer, steps: int):
    state, data_state, step = trainer.restore_or_init()
    it = trainer.iterator(data_state)
    for _ in range(steps - step):
        batch = trainer.layout.global_batch(next(it))
        state, _ = trainer.compiled(state, batch, np.float32(1.0))
    jax.block_until_ready(state["params"])
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/finetune_demo"))
    p.add_argument("--voices", type=int, default=6)
    p.add_argument("--sentences", type=int, default=10)
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    stores = prepare(args.out, args.voices, args.sentences)
    base_dir = args.out / "base_run"
    base = Trainer(config(stores["base"], args.base_steps), base_dir, commands="off")
    if not base.checkpoints.all_steps():
        state = train(base, args.base_steps)
        base.checkpoints.save(args.base_steps, state, {}, base._meta(args.base_steps))
    base.checkpoints.close()
    rows = []
    for name, more in [("full", {}), ("lora r16", {"model.lora.rank": 16})]:
        workdir = args.out / f"ft_{name.split()[0]}"
        shutil.rmtree(workdir, ignore_errors=True)
        c = config(stores["ft"], args.steps, **{"train.init_from": str(base_dir), "optim.learning_rate": 3e-4})
        c.optim.warmup_steps = 0
        c.data.batch_size = 2  # one voice's few utterances (and its 3 validation ones) fill no batch of 8
        c.model.lora.rank = more.get("model.lora.rank", 0)
        t = Trainer(c, workdir, commands="off")
        before = val_losses(t, t.restore_or_init()[0], stores)
        after = val_losses(t, train(t, args.steps), stores)
        t.checkpoints.close()
        rows.append((name, before, after))
    print(f"demo model ({args.base_steps} steps without voice V), fine-tuned {args.steps} steps on V alone")
    print(f"{'fine-tune':10} {'V before':>9} {'V after':>9} {'W before':>9} {'W after':>9}")
    for name, b, a in rows:
        print(f"{name:10} {b['v_val']:9.4f} {a['v_val']:9.4f} {b['w_val']:9.4f} {a['w_val']:9.4f}")


if __name__ == "__main__":
    main()
