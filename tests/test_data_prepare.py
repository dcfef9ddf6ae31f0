"""prepare_dataset: files on disk, caching, atomic publication, errors; full Shakespeare once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deltalearn.data import DataError, PreparedData, prepare_dataset
from deltalearn.data import prepare as prep
from deltalearn.data import tokenizer as tok

LINES = [
    "KING: Now is the winter of our discontent",
    "QUEEN: Made glorious summer by this sun of York;",
    "FOOL: And all the clouds that lour'd upon our house",
    "KING: In the deep bosom of the ocean buried.",
]


def _write_corpus(folder: Path, files: int = 3, lines: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        body = "\n".join(f"{LINES[(f + i) % len(LINES)]} ({f}.{i})" for i in range(lines))
        (folder / f"doc{f}.txt").write_text(body + "\n")
    return folder


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return _write_corpus(tmp_path / "corpus")


def _prepare(source, cache, **kw) -> PreparedData:
    return prepare_dataset(
        str(source), cache, vocab_size=kw.pop("vocab_size", 300), progress=False, **kw
    )


def test_prepare_writes_memmaps_that_match_meta(corpus: Path, tmp_path: Path):
    data = _prepare(corpus, tmp_path / "cache")
    meta = json.loads((data.root / "meta.json").read_text())
    assert data.source == str(corpus) and data.vocab_size == meta["vocab_size"] <= 300
    assert meta["dtype"] == "uint16" and data.eos_token_id == 0
    for split in ("train", "val"):
        ids = data.tokens(split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and not ids.flags.writeable
        assert len(ids) == meta["splits"][split]["tokens"] == data.num_tokens(split)
        assert int(ids.max()) < data.vocab_size
        assert int((ids == data.eos_token_id).sum()) == 3  # one eos after each document
    assert meta["splits"]["val"]["chars"] / meta["splits"]["train"]["chars"] == pytest.approx(
        0.05, abs=0.02
    )
    # The ids decode back to the split text: documents in order, each followed by eos.
    tokenizer = data.load_tokenizer()
    text = tokenizer.decode(data.tokens("val").tolist())
    assert text.count(tok.EOS_TOKEN) == 3 and "(0.119)" in text and "(0.0)" not in text
    assert not list(data.root.glob("*.jsonl"))  # intermediate text files are removed
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary folders left


def test_second_call_is_cached_and_does_no_work(corpus: Path, tmp_path: Path, monkeypatch):
    first = _prepare(corpus, tmp_path / "cache")
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.root.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a cached preparation was rebuilt")

    monkeypatch.setattr(tok, "train_bpe", fail)
    monkeypatch.setattr(prep, "_build", fail)
    second = _prepare(corpus, tmp_path / "cache")
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.root.iterdir()} == mtimes
    assert PreparedData.open(first.root) == first


def test_cache_key_changes_with_settings_and_input(corpus: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    base = _prepare(corpus, cache)
    assert _prepare(corpus, cache, vocab_size=320).root != base.root
    assert _prepare(corpus, cache, val_fraction=0.1).root != base.root
    (corpus / "doc0.txt").write_text((corpus / "doc0.txt").read_text() + "EXTRA line\n")
    changed = _prepare(corpus, cache)
    assert changed.root != base.root
    assert changed.meta["splits"]["val"]["chars"] > base.meta["splits"]["val"]["chars"]


def test_unfinished_folder_is_rebuilt(corpus: Path, tmp_path: Path):
    data = _prepare(corpus, tmp_path / "cache")
    (data.root / "meta.json").unlink()  # as if a crash happened before the last write
    with pytest.raises(DataError, match="not a finished"):
        PreparedData.open(data.root)
    again = _prepare(corpus, tmp_path / "cache")
    assert again.root == data.root and (again.root / "meta.json").is_file()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DELTALEARN_CACHE", str(tmp_path))
    assert prep.default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("DELTALEARN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prep.default_cache_dir() == tmp_path / "xdg" / "deltalearn" / "data"


def test_save_tokenizer_for_a_checkpoint(corpus: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    data = _prepare(corpus, tmp_path / "cache")
    data.save_tokenizer(tmp_path / "ckpt")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    assert loaded.encode(LINES[0]) == data.load_tokenizer().encode(LINES[0])


def test_gpt2_tokenizer_preparation(corpus: Path, tmp_path: Path):
    data = prepare_dataset(str(corpus), tmp_path / "cache", tokenizer="gpt2", progress=False)
    assert data.vocab_size == 50257 and data.eos_token_id == 50256
    assert data.tokens("train").dtype == np.uint16 and data.tokenizer_kind == "gpt2"
    assert data.root.name.startswith("corpus-gpt2-")


def test_hf_source_goes_through_the_same_path(tmp_path: Path, monkeypatch):
    from deltalearn.data import corpora

    rows = [{"text": f"story number {i}: once upon a time there was a {i}"} for i in range(40)]
    monkeypatch.setattr(corpora, "_load_hf_rows", lambda *args: rows)
    data = prepare_dataset("hf:tiny/stories", tmp_path / "cache", vocab_size=300, progress=False)
    assert data.meta["splits"]["val"]["documents"] == 2  # short documents: every 20th to val
    assert data.tokenizer_kind == "bpe" and data.num_tokens("train") > 0


def test_real_datasets_object_if_installed(tmp_path: Path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from deltalearn.data import corpora

    table = datasets.Dataset.from_dict({"text": [f"line {i} " * 30 for i in range(40)]})
    monkeypatch.setattr(corpora, "_load_hf_rows", lambda *args: table)
    data = prepare_dataset("hf:local/table", tmp_path / "cache", vocab_size=300, progress=False)
    assert data.num_tokens("val") > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, r"val_fraction.*0\.0"),
        ({"val_fraction": 0.75}, r"val_fraction.*0\.75"),
        ({"tokenizer": "sentencepiece"}, "sentencepiece"),
        ({"vocab_size": 10}, "vocab_size.*10"),
    ],
)
def test_bad_arguments(corpus: Path, tmp_path: Path, kwargs, match):
    with pytest.raises(DataError, match=match):
        prepare_dataset(str(corpus), tmp_path / "cache", progress=False, **kwargs)


def test_empty_and_tiny_corpora(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n \n")
    with pytest.raises(DataError, match=r"empty.*corpus is empty"):
        _prepare(empty, tmp_path / "cache")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just one short line.\n")
    with pytest.raises(DataError, match=r"tiny.txt.*too small to split.*20 characters"):
        _prepare(tiny, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # failed preparations leave nothing behind


def test_bad_split_name(corpus: Path, tmp_path: Path):
    data = _prepare(corpus, tmp_path / "cache")
    with pytest.raises(DataError, match="'test'"):
        data.tokens("test")


def test_truncated_bin_file_is_reported(corpus: Path, tmp_path: Path):
    data = _prepare(corpus, tmp_path / "cache")
    path = data.root / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="val.bin"):
        data.tokens("val")


# ----------------------------------------------------------------------------- full corpus


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> PreparedData:
    """The real default preparation, built once per test session (~3 s)."""
    return prepare_dataset("shakespeare", tmp_path_factory.mktemp("cache"), progress=False)


def test_shakespeare_default_preparation(shakespeare: PreparedData):
    meta = shakespeare.meta
    assert shakespeare.vocab_size == 8192 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 38
    train, val = shakespeare.num_tokens("train"), shakespeare.num_tokens("val")
    assert 1_000_000 < train < 2_000_000 and 0.04 < val / (train + val) < 0.07
    assert meta["splits"]["train"]["chars"] / train > 3.0  # BPE compresses ~3.4 chars/token
    tokenizer = shakespeare.load_tokenizer()
    head = tokenizer.decode(shakespeare.tokens("train")[:12].tolist())
    assert head.startswith("THESEUS:\nNow, fair Hippolyta")
    line = "HAMLET:\nTo be, or not to be, that is the question:"
    assert tokenizer.decode(tokenizer.encode(line)) == line


def test_concurrent_preparations_share_one_folder(corpus: Path, tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: _prepare(corpus, cache), range(2))
    assert first == second
    assert [p.name for p in cache.iterdir()] == [first.root.name]  # no temporary folders left
    assert len(first.tokens("train")) == first.num_tokens("train")


# ----------------------------------------------------------------------------- damaged caches


def _damage(path: Path, how: str) -> None:
    if how == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(1001))
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "same-size-garbage":  # the size check alone cannot see it
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    elif how == "json-without-fields":
        path.write_text(json.dumps({"format_version": prep.FORMAT_VERSION}))


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("train.bin", "half"),
        ("val.bin", "empty"),
        ("val.bin", "garbage"),
        ("train.bin", "folder"),
        ("val.bin", "same-size-garbage"),
        ("meta.json", "half"),
        ("meta.json", "garbage"),
        ("meta.json", "folder"),
        ("meta.json", "json-without-fields"),
        ("tokenizer/tokenizer.json", "half"),
        ("tokenizer/tokenizer_config.json", "garbage"),
        ("tokenizer/tokenizer.json", "folder"),
    ],
)
def test_damaged_cache_is_rebuilt_atomically(corpus: Path, tmp_path: Path, caplog, name, how):
    cache = tmp_path / "cache"
    first = _prepare(corpus, cache)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    files.remove(Path("meta.json"))  # holds the preparation time
    original = {f: (first.root / f).read_bytes() for f in files}
    meta = {k: v for k, v in first.meta.items() if k != "seconds"}
    _damage(first.root / name, how)
    again = _prepare(corpus, cache)
    assert again == first
    assert {f: (again.root / f).read_bytes() for f in files} == original  # rebuilt identically
    assert {k: v for k, v in again.meta.items() if k != "seconds"} == meta
    assert [p.name for p in cache.iterdir()] == [first.root.name]  # nothing half-done left over
    assert len(again.tokens("val")) == again.num_tokens("val")
    if name != "meta.json":  # a damaged meta.json is the same as an unfinished preparation
        assert f"{first.root / name}" in caplog.text and "preparing" in caplog.text


@pytest.mark.parametrize("name", ["train.bin", "val.bin"])
def test_damaged_token_file_of_an_open_preparation_is_named(corpus: Path, tmp_path: Path, name):
    data = _prepare(corpus, tmp_path / "cache")
    _damage(data.root / name, "folder")
    with pytest.raises(DataError, match=rf"{data.root / name}: is a folder.*delete"):
        data.tokens(name.removesuffix(".bin"))


def test_damaged_tokenizer_file_is_named(corpus: Path, tmp_path: Path):
    data = _prepare(corpus, tmp_path / "cache")
    path = data.tokenizer_dir / "tokenizer.json"
    _damage(path, "half")
    with pytest.raises(DataError, match=rf"{path}: not valid JSON, truncated or corrupt"):
        data.load_tokenizer()
    _damage(path, "empty")
    with pytest.raises(DataError, match=rf"{path}: empty"):
        data.load_tokenizer()


def test_cache_dir_that_is_a_file(corpus: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for cache in (blocker, blocker / "sub"):
        with pytest.raises(DataError, match=rf"cache folder {cache}: is a file"):
            _prepare(corpus, cache)
