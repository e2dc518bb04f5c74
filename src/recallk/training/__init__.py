"""Training: the multistage large-batch engine, BatchNorm freezing, multi-process helpers and the trainer."""

from recallk.training.batchnorm import freeze_batchnorm, is_frozen_batchnorm
from recallk.training.multistage import multistage_backward

__all__ = ["freeze_batchnorm", "is_frozen_batchnorm", "multistage_backward"]
