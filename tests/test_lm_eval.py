"""lm-evaluation-harness on a tiny trained run: its `hf` model (DeltaLM registered, no remote code)
gives the same log-likelihoods, rolling log-likelihoods and greedy continuations as a direct
computation with the model; `deltalearn lm-eval` passes lm-eval's flags through; `deltalearn eval
--tasks` writes a table. The local tasks in tests/lm_eval_tasks need no network."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_train_args

from deltalearn.cli import main
from deltalearn.lm_eval import main as lm_eval_main
from deltalearn.lm_eval import map_run_folders
from deltalearn.models import DeltaLM

lm_eval = pytest.importorskip("lm_eval")

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
SEQ_LEN = 128  # the model's max_seq_len: every request below fits in one window
ATOL = 1e-4  # fp32 round-off between a padded batch and one unpadded sequence (sums of ~40 terms)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network: the Hub and datasets see offline mode (env for subprocesses, flags in-process)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A ddl-cc run of 30 steps (2 layers, d = 32, vocab 300, sequences of 128 tokens)."""
    root = tmp_path_factory.mktemp("lm_eval")
    args = tiny_train_args(root / "run", root / "cache", "--seq-len", str(SEQ_LEN), steps=30)
    assert main(args) == 0
    return root / "run"


@pytest.fixture(scope="module")
def direct(run_dir):
    """The run's model and tokenizer, loaded without lm-eval, for the direct computations."""
    from deltalearn.train.runs import load_run

    run = load_run(run_dir)
    return run.model, run.tokenizer


def evaluate(run_dir, tasks, batch_size, **kwargs):
    """lm-eval's Python API with its own `hf` model loaded from RUN/model by path."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(run_dir / "model"), "device": "cpu", "dtype": "float32"},
        tasks=tasks,
        batch_size=batch_size,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True,
        **kwargs,
    )


@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 .. len-1, from one unpadded forward."""
    logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The token split lm-eval documents for causal models: trailing spaces of the context move
    to the continuation; the whole string is encoded and cut after the context's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


