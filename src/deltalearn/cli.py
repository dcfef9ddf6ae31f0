"""``deltalearn`` command line: argparse → one library function per subcommand.

User mistakes (bad paths, bad config, corrupt checkpoints, ...) print one line
``deltalearn: error: ...`` and exit with status 2; a diverged run exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

# Flags of `train` that map onto config keys (flag dest → dotted key).
TRAIN_FLAGS = {
    "variant": "model.variant",
    "size": "model.size",
    "data": "data.source",
    "cache_dir": "data.cache_dir",
    "vocab_size": "data.vocab_size",
    "tokenizer": "data.tokenizer",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip",
    "warmup_steps": "schedule.warmup_steps",
    "min_lr_ratio": "schedule.min_lr_ratio",
    "out": "run.out",
    "steps": "run.steps",
    "batch_size": "run.batch_size",
    "grad_accum": "run.grad_accum",
    "seq_len": "run.seq_len",
    "seed": "run.seed",
    "device": "run.device",
    "dtype": "run.dtype",
    "compile": "run.compile",
    "fsdp": "run.fsdp",
    "activation_checkpointing": "run.activation_checkpointing",
    "cuda_graphs": "run.cuda_graphs",
    "eval_interval": "run.eval_interval",
    "eval_batches": "run.eval_batches",
    "checkpoint_interval": "run.checkpoint_interval",
    "keep_checkpoints": "run.keep_checkpoints",
    "stop_after": "run.stop_after",
    "skip_nonfinite": "run.skip_nonfinite",
    "no_progress": "run.progress",
    "no_tensorboard": "run.tensorboard",
}


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` (YAML-parsed value), e.g. ``--set model.overrides.num_layers=2``."""
    import yaml

    from deltalearn.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {}
    for dest, key in TRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if dest.startswith("no_"):
            value = False  # --no-progress → run.progress = False
        overrides[key] = value
    overrides.update(_parse_set(args.set or []))
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from deltalearn.train.config import resolve_config
    from deltalearn.train.trainer import train

    cfg = resolve_config(args.config, _train_overrides(args), resume=args.resume)
    result = train(cfg, resume=args.resume)
    if result.status != "finished":
        print(
            f"{result.status} after step {result.step}; checkpoint saved in "
            f"{result.run_dir}/checkpoints — continue with --resume --out {result.run_dir}",
            file=sys.stderr,
        )
    else:
        loss = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
        print(f"finished {result.step} steps: val loss {loss}; model in {result.run_dir}/model")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from deltalearn.experiments.compare import CompareConfig, run_compare

    cfg = CompareConfig()
    if args.variants:
        cfg.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.seeds:
        try:
            cfg.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            from deltalearn.errors import ConfigError

            raise ConfigError(
                f"--seeds expects comma-separated integers, got {args.seeds!r}"
            ) from None
    names = (
        "out",
        "steps",
        "batch_size",
        "seq_len",
        "data",
        "size",
        "lr",
        "device",
        "vocab_size",
        "max_chars",
        "cache_dir",
    )
    for name in names:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.no_progress:
        cfg.progress = False
    from deltalearn.train.runs import check_folder_path

    check_folder_path(cfg.out, "compare folder")
    if cfg.cache_dir is not None:
        check_folder_path(cfg.cache_dir, "cache folder")
    report = run_compare(cfg)
    print(report.table)
    print(f"report: {report.markdown_path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from deltalearn.errors import UserError
    from deltalearn.experiments.grid import load_grid, shipped_grids, with_overrides
    from deltalearn.experiments.provenance import command_line
    from deltalearn.experiments.sweep import SweepOptions, choose_learning_rates, run_sweep
    from deltalearn.train.runs import check_folder_path

    if args.list:
        for name in shipped_grids():
            print(f"{name}: {load_grid(name).description}")
        return 0
    if args.grid is None:
        raise UserError("sweep needs a GRID: a shipped grid's name or a YAML file (see --list)")
    grid = load_grid(args.grid)
    if args.set:
        grid = with_overrides(grid, _parse_set(args.set))
    note = ""
    if args.lr_from is not None:
        grid, note = choose_learning_rates(grid, args.lr_from, args.lr_choice)
    out = args.out or str(Path("runs") / "sweep" / grid.name)
    check_folder_path(out, "sweep folder")
    parts = ["deltalearn", "sweep", args.grid, "--out", out, "--jobs", str(args.jobs)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.lr_from is not None:
        parts += ["--lr-from", args.lr_from, "--lr-choice", args.lr_choice]
    parts += [f"--set={item}" for item in args.set or []]
    parts += ["--no-progress"] if args.no_progress else []
    opts = SweepOptions(
        out=out,
        jobs=args.jobs,
        threads=args.threads,
        progress=not args.no_progress,
        command=command_line(parts),
        lr_note=note,
        dry_run=args.dry_run,
    )
    result = run_sweep(grid, opts)
    if result.report is not None:
        print(result.report.table)
        print(f"report: {result.report.markdown_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deltalearn.experiments.sweep_report import write_sweep_report

    report = write_sweep_report(args.sweep_dir)
    print(report.table)
    print(f"report: {report.markdown_path} (with cells.csv, runs.csv, results.json and the plots)")
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """``eval RUN --tasks ...``: downstream tasks through lm-evaluation-harness."""
    from deltalearn.eval.tasks import evaluate_tasks, format_markdown

    json_file = getattr(args, "json", None)
    if json_file is not None:
        _check_json_file(json_file)  # before the evaluation, not after
    report = evaluate_tasks(
        args.run_dir,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
    )
    print(format_markdown(report), end="")
    print(f"saved {report['markdown_path']} and {report['json_path']}")
    if json_file is not None:  # a copy of RUN/eval/lm_eval.json where asked
        from deltalearn.atomic import atomic_write_text

        atomic_write_text(Path(json_file), json.dumps(report, indent=1) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if getattr(args, "tasks", None) is not None:  # lm-eval tasks instead of validation loss
        return cmd_eval_tasks(args)
    from deltalearn.eval.perplexity import evaluate_run

    if args.json is not None:
        _check_json_file(args.json)  # before the evaluation, not after
    result = evaluate_run(
        args.run_dir,
        data_source=args.data,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=args.device,
        progress=not args.no_progress,
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        from deltalearn.atomic import atomic_write_text

        atomic_write_text(Path(args.json), text + "\n")
    return 0


def _check_json_file(path_text: str) -> None:
    """``--json FILE``: a UserError unless FILE can be written (not a folder, its folder exists)."""
    from deltalearn.errors import UserError

    path = Path(path_text)
    if path.is_dir():
        raise UserError(f"--json file {path}: is a folder, expected a file")
    if not path.absolute().parent.is_dir():
        raise UserError(f"--json file {path}: its folder {path.absolute().parent} does not exist")


def cmd_generate(args: argparse.Namespace) -> int:
    from deltalearn.train.runs import generate_text

    text = generate_text(
        args.run_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        greedy=args.greedy,
        seed=args.seed,
    )
    print(text)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from deltalearn.analysis.audit import audit_run, check_failure_message, format_table

    result = audit_run(
        args.run_dir,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        out_dir=args.out,
        against=args.against,
        device=args.device,
        strict=False,
    )
    print(format_table(result["layers"]))
    if result.get("note"):
        print(result["note"])
    print(f"saved {result['report']}, {result['path']} and {len(result['figures'])} figures")
    check = result["contraction_check"]
    if check is not None and not check["passed"]:  # a bug, not a user error: exit 1
        print(f"deltalearn: {check_failure_message(result)}", file=sys.stderr)
        return 1
    if check is not None:
        print(
            f"rewrite check passed: {check['identity']} on {check['values']} values, worst "
            f"{check['max_error_over_tolerance']:.2g}x the round-off bound"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:  # imported only when asked for: it pulls in benchmark-only code
        bench = importlib.import_module("deltalearn.bench")
    except ModuleNotFoundError as e:
        if e.name != "deltalearn.bench":
            raise
        from deltalearn.errors import UserError

        raise UserError("the bench command is not available in this installation") from None
    _check_bench_json(args.bench_args)
    return int(bench.main(args.bench_args) or 0)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from deltalearn.lm_eval import main as lm_eval_main

    return lm_eval_main(args.lm_eval_args)


def _check_bench_json(bench_args: list[str]) -> None:
    """``bench --json FILE``: refuse a FILE that cannot be written before the benchmarks run,
    not after (bench's own parser reports a malformed command line)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--json")
    try:
        known, _ = pre.parse_known_args(bench_args)
    except argparse.ArgumentError:
        return
    if known.json is not None:
        _check_json_file(known.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltalearn",
        description="Deep Delta Learning: train, compare and inspect DDL language models.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one model variant (single process or under torchrun)")
    t.add_argument(
        "--config", help="YAML/TOML config file (sections model, data, optim, schedule, run)"
    )
    t.add_argument(
        "--variant",
        help="model variant: baseline, ddl, ddl-cc, write-only-cc, ... (default ddl-cc)",
    )
    t.add_argument("--size", help="model size preset: tiny, small, medium (default tiny)")
    t.add_argument("--out", help="run folder (default runs/train)")
    t.add_argument("--data", help="shakespeare | bible | PATH | hf:NAME (default shakespeare)")
    t.add_argument("--cache-dir", help="where prepared tokens are cached")
    t.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    t.add_argument("--tokenizer", help="bpe or gpt2")
    t.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    t.add_argument("--stop-after", type=int, help="stop with a checkpoint after this step")
    t.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    t.add_argument("--batch-size", type=int, help="global batch size in sequences")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step per process")
    t.add_argument("--seq-len", type=int, help="tokens per sequence")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    t.add_argument("--grad-clip", type=float, help="gradient-norm clip (0 = off)")
    t.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    t.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of the peak")
    t.add_argument("--seed", type=int, help="seed for init and batch order")
    t.add_argument("--device", help="auto, cpu or cuda")
    t.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    t.add_argument(
        "--fsdp", action="store_true", default=None, help="FSDP2 instead of DDP under torchrun"
    )
    t.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in backward: less memory, ~1/3 more compute",
    )
    t.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="after three eager steps, record the training step as a CUDA graph and replay it: "
        "no Python between its kernels (one GPU; not with --compile, --fsdp, "
        "--activation-checkpointing)",
    )
    t.add_argument("--eval-interval", type=int, help="evaluate every N steps")
    t.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    t.add_argument("--checkpoint-interval", type=int, help="checkpoint every N steps")
    t.add_argument("--keep-checkpoints", type=int, help="checkpoints to keep")
    t.add_argument(
        "--skip-nonfinite", action="store_true", default=None, help="skip batches with NaN/inf loss"
    )
    t.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    t.add_argument(
        "--no-tensorboard", action="store_true", default=None, help="no TensorBoard logs"
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, e.g. --set model.overrides.num_layers=2 (repeatable)",
    )
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "compare", help="train baseline and DDL variants on Shakespeare and write a report"
    )
    c.add_argument("--out", help="report/run folder (default runs/compare)")
    c.add_argument("--variants", help="comma-separated (default baseline,ddl,ddl-cc,write-only-cc)")
    c.add_argument("--seeds", help="comma-separated seeds (several → mean ± std)")
    c.add_argument("--steps", type=int, help="training steps per run")
    c.add_argument("--batch-size", type=int, help="sequences per step")
    c.add_argument("--seq-len", type=int, help="tokens per sequence")
    c.add_argument("--lr", type=float, help="peak learning rate")
    c.add_argument("--size", help="model size preset (default tiny)")
    c.add_argument("--data", help="corpus (default shakespeare)")
    c.add_argument("--device", help="auto, cpu or cuda")
    c.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    c.add_argument("--max-chars", type=int, help="use only the first N characters of the corpus")
    c.add_argument("--cache-dir", help="where prepared tokens are cached")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)

    w = sub.add_parser(
        "sweep",
        help="train a grid of variants × seeds × (lr, steps, size) cells, resumably, then report",
    )
    w.add_argument("grid", nargs="?", help="a shipped grid (paper-grid, ...) or a grid YAML file")
    w.add_argument("--list", action="store_true", help="list the shipped grids and exit")
    w.add_argument("--out", help="sweep folder (default runs/sweep/GRID_NAME)")
    w.add_argument("--jobs", type=int, default=1, help="cells trained at once (own processes)")
    w.add_argument("--threads", type=int, help="torch threads per cell (default cores / jobs)")
    w.add_argument("--lr-from", help="a finished lr sweep folder: take the learning rates from it")
    w.add_argument(
        "--lr-choice",
        default="per-variant",
        choices=["per-variant", "shared"],
        help="with --lr-from: each variant's best rate, or the best shared one",
    )
    w.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a grid key (seeds=[1,2], steps=50, variants=[baseline,ddl]) or a train config key "
        "for every cell (run.batch_size=8, model.overrides.num_layers=2); repeatable",
    )
    w.add_argument("--dry-run", action="store_true", help="print the cells, train nothing")
    w.add_argument("--no-progress", action="store_true", help="no per-cell progress bars")
    w.set_defaults(func=cmd_sweep)

    rp = sub.add_parser(
        "report", help="statistics, curves and costs of a sweep folder, from its logs alone"
    )
    rp.add_argument("sweep_dir")
    rp.set_defaults(func=cmd_report)

    e = sub.add_parser("eval", help="validation loss and perplexity of a trained run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="another corpus (default: the run's own)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=50)
    e.add_argument("--device", default="auto")
    e.add_argument(
        "--json",
        metavar="FILE",
        help="also write the result (loss, perplexity, bits per byte) here",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument(
        "--tasks",
        help="score lm-eval tasks instead: 'paper' (ARC-C/E, HellaSwag, OpenBookQA, PIQA, SciQ, "
        "Social IQA, WinoGrande at 0 and 1 shot; needs network) or comma-separated task names; "
        "writes RUN/eval/lm_eval.md and .json",
    )
    e.add_argument("--num-fewshot", type=int, help="with --tasks: shots for every task")
    e.add_argument("--include-path", help="with --tasks: a folder of extra lm-eval task YAMLs")
    e.add_argument("--limit", type=int, help="with --tasks: at most N documents per task")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--greedy", action="store_true", help="argmax decoding")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser(
        "audit",
        help="gate audit of a trained run: β regimes, discrepancy contraction (checked), "
        "update sizes, value channels; writes RUN/audit/",
    )
    a.add_argument("run_dir")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--max-batches", type=int, default=8)
    a.add_argument(
        "--against", metavar="RUN", help="a baseline run: its branch norms at the same depth"
    )
    a.add_argument("--out", help="audit folder (default RUN/audit)")
    a.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    a.set_defaults(func=cmd_audit)

    b = sub.add_parser(
        "bench", help="speed/memory benchmarks (options: deltalearn bench --help)", add_help=False
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    le = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's own command line with DeltaLM registered "
        "(options: deltalearn lm-eval --help)",
        add_help=False,
    )
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    le.set_defaults(func=cmd_lm_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:  # everything after `bench` (options included) belongs to it
        args = argparse.Namespace(func=cmd_bench, bench_args=argv[1:])
    elif argv[:1] == ["lm-eval"]:  # likewise: everything after `lm-eval` goes to lm-eval unchanged
        args = argparse.Namespace(func=cmd_lm_eval, lm_eval_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    from deltalearn.errors import NonFiniteLossError, UserError

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as e:
        print(f"deltalearn: error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"deltalearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltalearn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
