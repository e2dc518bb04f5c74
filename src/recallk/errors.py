"""Exception types for problems the user can fix (bad config, bad paths, missing weights).

The command line prints these as one line and exits with status 2; anything else is treated as an internal error.
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
