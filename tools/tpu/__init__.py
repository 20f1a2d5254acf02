"""TPU VM pod-slice scripts: `python -m tools.tpu {create,install,launch,logs,stop} --help`."""
