"""Training: mesh and shardings, optimizers, the jitted step, checkpoints, the loop's helpers."""
