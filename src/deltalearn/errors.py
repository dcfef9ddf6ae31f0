"""The errors a user can cause, for every layer of the package (the bottom of the import graph).

A `UserError` is bad input: a wrong path, a corrupt file, a bad config value, a diverged run. Its
message is one line that names the bad value and what was expected, so the command line prints it
without a traceback. Every other exception is a bug and keeps its traceback.
"""

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NonFiniteLossError",
    "UserError",
]


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type or range, or a resume with another config."""


class CheckpointError(UserError):
    """A corrupt, truncated or missing checkpoint or weights file; the message names the file."""


class DataError(UserError):
    """A mistake in the data configuration: a missing path, an empty corpus, an unknown source, a
    corpus too small for the requested windows, a bad split name or fraction, a corrupt token cache."""


class NonFiniteLossError(UserError):
    """The loss or gradient became NaN/inf; the message names the step."""
