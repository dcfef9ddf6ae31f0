"""Run logs: JSONL fields, TensorBoard mirror, and a torn last line from a crash."""

import json

import pytest

from deltalearn.train.config import TrainConfig
from deltalearn.train.logging import RunLogger, read_log
from deltalearn.train.trainer import train


def test_jsonl_fields_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = TrainConfig()
    cfg.model.variant = "ddl"
    cfg.model.overrides = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16}
    cfg.data.max_chars, cfg.data.vocab_size, cfg.data.cache_dir = 100_000, 300, str(tmp_path / "c")
    r = cfg.run
    r.out, r.steps, r.batch_size, r.seq_len, r.eval_interval, r.eval_batches = (
        str(tmp_path / "run"), 4, 4, 32, 2, 1,
    )  # fmt: skip
    r.progress, r.tensorboard = False, True
    train(cfg)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(key in x for x in log), key
    assert "val_loss" in log[1] and "val_loss" not in log[0]
    assert len(log[1]["beta_mean"]) == 2  # one mean β per layer
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_read_log_skips_torn_line(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "loss": 2.0})
    logger.log({"step": 2, "loss": 1.5})
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]
    logger.truncate_after(1)
    assert (tmp_path / "log.jsonl").read_text() == json.dumps({"step": 1, "loss": 2.0}) + "\n"


def test_log_interval_keeps_keys_and_report_reads_the_run(tmp_path):
    """log_interval 3: a line every 3 steps and at each evaluation, with the same keys as every
    step; tokens/s is measured over the interval. The compare report reads the run."""
    from train_helpers import tiny_config

    from deltalearn.experiments.report import _aggregate, _collect

    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", steps=8, eval_interval=4)
    cfg.run.log_interval = 3
    result = train(cfg)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [x["step"] for x in log] == [3, 4, 6, 8]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(key in x for x in log), key
    assert all(x["tokens_per_s"] > 0 and x["tokens"] == x["step"] * 4 * 32 for x in log)
    assert [("val_loss" in x, "beta_mean" in x) for x in log] == [(False, False), (True, True)] * 2
    per_run, curves = _collect([cfg])
    assert [s for s, _ in curves["ddl-cc"][0]] == [4, 8]
    row = _aggregate(per_run, ["ddl-cc"])[0]
    assert row["val_loss"] == result.val_loss and row["train_tokens_per_s"] > 0


def test_log_has_cumulative_flops_and_val_bpb(tmp_path):
    """Every line carries the run's model FLOPs so far (steps × tokens × FLOPs per token); every
    evaluation also val_bpb, the validation loss in bits per UTF-8 byte of exactly the scored
    targets (counted here by decoding them back to text); summary.json has both FLOP figures."""
    import math

    from train_helpers import tiny_config

    from deltalearn.models import DeltaLM
    from deltalearn.models.flops import flops_per_token
    from deltalearn.train.build import prepare_data
    from deltalearn.train.trainer import read_summary

    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", steps=4, eval_interval=2)
    result = train(cfg)
    run = tmp_path / "run"
    log = read_log(run / "log.jsonl")
    per_token = flops_per_token(DeltaLM.from_pretrained(run / "model").config, 32).train
    assert per_token > 0
    assert [x["flops"] for x in log] == [x["step"] * 4 * 32 * per_token for x in log]

    data = prepare_data(cfg, progress=False)
    val = data.tokens("val")
    windows = min((len(val) - 1) // 32, cfg.run.eval_batches * cfg.run.batch_size)
    targets = [int(t) for t in val[1 : windows * 32 + 1]]
    text = data.load_tokenizer().backend_tokenizer.decode(targets, skip_special_tokens=True)
    tokens_per_byte = len(targets) / len(text.encode("utf-8"))
    evaluated = [x for x in log if "val_loss" in x]
    assert [x["step"] for x in evaluated] == [2, 4]
    for x in evaluated:
        want = x["val_loss"] * tokens_per_byte / math.log(2)
        assert x["val_bpb"] == pytest.approx(want, rel=1e-9)
    assert not any("val_bpb" in x for x in log if "val_loss" not in x)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops_per_token"] == per_token == result.flops_per_token
    assert summary["train_flops"] == log[-1]["flops"] == result.train_flops
    # A summary written before these fields existed still marks a finished run.
    del summary["flops_per_token"], summary["train_flops"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert read_summary(run) is not None
