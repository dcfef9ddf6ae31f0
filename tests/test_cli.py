"""The command line: subcommands, a tiny run end to end, one-line user errors with exit 2."""

import json
import subprocess
import sys

import pytest
from train_helpers import tiny_train_args as tiny_args

from deltalearn.cli import main
from deltalearn.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(tiny_args(root / "run", root / "cache")) == 0
    return root


def one_line_error(capsys, code, argv):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltalearn: error: "), err
    return err[0]


def test_help_lists_all_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "deltalearn.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for name in ("train", "compare", "eval", "generate", "audit", "bench"):
        assert name in out


def test_run_folder_contents(trained):
    from transformers import AutoTokenizer

    from deltalearn.models import DeltaLM

    run = trained / "run"
    for name in ("config.yaml", "log.jsonl", "summary.json", "tokenizer", "model", "checkpoints"):
        assert (run / name).exists(), name
    assert DeltaLM.from_pretrained(run / "model").config.num_layers == 2
    assert AutoTokenizer.from_pretrained(run / "model")("ROMEO:").input_ids
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 6


def test_generate(trained, capsys):
    args = ["generate", str(trained / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "5"]
    assert main([*args, "--greedy"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:")
    assert main([*args, "--greedy"]) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic
    assert main([*args, "--temperature", "0.9", "--top-k", "5"]) == 0


def test_eval_and_audit(trained, capsys):
    assert main(["eval", str(trained / "run"), "--max-batches", "2", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["val_loss"] < 10 and result["perplexity"] > 1
    other = trained / "other.txt"
    other.write_text("ROMEO: Hello there, good friend.\nJULIET: What light breaks?\n" * 100)
    assert main(["eval", str(trained / "run"), "--data", str(other), "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(other)  # with the run's tokenizer
    assert main(["audit", str(trained / "run"), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "attn" in out and "mlp" in out
    audit = json.loads((trained / "run" / "audit" / "audit.json").read_text())
    assert len(audit["layers"]) == 4  # 2 layers × (attention, MLP)
    assert all(0 < r["beta_mean"] < 2 for r in audit["layers"])


def test_user_errors_exit_2_with_one_line(trained, tmp_path, capsys):
    cache = trained / "cache"
    msg = one_line_error(
        capsys, 2, tiny_args(tmp_path / "r1", cache, "--data", str(tmp_path / "missing.txt"))
    )
    assert "missing.txt" in msg
    assert not (tmp_path / "r1").exists()  # nothing written for a bad input
    (tmp_path / "empty.txt").write_text("")
    one_line_error(
        capsys, 2, tiny_args(tmp_path / "r2", cache, "--data", str(tmp_path / "empty.txt"))
    )
    assert "nope" in one_line_error(
        capsys, 2, tiny_args(tmp_path / "r3", cache, "--set", "run.nope=1")
    )
    (tmp_path / "bad.yaml").write_text("optim:\n  lrr: 1\n")
    msg = one_line_error(
        capsys, 2, tiny_args(tmp_path / "r4", cache, "--config", str(tmp_path / "bad.yaml"))
    )
    assert "optim.lrr" in msg
    one_line_error(capsys, 2, ["eval", str(tmp_path / "no-such-run")])
    one_line_error(capsys, 2, tiny_args(trained / "run", cache))  # exists: needs --resume
    msg = one_line_error(capsys, 2, [*tiny_args(trained / "run", cache, "--lr", "0.5"), "--resume"])
    assert "optim.lr" in msg


def test_corrupt_checkpoint_cli(trained, tmp_path, capsys):
    cache = trained / "cache"
    run = tmp_path / "run"
    assert main(tiny_args(run, cache, "--stop-after", "2")) == 0
    capsys.readouterr()
    state = ckpt.latest_checkpoint(run) / ckpt.STATE_FILE
    state.write_bytes(b"garbage")
    msg = one_line_error(capsys, 2, [*tiny_args(run, cache), "--resume"])
    assert str(state) in msg


def test_user_error_in_subprocess_has_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "deltalearn.cli", "train", "--out", str(tmp_path / "r"), "--data",
         str(tmp_path / "missing"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.startswith("deltalearn: error:")


def test_resume_with_only_out_finishes_the_run(trained, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(run, trained / "cache", "--stop-after", "2")) == 0
    assert "--resume" in capsys.readouterr().err
    # Only --out and --resume: every other setting comes from the saved config.yaml
    # (stop_after excepted: it paused the earlier invocation, not the run).
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "finished 6 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setting",
    [
        "run.log_interval=0",
        "run.checkpoint_interval=0",
        "run.eval_batches=0",
        "optim.beta2=1.5",
        "model.overrides.beta_init=x",
    ],
)
def test_bad_config_value_fails_before_data_preparation(tmp_path, capsys, setting):
    cache = tmp_path / "cache"
    msg = one_line_error(capsys, 2, tiny_args(tmp_path / "run", cache, "--set", setting))
    key, value = setting.split("=")
    assert key in msg and value in msg, msg
    assert not cache.exists() or not any(cache.iterdir())  # no data was prepared
    assert not (tmp_path / "run").exists()
