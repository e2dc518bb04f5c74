"""Exception types for problems the user can fix (bad config, bad paths, missing weights).

The command line prints usage errors as one line and exits with status 2, a diverged training as one line with
status 1 and an interrupted one with status 130; anything else is treated as an internal error.
"""

from __future__ import annotations


class RecallkUsageError(ValueError):
    """Bad input from the user: a wrong argument, path, data layout or setting.

    The message is one line saying what is wrong, where, and how to fix it.
    """


class ConfigError(RecallkUsageError):
    """A configuration file or override is malformed, has an unknown key, a wrong type or an invalid value."""


class PretrainedWeightsError(RecallkUsageError):
    """Pretrained backbone weights were requested but could not be downloaded or loaded."""


class TrainingInterrupted(Exception):
    """Training was stopped by Ctrl-C (SIGINT) or SIGTERM after saving a resumable checkpoint."""

    def __init__(self, run_dir: object, step: int) -> None:
        super().__init__(f"interrupted at step {step}; resume with: recallk train --resume {run_dir}")
        self.run_dir = run_dir


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf (with ``train.nan_policy: stop``); the message names the step."""


class PeerProcessFailed(RuntimeError):
    """Under torchrun, another process of the job died or lost its connection during a collective operation."""
