"""Errors a user can cause (bad config, bad checkpoint, diverged run).

The command line prints them as one line and exits; everything else is a bug and keeps its
traceback.
"""

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError", "UserError"]


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type, or a resume with a different config."""


class CheckpointError(UserError):
    """A corrupt, truncated or missing checkpoint; the message names the file."""


class NonFiniteLossError(UserError):
    """The loss or gradient became NaN/inf; the message names the step."""
