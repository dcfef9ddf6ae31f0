"""Bad paths and damaged files: every command answers with one line naming the file.

One tiny run is trained per module; each test copies its run folder and data cache, damages one
file (truncated to half, emptied, replaced by random bytes or by a folder) and runs a command:
exit status 2, one line ``deltalearn: error: ...`` on stderr naming the file, no traceback, and
nothing written (the run folder and the cache are byte for byte as before). A damaged token
cache is the exception: it is a cache, so it is rebuilt (atomically) and the command succeeds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import tiny_train_args

from deltalearn.cli import main
from deltalearn.train.config import load_config, save_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-files")
    assert main(tiny_train_args(root / "run", root / "cache")) == 0
    return root


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run and its data cache; its config.yaml points at the copies."""
    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copytree(trained / "cache", tmp_path / "cache")
    cfg = load_config(tmp_path / "run" / "config.yaml")
    cfg.run.out, cfg.data.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    return tmp_path / "run"


def damage(path: Path, how: str) -> None:
    if how == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "list":  # parses as YAML/JSON, but not as a mapping
        path.write_text("- a\n- b\n")
    else:
        raise AssertionError(how)


def snapshot(*folders: Path) -> dict[str, tuple[bool, int]]:
    """Every path under ``folders`` (hidden ones too) with its kind and size."""
    return {
        str(p): (p.is_dir(), 0 if p.is_dir() else p.stat().st_size)
        for folder in folders
        for p in sorted(folder.rglob("*"))
    }


