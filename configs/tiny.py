"""Tiny preset for tests: small batches and buckets, fast on a laptop CPU."""

from configs import base


def get_config():
    c = base.get_config()
    c.data.batch_size = 4
    c.data.prompt_duration = 1.0  # seconds
    c.data.duration_range = (0.5, 12.0)  # seconds
    c.data.text_buckets = (32, 64, 128)  # phoneme ids
    c.data.resp_buckets = (150, 300, 450, 900)  # frames
    c.model.size = "tiny"  # d_model 48, 4 heads, 2 layers: the golden files' size
    return c
