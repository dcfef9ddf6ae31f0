"""Prepare a corpus once: split it, train/load the tokenizer, write the token ids to disk.

Cache layout (one folder per preparation, under `default_cache_dir()` unless given)::

    <cache_dir>/<corpus>-<tokenizer>-<key>/
        meta.json            written last: its presence marks a finished preparation
        tokenizer/           tokenizer.json + tokenizer_config.json (AutoTokenizer-loadable)
        train.bin, val.bin   raw token ids (see `deltalearn.data.tokens`), dtype/length in meta

`<key>` hashes the corpus identity (name and package version, or path + size + mtime of every
file), the tokenizer kind, vocab size, val_fraction, character limit and `FORMAT_VERSION`, so a
changed input never reuses stale tokens. A preparation is built in a hidden sibling folder and
renamed into place (`os.replace`), so readers never see a half-written one, and two processes that
prepare the same data at once both end up using one finished folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from deltalearn.atomic import atomic_write_text
from deltalearn.data import tokenizer as tok
from deltalearn.data.corpora import Corpus, clean_document, resolve_source
from deltalearn.data.split import check_val_fraction, split_documents
from deltalearn.data.tokens import token_dtype, write_token_file
from deltalearn.errors import DataError
from deltalearn.files import cache_root

FORMAT_VERSION = 1  # bump when the files or their meaning change: old caches are then ignored
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$DELTALEARN_CACHE/data`, else `~/.cache/deltalearn/data` (honouring `$XDG_CACHE_HOME`)."""
    return cache_root() / "data"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    return split


