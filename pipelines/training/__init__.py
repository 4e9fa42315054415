"""The training loop: plan, batches, trainer, its checkpoints, metrics and preemption."""
