"""Training runs: the assembly of a config's parts, the trainer, run directories, checkpoints and run evaluation."""
