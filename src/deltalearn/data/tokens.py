"""Token files: documents → token ids → one raw binary array on disk.

A token file holds the ids of every document of a split, each document followed by the eos id,
as raw values of one dtype in native byte order (no header: `np.memmap` maps it directly; dtype
and length live in the preparation's meta.json). Encoding streams: batches of documents go
through the tokenizer's Rust encoder and straight to the file, so memory stays bounded whatever
the corpus size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from deltalearn.errors import DataError

_ENCODE_BATCH_CHARS = 4_000_000  # documents per encode_batch call, by size: bounds memory
_CHUNK_CHARS = 1_000_000  # longer documents are encoded in pieces cut at line ends


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab < 65536), else uint32: halves the files of small vocabs."""
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of about `_CHUNK_CHARS`, cut after a newline (bounds encoder memory).

    Byte-level BPE never merges across a line end that is followed by text, so the cuts hardly
    ever change the ids."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        cut = text.rfind("\n", start, start + _CHUNK_CHARS) + 1
        if cut <= start:
            cut = start + _CHUNK_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def _batches(texts: Iterable[str]) -> Iterator[list[list[str]]]:
    """Group documents (each as its list of pieces) into batches of about `_ENCODE_BATCH_CHARS`."""
    batch: list[list[str]] = []
    size = 0
    for text in texts:
        batch.append(list(_pieces(text)))
        size += len(text)
        if size >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_token_file(
    tokenizer: Tokenizer,
    texts: Iterable[str],
    path: Path,
    *,
    dtype: np.dtype,
    eos_id: int,
    total_chars: int,
    desc: str,
    progress: bool,
) -> int:
    """Encode each document, append `eos_id` after it, and stream the ids to `path` as raw
    `dtype` values. Returns the number of ids written."""
    count = 0
    with (
        path.open("wb") as out,
        tqdm(
            total=total_chars, desc=desc, unit="char", unit_scale=True, disable=not progress
        ) as bar,
    ):
        for batch in _batches(texts):
            flat = [piece for pieces in batch for piece in pieces]
            encodings = tokenizer.encode_batch_fast(flat, add_special_tokens=False)
            ids: list[int] = []
            position = 0
            for pieces in batch:
                for encoding in encodings[position : position + len(pieces)]:
                    ids.extend(encoding.ids)
                ids.append(eos_id)
                position += len(pieces)
            array = np.asarray(ids, dtype=np.int64)
            if array.size and int(array.max()) > np.iinfo(dtype).max:
                raise DataError(f"token id {int(array.max())} does not fit {dtype}")
            out.write(array.astype(dtype).tobytes())
            count += array.size
            bar.update(sum(len(piece) for piece in flat))
    return count
