"""Nothing half-written: summary.json, config.yaml and the truncated log are replaced atomically,
and a torn summary.json does not mark a run finished."""

import json
import os

import pytest
from train_helpers import crash_halfway_writing, tiny_config

from deltalearn.atomic import atomic_write_bytes, atomic_write_text
from deltalearn.experiments.compare import _finished
from deltalearn.train.config import config_diff, load_config
from deltalearn.train.logging import read_log
from deltalearn.train.trainer import read_summary, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two ü")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert path.read_text(encoding="utf-8") == "two ü"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "f.txt"]


def test_atomic_write_crash_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old contents")
    crash_halfway_writing(monkeypatch, "f.txt")
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(path, "new contents, much longer than the old ones")
    monkeypatch.undo()
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # the temp file is gone


def test_atomic_write_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def no_replace(src, dst):
        raise OSError("simulated: rename failed")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_crash_writing_summary_leaves_run_unfinished(tmp_path, cache, monkeypatch):
    cfg = tiny_config(tmp_path / "run", cache, steps=2)
    crash_halfway_writing(monkeypatch, "summary.json")
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "summary.json").exists()  # no torn marker
    assert not _finished(cfg)  # compare trains it again
    result = train(tiny_config(tmp_path / "run", cache, steps=2), resume=True)
    assert result.status == "finished" and _finished(cfg)
    assert read_summary(tmp_path / "run")["step"] == 2


def test_torn_or_incomplete_summary_is_not_finished(tmp_path, cache):
    cfg = tiny_config(tmp_path / "run", cache, steps=2)
    train(cfg)
    summary = tmp_path / "run" / "summary.json"
    whole = summary.read_text()
    assert _finished(cfg)
    summary.write_text(whole[: len(whole) // 2])  # torn
    assert not _finished(cfg) and read_summary(tmp_path / "run") is None
    data = json.loads(whole)
    del data["peak_memory_mb"]  # valid JSON, but not all of it
    summary.write_text(json.dumps(data))
    assert not _finished(cfg)
    summary.write_text(json.dumps({**json.loads(whole), "status": "stopped"}))
    assert not _finished(cfg)


def test_crash_writing_config_keeps_old_config(tmp_path, cache, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(run, cache, stop_after=2)
    train(cfg)
    before = (run / "config.yaml").read_text()
    crash_halfway_writing(monkeypatch, "config.yaml")
    with pytest.raises(OSError, match="simulated"):
        train(tiny_config(run, cache, log_interval=2), resume=True)  # rewrites config.yaml
    monkeypatch.undo()
    assert (run / "config.yaml").read_text() == before
    assert not config_diff(load_config(run / "config.yaml"), cfg)
    assert [p.name for p in run.iterdir() if "config.yaml" in p.name] == ["config.yaml"]


def test_crash_truncating_log_keeps_old_log(tmp_path, cache, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(run, cache, stop_after=4))
    before = (run / "log.jsonl").read_text()
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3, 4]
    crash_halfway_writing(monkeypatch, "log.jsonl")
    with pytest.raises(OSError, match="simulated"):
        train(tiny_config(run, cache), resume=True)  # truncate_after(4) rewrites the log
    monkeypatch.undo()
    assert (run / "log.jsonl").read_text() == before
    assert [p.name for p in run.iterdir() if "log.jsonl" in p.name] == ["log.jsonl"]