@dataclass(frozen=True)
class PreparedData:
    """A finished preparation on disk (see the module docstring for the layout).

    Attributes:
        root: the cache folder of this preparation.
        source: the source string it was prepared from (e.g. ``"shakespeare"``).
        vocab_size: the tokenizer's vocabulary size; a model's vocabulary must be at least this.
        tokenizer_kind: ``"bpe"`` or ``"gpt2"``.
        eos_token_id: id of ``<|endoftext|>``, which follows every document in the token stream.
    """

    root: Path
    source: str
    vocab_size: int
    tokenizer_kind: str = "bpe"
    eos_token_id: int = 0

    @classmethod
    def open(cls, root: str | Path) -> PreparedData:
        """Reopen a finished preparation from its folder (e.g. a path stored in a checkpoint)."""
        root = Path(root)
        meta = read_meta(root)
        if meta is None:
            raise DataError(f"{root} is not a finished data preparation (no readable {META_FILE})")
        return cls(
            root=root,
            source=meta["source"],
            vocab_size=int(meta["vocab_size"]),
            tokenizer_kind=meta["tokenizer"],
            eos_token_id=int(meta["eos_token_id"]),
        )

    @property
    def tokenizer_dir(self) -> Path:
        """The folder with the Hugging Face tokenizer files."""
        return self.root / TOKENIZER_DIR

    @property
    def meta(self) -> dict[str, Any]:
        """The contents of meta.json: sizes, counts and settings of this preparation."""
        meta = read_meta(self.root)
        if meta is None:
            raise DataError(f"{self.root / META_FILE} is missing or unreadable")
        return meta

    def num_tokens(self, split: str) -> int:
        """Number of token ids in `split` ("train" or "val")."""
        return int(self.meta["splits"][check_split(split)]["tokens"])

    def tokens(self, split: str) -> np.memmap:
        """The token ids of `split` ("train" or "val") as a read-only memory map, shape (N,),
        dtype uint16 (vocab < 65536) or uint32. Every document is followed by `eos_token_id`."""
        meta = self.meta
        info = meta["splits"][check_split(split)]
        dtype, length = np.dtype(meta["dtype"]), int(info["tokens"])
        path = self.root / info["file"]
        problem = _token_file_problem(path, dtype, length, self.eos_token_id)
        if problem:
            raise DataError(f"{problem}; delete {self.root} to prepare it again")
        return np.memmap(path, dtype=dtype, mode="r", shape=(length,))

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer, loaded offline from `tokenizer_dir`."""
        return tok.load_tokenizer(self.tokenizer_dir)

    def save_tokenizer(self, out_dir: str | Path) -> None:
        """Write the tokenizer files into `out_dir`, e.g. beside a model checkpoint, so that
        `AutoTokenizer.from_pretrained(out_dir)` works offline."""
        self.load_tokenizer().save_pretrained(str(out_dir))


def read_meta(root: Path) -> dict[str, Any] | None:
    """meta.json of a finished preparation of this `FORMAT_VERSION`, else None (also when it is
    damaged: not JSON, or without the fields and types that readers rely on)."""
    try:
        meta = json.loads((Path(root) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta if _meta_is_whole(meta) else None


def _meta_is_whole(meta: dict[str, Any]) -> bool:
    """Whether `meta` has every field `PreparedData` reads, with usable types."""

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not (isinstance(meta.get("source"), str) and isinstance(meta.get("tokenizer"), str)):
        return False
    if not (integer(meta.get("vocab_size")) and integer(meta.get("eos_token_id"))):
        return False
    if meta.get("dtype") not in ("uint16", "uint32"):
        return False
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return False
    for split in SPLITS:
        info = splits.get(split)
        if not isinstance(info, dict) or not integer(info.get("tokens")):
            return False
        if info.get("file") != f"{split}.bin":  # never a path that leaves the folder
            return False
    return True


def damage(root: Path) -> str | None:
    """Why the preparation in `root` cannot be used (meta.json missing or damaged, a token file
    of the wrong size, tokenizer files missing or not JSON), or None when it is whole. Cheap:
    reads meta.json and the tokenizer files, and only the sizes of the token files."""
    meta = read_meta(root)
    if meta is None:
        return f"meta file {root / META_FILE}: missing or damaged"
    for split in SPLITS:
        info = meta["splits"][split]
        path, dtype = root / info["file"], np.dtype(meta["dtype"])
        problem = _token_file_problem(path, dtype, info["tokens"], meta["eos_token_id"])
        if problem:
            return problem
    try:
        tok.check_tokenizer_files(root / TOKENIZER_DIR)
    except DataError as e:
        return str(e)
    return None


def _token_file_problem(path: Path, dtype: np.dtype, length: int, eos_id: int) -> str | None:
    """A one-line description of what is wrong with a token file, or None. O(1): the size, and
    the last id, which is always eos (it follows every document) — overwritten bytes of the
    right size are caught with high probability, without reading the whole file."""
    if not path.exists():
        return f"token file {path}: missing"
    if not path.is_file():
        return f"token file {path}: is a folder, expected a file"
    size = path.stat().st_size
    if size != length * dtype.itemsize:
        return (
            f"token file {path}: {size} bytes, expected {length * dtype.itemsize} "
            f"({length} {dtype} tokens); truncated or corrupt"
        )
    if length:
        with path.open("rb") as f:
            f.seek((length - 1) * dtype.itemsize)
            last = int(np.frombuffer(f.read(dtype.itemsize), dtype=dtype)[0])
        if last != eos_id:
            return (
                f"token file {path}: ends with id {last}, not the end-of-text id {eos_id}; corrupt"
            )
    return None


def cache_key(corpus: Corpus, tokenizer: str, vocab_size: int, val_fraction: float) -> str:
    """A short hash of everything that determines the prepared files."""
    settings = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus.identity,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer == "bpe" else tok.GPT2_VOCAB_SIZE,
        "val_fraction": val_fraction,
    }
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def prepare_dataset(
    source: str = "shakespeare",
    cache_dir: str | Path | None = None,
    *,
    vocab_size: int = 8192,
    tokenizer: str = "bpe",
    val_fraction: float = 0.05,
    max_chars: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Split, tokenize and store a corpus, or return the cached result of an earlier call.

    Args:
        source: ``"shakespeare"``, ``"bible"``, a local ``.txt``/``.md``/``.jsonl`` file or a
            folder of them, or ``"hf:NAME[:CONFIG][@SPLIT]"`` (see `deltalearn.data.corpora`).
        cache_dir: parent folder of the preparations; default `default_cache_dir()`.
        vocab_size: BPE vocabulary size (ignored for ``tokenizer="gpt2"``, which has 50257).
        tokenizer: ``"bpe"`` (byte-level BPE trained on the train split only) or ``"gpt2"``.
        val_fraction: share of each document held out for validation, in (0, 0.5]
            (see `deltalearn.data.split`).
        max_chars: use only the first `max_chars` characters of the corpus (quick experiments;
            a Hugging Face dataset is then streamed).
        progress: show tqdm progress bars.

    Returns:
        The `PreparedData` of the finished cache folder. A second call with the same arguments
        (and unchanged input files) only reads meta.json.

    Raises:
        DataError: unknown source or tokenizer, missing path, empty corpus, a split that comes
            out empty, `val_fraction` outside (0, 0.5], bad `vocab_size`.
    """
    val_fraction = check_val_fraction(val_fraction)
    tok.check_tokenizer_args(tokenizer, vocab_size)
    corpus = resolve_source(source, max_chars=max_chars)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_root = cache_root.absolute()  # `root` may be stored in checkpoints and reopened elsewhere
    size_tag = f"{tokenizer}{vocab_size}" if tokenizer == "bpe" else tokenizer
    name = f"{corpus.name}-{size_tag}-{cache_key(corpus, tokenizer, vocab_size, val_fraction)}"
    root = cache_root / name
    _check_cache_root(cache_root)
    if root.exists() or root.is_symlink():
        problem = damage(root)
        if problem is None:
            return PreparedData.open(root)
        if (root / META_FILE).exists():  # finished once, damaged since: say so, then rebuild
            logger.warning("deltalearn: warning: %s; preparing %s again", problem, root)

    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cache folder {cache_root}: cannot create it ({e.strerror})") from None
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=cache_root))
    work.chmod(0o755)  # mkdtemp makes it private; the published cache should be shareable
    try:
        _build(work, corpus, tokenizer, vocab_size, val_fraction, progress)
        _publish(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already when the rename succeeded
    return PreparedData.open(root)


def _check_cache_root(cache_root: Path) -> None:
    """`DataError` when the cache folder, or the nearest of its parents that exists, is a file."""
    existing = cache_root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == cache_root else f" ({existing} is a file)"
        raise DataError(f"cache folder {cache_root}: is a file, expected a folder{where}")


def _publish(work: Path, root: Path) -> None:
    """Rename the finished `work` folder to `root`, atomically, replacing a damaged one."""
    if (root.exists() or root.is_symlink()) and damage(root) is not None:
        # Never finished (a crash before meta.json) or damaged since: move it aside, then delete.
        # The rename is atomic, so readers see the old folder or none, never a half-deleted one.
        trash = root.with_name(f".{root.name}.{os.getpid()}.damaged")
        try:
            os.replace(root, trash)
        except OSError:
            pass  # another process moved it first
        else:
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
    try:
        os.replace(work, root)
    except OSError:
        # Another process published the same preparation first; theirs is as good as ours.
        if damage(root) is not None:
            raise


# ----------------------------------------------------------------------------- building


def _build(
    work: Path,
    corpus: Corpus,
    tokenizer_kind: str,
    vocab_size: int,
    val_fraction: float,
    progress: bool,
) -> None:
    """Write a complete preparation into the empty folder `work`; meta.json last."""
    started = time.perf_counter()
    stats = _write_split_texts(work, corpus, val_fraction, progress)
    text_files = {split: work / f"{split}.text.jsonl" for split in SPLITS}

    if tokenizer_kind == "bpe":
        tokenizer = tok.train_bpe(
            _read_texts(text_files["train"]),
            vocab_size,
            length=stats["train"]["documents"],
            progress=progress,
        )
    else:
        tokenizer = tok.gpt2_tokenizer()
    tok.save_tokenizer(tokenizer, work / TOKENIZER_DIR)
    eos_id = tokenizer.token_to_id(tok.EOS_TOKEN)
    if eos_id is None:  # both tokenizers define it; guards against a future kind that does not
        raise DataError(f"tokenizer {tokenizer_kind!r} has no {tok.EOS_TOKEN} token")
    actual_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(actual_vocab)

    for split in SPLITS:
        stats[split]["file"] = f"{split}.bin"
        stats[split]["tokens"] = write_token_file(
            tokenizer,
            _read_texts(text_files[split]),
            work / f"{split}.bin",
            dtype=dtype,
            eos_id=eos_id,
            total_chars=stats[split]["chars"],
            desc=f"encode {split}",
            progress=progress,
        )
        text_files[split].unlink()  # the ids are the product; counts stay in meta.json

    meta = {
        "format_version": FORMAT_VERSION,
        "source": corpus.source,
        "corpus": corpus.identity,
        "tokenizer": tokenizer_kind,
        "requested_vocab_size": vocab_size if tokenizer_kind == "bpe" else None,
        "vocab_size": actual_vocab,
        "eos_token_id": eos_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": stats,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(work / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _write_split_texts(
    work: Path, corpus: Corpus, val_fraction: float, progress: bool
) -> dict[str, dict[str, Any]]:
    """Stream the corpus once, split every document, and write each split's documents to
    ``<split>.text.jsonl`` (one JSON string per line). Returns per-split document/char/byte counts.

    Raises `DataError` when the corpus has no text, or when a split comes out empty.
    """
    stats = {split: {"documents": 0, "chars": 0, "bytes": 0} for split in SPLITS}
    documents = (clean_document(text) for text in corpus.documents())
    nonempty = (text for text in documents if text)
    bar = tqdm(
        nonempty,
        total=corpus.num_documents,
        desc=f"read {corpus.name}",
        unit="doc",
        disable=not progress,
    )
    with (
        (work / "train.text.jsonl").open("w", encoding="utf-8") as train_file,
        (work / "val.text.jsonl").open("w", encoding="utf-8") as val_file,
    ):
        files = {"train": train_file, "val": val_file}
        for parts in split_documents(bar, val_fraction):
            for split, text in zip(SPLITS, parts, strict=True):
                if not text:
                    continue
                files[split].write(json.dumps(text, ensure_ascii=False) + "\n")
                stats[split]["documents"] += 1
                stats[split]["chars"] += len(text)
                stats[split]["bytes"] += len(text.encode("utf-8"))
    total = stats["train"]["chars"] + stats["val"]["chars"]
    if total == 0:
        raise DataError(f"source {corpus.source!r}: the corpus is empty (no text after stripping)")
    for split in SPLITS:
        if stats[split]["chars"] == 0:
            docs = stats["train"]["documents"] + stats["val"]["documents"]
            raise DataError(
                f"source {corpus.source!r}: too small to split ({total} characters in {docs} "
                f"documents left the {split} split empty at val_fraction={val_fraction}); add text"
            )
    return stats


def _read_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)
