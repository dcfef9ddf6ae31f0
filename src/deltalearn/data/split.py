"""Train/validation split of a corpus, decided per document.

The rule (the README quotes it):

    Each document longer than ``MIN_SPLIT_CHARS`` characters (a Shakespeare play, a Bible book, a
    local file) gives its last ``val_fraction`` (default 5%) of characters, cut at a line boundary,
    to validation and the rest to training; shorter documents are kept whole, and a
    ``val_fraction`` share of them (the 20th, 40th, ... short document at the default) goes to
    validation.

Why per document: every play (book, file) is represented in both splits, so the validation loss
measures the same mix of styles as training, and the split never depends on the order in which
documents were listed. Why the tail of a document and not random lines: neighbouring lines are
near-copies of each other (the same speaker, the same verse form); a contiguous held-out tail keeps
validation text unseen. Short documents (for example a Hugging Face dataset of many short stories)
cannot be cut sensibly, so they are assigned whole, and the assignment depends only on their
position among the short documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from deltalearn.errors import DataError

MIN_SPLIT_CHARS = 2_000  # below this a document is assigned whole to one split


def check_val_fraction(val_fraction: float) -> float:
    """Return `val_fraction` as a float, or raise `DataError` unless it lies in (0, 0.5]."""
    try:
        value = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(
            f"val_fraction must be a number in (0, 0.5], got {val_fraction!r}"
        ) from None
    if not 0.0 < value <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    return value


def split_point(text: str, val_fraction: float) -> int:
    """Index where the validation tail of `text` starts: at a line boundary near
    `len(text) * (1 - val_fraction)`.

    The cut is the start of the line that holds the target character, so validation gets a little
    more than `val_fraction` rather than less. A document without a usable line break is cut at
    the last space before the target, or at the target itself.
    """
    target = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, target) + 1
    if line_start > 0:
        return line_start
    space = text.rfind(" ", 0, target)
    return space + 1 if space > 0 else target


def split_documents(documents: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """Yield `(train_part, val_part)` for each document (either part may be empty), by the rule in
    this module's docstring. Streams: one document in memory at a time."""
    val_fraction = check_val_fraction(val_fraction)
    short_index = 0
    for text in documents:
        if len(text) >= MIN_SPLIT_CHARS:
            cut = split_point(text, val_fraction)
            yield text[:cut].rstrip("\n"), text[cut:].lstrip("\n")  # blank lines join neither
            continue
        # Every k-th short document goes to validation: the count of validation documents among
        # the first n short ones is floor(n * val_fraction), exact in the limit.
        to_val = int((short_index + 1) * val_fraction) > int(short_index * val_fraction)
        short_index += 1
        yield ("", text) if to_val else (text, "")
