"""Token files: ids and eos per document, dtype, and chunked encoding of long documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deltalearn.data import tokens
from deltalearn.data.tokenizer import train_bpe

DOC = "\n".join(
    f"FIRST CITIZEN: Before we proceed any further, hear me speak. {i}" for i in range(60)
)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([DOC], 320)


def _write(bpe, texts, path: Path, dtype=np.uint16) -> np.ndarray:
    count = tokens.write_token_file(
        bpe, texts, path, dtype=np.dtype(dtype), eos_id=0, total_chars=1, desc="", progress=False
    )
    ids = np.fromfile(path, dtype=dtype)
    assert len(ids) == count
    return ids


def test_documents_are_followed_by_eos(bpe, tmp_path: Path):
    ids = _write(bpe, ["hear me", "speak"], tmp_path / "a.bin")
    expected = bpe.encode("hear me").ids + [0] + bpe.encode("speak").ids + [0]
    assert ids.tolist() == expected


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(bpe, tmp_path: Path, monkeypatch):
    whole = _write(bpe, [DOC], tmp_path / "whole.bin")
    monkeypatch.setattr(tokens, "_CHUNK_CHARS", 500)
    monkeypatch.setattr(tokens, "_ENCODE_BATCH_CHARS", 700)
    assert len(list(tokens._pieces(DOC))) > 5
    assert "".join(tokens._pieces(DOC)) == DOC
    pieces = _write(bpe, [DOC, DOC], tmp_path / "pieces.bin")
    assert pieces.tolist() == whole.tolist() * 2


def test_dtype_follows_vocab_size():
    assert tokens.token_dtype(65535) == np.uint16
    assert tokens.token_dtype(65536) == np.uint32
    assert tokens.token_dtype(50257) == np.uint16