def one_line_error(capsys, argv: list[str], *names: object) -> str:
    """Run the command: exit 2 and a single stderr line that names each of ``names``."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("deltalearn: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert not out
    return lines[0]


COMMANDS = {
    "eval": ["eval", "{run}", "--max-batches", "1", "--batch-size", "2", "--no-progress"],
    "generate": ["generate", "{run}", "--max-new-tokens", "2"],
    "audit": ["audit", "{run}", "--max-batches", "1", "--batch-size", "2"],
}


def command(name: str, run: Path) -> list[str]:
    return [arg.replace("{run}", str(run)) for arg in COMMANDS[name]]


RUN_FILES = [
    "config.yaml",
    "model/config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
    "model/tokenizer_config.json",
]
DAMAGES = ["half", "empty", "random", "folder"]


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", RUN_FILES)
def test_damaged_run_file(run: Path, capsys, name: str, how: str, cmd: str):
    path = run / name
    damage(path, how)
    before = snapshot(run, run.parent / "cache")
    one_line_error(capsys, command(cmd, run), path)
    assert snapshot(run, run.parent / "cache") == before  # no audit.json, nothing half-written


@pytest.mark.parametrize("name", ["config.yaml", "model/config.json", "model/tokenizer.json"])
def test_file_that_parses_but_is_not_a_mapping(run: Path, capsys, name: str):
    damage(run / name, "list")
    one_line_error(capsys, command("eval", run), run / name)


def test_run_config_with_a_bad_value(run: Path, capsys):
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("log_interval: 1", "log_interval: 0"))
    msg = one_line_error(capsys, command("generate", run), run / "config.yaml", "run.log_interval")
    assert "got 0" in msg


def test_weights_that_do_not_match_the_model_config(run: Path, capsys):
    config = json.loads((run / "model" / "config.json").read_text())
    config["num_layers"] = 3
    (run / "model" / "config.json").write_text(json.dumps(config))
    msg = one_line_error(capsys, command("eval", run), run / "model" / "model.safetensors")
    assert "missing layers.2." in msg
    config["num_layers"], config["hidden_size"], config["head_dim"] = 2, 64, 32
    (run / "model" / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, command("eval", run), "has shape")
    config["hidden_size"], config["head_dim"], config["beta_init"] = 32, 16, "one"
    (run / "model" / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, command("eval", run), run / "model" / "config.json", "beta_init")


# ----------------------------------------------------------------------------- paths of the wrong kind


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_run_folder_of_the_wrong_kind(run: Path, tmp_path: Path, capsys, cmd: str):
    missing = tmp_path / "no-such-run"
    one_line_error(capsys, command(cmd, missing), missing, "not found")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_line_error(capsys, command(cmd, a_file), a_file, "is a file")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, command(cmd, tmp_path / "empty"), "no config.yaml")
    shutil.rmtree(run / "model")
    (run / "model").write_text("x")
    one_line_error(capsys, command(cmd, run), run / "model", "is a file")
    (run / "model").unlink()
    one_line_error(capsys, command(cmd, run), run / "model", "finish training first")


def test_audit_output_of_the_wrong_kind(run: Path, capsys):
    (run / "audit").write_text("x")
    before = snapshot(run)
    one_line_error(capsys, command("audit", run), run / "audit", "is a file")
    assert snapshot(run) == before


def test_eval_on_a_missing_corpus(run: Path, tmp_path: Path, capsys):
    one_line_error(
        capsys, [*command("eval", run), "--data", str(tmp_path / "gone.txt")], "gone.txt"
    )


@pytest.mark.parametrize("how", ["missing", "folder", "random", "list", "bad-yaml"])
def test_train_config_file(tmp_path: Path, capsys, how: str):
    path = tmp_path / "c.yaml"
    if how == "folder":
        path.mkdir()
    elif how == "bad-yaml":
        path.write_text("run:\n  steps: [1,\n")
    elif how != "missing":
        path.write_text("x")
        damage(path, how)
    cache = tmp_path / "cache"
    one_line_error(capsys, tiny_train_args(tmp_path / "r", cache, "--config", str(path)), path)
    assert not cache.exists() and not (tmp_path / "r").exists()


def test_train_into_paths_of_the_wrong_kind(trained: Path, tmp_path: Path, capsys):
    cache = trained / "cache"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_line_error(capsys, tiny_train_args(a_file, cache), a_file, "is a file")
    one_line_error(capsys, tiny_train_args(a_file / "run", cache), a_file, "is a file")
    one_line_error(capsys, tiny_train_args(tmp_path / "r", a_file), a_file, "is a file")
    one_line_error(capsys, tiny_train_args(tmp_path / "r", a_file / "c"), a_file, "is a file")
    assert a_file.read_text() == "x" and not (tmp_path / "r").exists()


def test_compare_and_bench_paths_of_the_wrong_kind(tmp_path: Path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    small = ["--steps", "1", "--max-chars", "100000", "--vocab-size", "300", "--no-progress"]
    one_line_error(capsys, ["compare", "--out", str(a_file), *small], a_file, "is a file")
    cache = ["--cache-dir", str(a_file / "cache")]
    one_line_error(capsys, ["compare", "--out", str(tmp_path / "c"), *cache, *small], a_file)
    assert not (tmp_path / "c").exists()
    tiny = ["operator", "--batch", "1", "--seq", "4", "--dim", "4", "--repeats", "1"]
    one_line_error(capsys, ["bench", *tiny, "--json", str(tmp_path)], tmp_path, "is a folder")
    one_line_error(capsys, ["bench", *tiny, "--json", str(a_file / "b.json")], a_file)


# ----------------------------------------------------------------------------- train --resume


@pytest.mark.parametrize("how", [*DAMAGES, "list"])
def test_resume_with_a_damaged_run_config(run: Path, capsys, how: str):
    damage(run / "config.yaml", how)
    before = snapshot(run)
    one_line_error(capsys, ["train", "--out", str(run), "--resume"], run / "config.yaml")
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "name", ["model/model.safetensors", "tokenizer/tokenizer.json", "summary.json", "log.jsonl"]
)
def test_resume_into_a_file_replaced_by_a_folder(run: Path, capsys, name: str):
    damage(run / name, "folder")
    before = snapshot(run, run.parent / "cache")
    one_line_error(capsys, ["train", "--out", str(run), "--resume"], run / name, "is a folder")
    assert snapshot(run, run.parent / "cache") == before


# ----------------------------------------------------------------------------- the token cache


@pytest.fixture(scope="module")
def val_loss(trained: Path) -> float:
    """The run's validation loss with its undamaged cache (read only)."""
    from deltalearn.eval.perplexity import evaluate_run

    return evaluate_run(trained / "run", batch_size=2, max_batches=1)["val_loss"]


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("val.bin", "half"),
        ("train.bin", "random"),
        ("meta.json", "empty"),
        ("tokenizer/tokenizer.json", "folder"),
    ],
)
def test_damaged_token_cache_is_rebuilt(
    run: Path, capsys, caplog, val_loss: float, name: str, how: str
):
    (root,) = (run.parent / "cache").iterdir()
    damage(root / name, how)
    assert main(command("eval", run)) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["val_loss"] == pytest.approx(val_loss) and not err
    if name != "meta.json":  # (an unreadable meta.json: the preparation never finished)
        (warning,) = caplog.messages  # one line naming the file
        assert f"{root / name}" in warning and "preparing" in warning
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary folders left
    assert (root / name).is_file()


def test_user_error_in_a_real_process_has_no_traceback(run: Path):
    weights = run / "model" / "model.safetensors"
    damage(weights, "half")
    done = subprocess.run(
        [sys.executable, "-m", "deltalearn.cli", "eval", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("deltalearn: error: weights file ") and str(weights) in lines[0]
