"""Quick-start preset (`make demo`): the demo corpus built by tools.demo.

    python -m tools.draw_batches --config configs/demo.py --config.data.store=demo_out/store
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
    return c
