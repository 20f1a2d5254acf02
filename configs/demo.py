"""Quick-start preset (`make demo`): the tiny model on the demo corpus built by tools.demo.

python -m valle_jax.train --config configs/demo.py --workdir demo_out/run
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.store = "demo_out/store"
    c.data.batch_size = 8
    c.data.sample_type = "speaker"
    c.data.prompt_duration = 2.0  # seconds
    c.data.duration_range = (0.5, 12.0)  # seconds
    c.data.text_buckets = (48, 96, 160)  # phoneme ids
    c.data.resp_buckets = (225, 375, 600, 900)  # frames
    c.model.size = "tiny"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20  # optimizer steps
    c.train.steps = 200  # a few minutes on a laptop CPU
    c.train.log_every = 20
    c.train.save_every = 100
    c.train.eval_every = 100
    c.train.eval_batches = 2
    c.train.eval_audio = 2  # synthesised validation samples in demo_out/run/samples/STEP/
    return c
