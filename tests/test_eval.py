"""`deltalearn eval`: loss, perplexity and bits per byte equal a loss computed here directly, and
the bytes behind the scored tokens are exact (`deltalearn.data.textbytes`).

Bits per byte = Σ NLL of the scored targets (nats) / ln 2 / UTF-8 bytes of the text they spell;
eos (after every document) is scored and stands for 0 bytes; the scored targets are
`tokens[1 : windows·seq_len + 1]` of the evaluation windows.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_config

from deltalearn.cli import main
from deltalearn.data.textbytes import eval_window_count, scored_bytes, token_byte_lengths
from deltalearn.errors import DataError

TEXT = "ROMEO: naïve café — 日本語 🎉 over the hill\nJULIET: Ça va? «oui» ½ ∑ of all things\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from deltalearn.train.trainer import train

    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(root / "run", root / "cache", steps=2, eval_interval=2)
    train(cfg)
    return root


def direct(run_dir, tokens: np.ndarray, batch: int, max_batches: int) -> dict[str, float]:
    """NLL summed window by window with the saved model, and the UTF-8 bytes of the targets
    decoded back to text (special tokens dropped): no code of `deltalearn.eval`."""
    from deltalearn.models import DeltaLM
    from deltalearn.train.runs import load_run

    cfg = load_run(run_dir).config
    L = cfg.run.seq_len
    model = DeltaLM.from_pretrained(run_dir / "model").eval()
    windows = min((len(tokens) - 1) // L, batch * max_batches)
    nll, targets = 0.0, []
    with torch.no_grad():
        for i in range(windows):
            x = torch.as_tensor(np.asarray(tokens[i * L : (i + 1) * L], dtype=np.int64))
            y = torch.as_tensor(np.asarray(tokens[i * L + 1 : (i + 1) * L + 1], dtype=np.int64))
            logits = model(x[None]).logits[0]
            nll += F.cross_entropy(logits.double(), y, reduction="sum").item()
            targets += y.tolist()
    tokenizer = load_run(run_dir).tokenizer.backend_tokenizer
    text = tokenizer.decode(targets, skip_special_tokens=True)
    n_bytes = len(text.encode("utf-8"))
    return {
        "val_loss": nll / len(targets),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "tokens": len(targets),
        "bytes": n_bytes,
    }


def check_against_direct(result: dict, want: dict) -> None:
    assert result["tokens"] == want["tokens"] and result["bytes"] == want["bytes"]
    assert result["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(want["val_loss"]), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)


def test_eval_json_equals_a_direct_loss_on_the_runs_split(run, tmp_path, capsys):
    from deltalearn.train.build import prepare_data
    from deltalearn.train.runs import load_run

    out = tmp_path / "eval.json"
    argv = ["eval", str(run / "run"), "--batch-size", "3", "--max-batches", "2"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    tokens = prepare_data(load_run(run / "run").config, progress=False).tokens("val")
    check_against_direct(result, direct(run / "run", tokens, 3, 2))
    assert result["tokens"] == 6 * 32 and result["batches"] == 2
    # bpb and loss per token differ exactly by the tokens-per-byte ratio
    ratio = result["tokens"] / result["bytes"] / math.log(2)
    assert result["bits_per_byte"] == pytest.approx(result["val_loss"] * ratio, rel=1e-12)


def test_eval_on_another_corpus_with_multibyte_text(run, tmp_path, capsys):
    """A file with accents, CJK and an emoji: tokens split characters between them and between
    windows, and the bytes still come out exact."""
    from deltalearn.eval.perplexity import encode_val_split
    from deltalearn.train.runs import load_run

    other = tmp_path / "other.txt"
    other.write_text(TEXT * 200, encoding="utf-8")
    argv = ["eval", str(run / "run"), "--data", str(other), "--batch-size", "2"]
    assert main([*argv, "--max-batches", "3", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokens = encode_val_split(str(other), load_run(run / "run").tokenizer)
    assert result["data"] == str(other)
    check_against_direct(result, direct(run / "run", tokens, 2, 3))


def test_eval_shows_a_progress_bar_unless_asked_not_to(run, capsys):
    argv = ["eval", str(run / "run"), "--batch-size", "2", "--max-batches", "2"]
    assert main(argv) == 0
    assert "eval" in capsys.readouterr().err
    assert main([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_json_into_a_folder_is_a_one_line_error_before_evaluating(run, tmp_path, capsys):
    assert main(["eval", str(run / "run"), "--json", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltalearn: error: --json file")
    assert captured.out == ""  # nothing evaluated
    missing = tmp_path / "no" / "such" / "eval.json"
    assert main(["eval", str(run / "run"), "--json", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_byte_lengths_sum_to_the_utf8_bytes_of_any_text(run):
    from deltalearn.train.runs import load_run

    tokenizer = load_run(run / "run").tokenizer
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert len(ids) > len(TEXT.encode()) / 4  # a 300-token BPE splits the multi-byte characters
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    assert lengths[tokenizer.eos_token_id] == 0
    # The whole prepared validation split: the data layer's own count of its documents' bytes.
    from deltalearn.train.build import prepare_data

    data = prepare_data(load_run(run / "run").config, progress=False)
    val = data.tokens("val")
    assert (
        int(lengths[np.asarray(val, dtype=np.int64)].sum()) == data.meta["splits"]["val"]["bytes"]
    )


def test_scored_bytes_counts_exactly_the_targets_of_the_windows():
    lengths = np.arange(10, dtype=np.int64)  # id i stands for i bytes
    tokens = np.array([9, 1, 2, 3, 4, 5, 6, 7, 0, 8], dtype=np.uint16)  # 10 ids
    assert eval_window_count(len(tokens), 4, 1, None) == 2  # (10 - 1) // 4
    assert eval_window_count(len(tokens), 4, 1, 1) == 1
    assert scored_bytes(tokens, lengths, 4, 2) == sum(range(1, 8)) + 0  # ids 1..7, 0 (not 9)
    assert scored_bytes(tokens, lengths, 4, 1) == 1 + 2 + 3 + 4
    with pytest.raises(DataError, match="3 windows"):
        scored_bytes(tokens, lengths, 4, 3)
    with pytest.raises(DataError, match="token id 7 "):  # the largest scored id (9 is context only)
        scored_bytes(tokens, lengths[:5], 4, 2)


def test_a_tokenizer_that_is_not_byte_level_has_no_bits_per_byte():
    from tokenizers import Tokenizer, decoders, models

    from deltalearn.eval.perplexity import evaluate_tokens

    word_level = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, "[UNK]"))
    with pytest.raises(DataError, match="not ByteLevel"):
        token_byte_lengths(word_level)
    byte_level = Tokenizer(models.WordLevel({"hello": 0, "日本": 1, "[UNK]": 2}, "[UNK]"))
    byte_level.decoder = decoders.ByteLevel()  # but an entry that is not byte-level text
    with pytest.raises(DataError, match="not byte-level"):
        token_byte_lengths(byte_level)

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return type("Out", (), {"logits": torch.zeros(*x.shape, 3)})()

    tokens = np.array([0, 1, 2, 0, 1], dtype=np.int64)
    result = evaluate_tokens(Tiny(), tokens, word_level, 2, 4, None, torch.device("cpu"))
    assert result["bits_per_byte"] is None and result["bytes"] is None
    assert result["val_loss"] == pytest.approx(math.log(3)) and result["tokens"] == 4
