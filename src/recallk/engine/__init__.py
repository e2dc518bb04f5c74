"""The paper's large-batch engine, usable without the trainer: multistage backward, multi-process helpers (and the
one device choice), BatchNorm freezing."""

from recallk.engine.batchnorm import freeze_batchnorm, is_frozen_batchnorm
from recallk.engine.multistage import multistage_backward

__all__ = ["freeze_batchnorm", "is_frozen_batchnorm", "multistage_backward"]