def test_loglikelihoods_equal_a_direct_computation(run_dir, direct):
    model, tok = direct
    out = evaluate(run_dir, ["ddl_tiny_mc", "ddl_tiny_rolling"], batch_size=4, num_fewshot=1)
    checked = 0
    for sample in out["samples"]["ddl_tiny_mc"]:  # one loglikelihood request per choice
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ll, is_greedy = resp[0]
            ctx, cont = encode_pair(tok, context, continuation)
            assert len(ctx) + len(cont) <= SEQ_LEN  # no truncation by lm-eval
            lp = token_logprobs(model, ctx + cont)[-len(cont) :]
            assert ll == pytest.approx(float(lp.sum()), abs=ATOL)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
            assert is_greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
            checked += 1
    assert checked == 8 * 3
    shot = sample["arguments"][0][0].split("\n\n")[0]  # the 1-shot example, from the train split
    assert shot in ("The lady doth protest too much", "Speak, my lord")
    for sample in out["samples"]["ddl_tiny_rolling"]:  # the whole text after the eos token
        (text,) = sample["arguments"][0]
        ids = [tok.eos_token_id, *tok.encode(text)]
        assert len(ids) <= SEQ_LEN  # one window
        assert sample["resps"][0][0] == pytest.approx(
            float(token_logprobs(model, ids).sum()), abs=ATOL
        )
    metrics = {**out["results"]["ddl_tiny_mc"], **out["results"]["ddl_tiny_rolling"]}
    for key in ("acc,none", "acc_norm,none", "word_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(metrics[key]), key


def test_generate_until_steps_equal_a_direct_computation(run_dir, direct, monkeypatch):
    """lm-eval left-pads prompts of different lengths into one batch and calls `generate` with
    the attention mask and a cache. Every step's next-token logits of every row equal one
    unpadded, uncached forward of that row's tokens so far, and the continuations equal those
    of batch size 1."""
    model, tok = direct
    calls = []
    real_forward = DeltaLM.forward

    @functools.wraps(real_forward)  # same signature: `generate` inspects it
    def spy(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        calls.append((ids.clone(), None if mask is None else mask.clone(), out.logits[:, -1]))
        return out

    monkeypatch.setattr(DeltaLM, "forward", spy)
    batched = evaluate(run_dir, ["ddl_tiny_gen"], batch_size=4)["samples"]["ddl_tiny_gen"]
    monkeypatch.setattr(DeltaLM, "forward", real_forward)

    prefills = [i for i, (ids, _, _) in enumerate(calls) if ids.shape[1] > 1]
    assert len(prefills) == 2  # 5 prompts: a batch of 4, then 1
    first_ids, first_mask, _ = calls[0]
    assert first_ids.shape[0] == 4 and first_mask is not None
    assert (first_mask == 0).any() and (first_mask.cummax(1).values == first_mask).all()  # left
    assert all(m is not None for _, m, _ in calls[: prefills[1]])  # the mask at every step
    rows: list[list[int]] = []
    checked = 0
    for ids, mask, last in calls:
        if ids.shape[1] > 1:  # a prefill: each row's real tokens (no mask: no padding)
            mask = torch.ones_like(ids) if mask is None else mask
            rows = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
        else:  # one new token per row, through the cache
            assert mask is None or (mask[:, -1] == 1).all()
            rows = [r + [int(t)] for r, t in zip(rows, ids[:, 0], strict=True)]
        for row, got in zip(rows, last, strict=True):
            with torch.no_grad():
                want = model(torch.tensor([row])).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
            checked += 1
    assert checked >= 5 * 2  # every row, at least two steps each

    single = evaluate(run_dir, ["ddl_tiny_gen"], batch_size=1)["samples"]["ddl_tiny_gen"]
    assert [b["resps"] for b in batched] == [s["resps"] for s in single]
    assert [b["doc"] for b in batched] == [s["doc"] for s in single]


def test_run_folder_is_read_as_its_model(run_dir):
    model = str(run_dir / "model")
    argv = ["--model", "hf", "--model_args", f"pretrained={run_dir},dtype=float32", "x=1"]
    assert map_run_folders(argv) == [
        "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "x=1",
    ]  # fmt: skip
    assert map_run_folders([f"--model_args=tokenizer={run_dir}"]) == [
        f"--model_args=tokenizer={model}"
    ]
    as_json = map_run_folders(["-a", json.dumps({"pretrained": str(run_dir), "dtype": "auto"})])
    assert json.loads(as_json[1]) == {"pretrained": model, "dtype": "auto"}
    untouched = [
        "--model_args", f"pretrained={model}", "pretrained=gpt2", "--tasks", f"pretrained={run_dir}",
    ]  # fmt: skip
    assert map_run_folders(untouched) == untouched  # a model folder, a Hub id, another flag


def test_lm_eval_command_passes_its_arguments_through(monkeypatch, capsys):
    """Everything after `lm-eval` reaches lm-eval's own parser (here: its --help, exit 0)."""
    import lm_eval.utils

    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", True)  # no handler on pytest's stderr
    assert main(["lm-eval", "--help"]) == 0
    assert "lm-eval" in capsys.readouterr().out
    assert main(["lm-eval", "run", "--help"]) == 0
    assert "--include_path" in capsys.readouterr().out
    assert main(["lm-eval", "run", "--no-such-flag"]) == 2  # lm-eval's parser error, its status
    assert "--no-such-flag" in capsys.readouterr().err
    assert lm_eval_main(["ls", "--help"]) == 0  # `python -m deltalearn.lm_eval` runs the same
    assert "tasks" in capsys.readouterr().out
    assert sys.argv[0] != "lm-eval"  # restored


def test_deltalearn_lm_eval_command_on_a_trained_run(run_dir, tmp_path):
    """The issue's command in a fresh process (the registration happens in lm-eval's process),
    from another working folder (the task YAMLs find their data relative to themselves)."""
    out = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "deltalearn.cli", "lm-eval", "--model", "hf",
        "--model_args", f"pretrained={run_dir / 'model'}", "--tasks", "ddl_tiny_mc",
        "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "4",
        "--num_fewshot", "1", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acc_norm" in proc.stdout  # lm-eval's own table
    (results,) = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["n-shot"]["ddl_tiny_mc"] == 1
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= data["results"]["ddl_tiny_mc"][key] <= 1.0


def test_eval_tasks_writes_a_table(run_dir, tmp_path, capsys):
    argv = [
        "eval", str(run_dir), "--tasks", "ddl_tiny_mc,ddl_tiny_rolling",
        "--include-path", str(TASKS_DIR), "--num-fewshot", "0", "--batch-size", "4",
        "--device", "cpu", "--json", str(tmp_path / "copy.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((run_dir / "eval" / "lm_eval.json").read_text())
    table = (run_dir / "eval" / "lm_eval.md").read_text()
    assert json.loads((tmp_path / "copy.json").read_text()) == report  # --json: the same report
    assert table in printed
    rows = {(r["task"], r["shots"], r["metric"]): r["value"] for r in report["rows"]}
    assert {("ddl_tiny_mc", 0, "acc"), ("ddl_tiny_rolling", 0, "bits_per_byte")} <= set(rows)
    assert all(v is not None and math.isfinite(v) for v in rows.values())
    assert f"| ddl_tiny_mc | 0 | acc | none | {rows['ddl_tiny_mc', 0, 'acc']:.4f} |" in table
    (acc,) = [a for a in report["averages"] if a["metric"] == "acc"]
    assert acc["tasks"] == 1 and acc["value"] == rows["ddl_tiny_mc", 0, "acc"]


def test_paper_suite_is_named_once():
    from deltalearn.eval.tasks import PAPER_SHOTS, PAPER_TASKS, resolve_task_names

    assert len(PAPER_TASKS) == 8 and PAPER_SHOTS == (0, 1)
    assert resolve_task_names("paper") == list(PAPER_TASKS)
    assert resolve_task_names("piqa, paper,x") == [
        "piqa",
        *[t for t in PAPER_TASKS if t != "piqa"],
        "x",
    ]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltalearn: error: "), err
    return err[0]


def test_eval_tasks_user_errors(run_dir, tmp_path, capsys):
    base = ["eval", str(run_dir), "--device", "cpu"]
    err = one_line_error(
        capsys, [*base, "--tasks", "no_such_task", "--include-path", str(TASKS_DIR)]
    )
    assert "unknown lm-eval task no_such_task" in err
    err = one_line_error(capsys, [*base, "--tasks", ",", "--include-path", str(TASKS_DIR)])
    assert "--tasks expects" in err
    err = one_line_error(
        capsys, [*base, "--tasks", "ddl_tiny_mc", "--include-path", str(tmp_path / "x")]
    )
    assert "not a folder" in err
    err = one_line_error(capsys, [*base, "--tasks", "ddl_tiny_mc", "--num-fewshot", "-1"])
    assert "--num-fewshot must be an integer >= 0, got -1" in err
    # a Hub dataset while offline (the paper's tasks on a machine without network)
    (tmp_path / "hub.yaml").write_text(
        "task: ddl_hub_task\ndataset_path: deltalearn-tests/no-such-dataset\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n"
    )
    err = one_line_error(
        capsys, [*base, "--tasks", "ddl_hub_task", "--include-path", str(tmp_path)]
    )
    assert "could not load the data of ddl_hub_task" in err and "network" in err
