"""The one exception type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A user mistake in the data configuration: a missing path, an empty corpus, an unknown source,
    a corpus too small for the requested windows, a bad split name or fraction.

    The message is one line and names the offending value (and where it came from), so a CLI can
    print it as is instead of a traceback.
    """
