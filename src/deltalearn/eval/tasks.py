"""Downstream tasks through lm-evaluation-harness: ``deltalearn eval RUN --tasks paper|t1,t2``.

The paper's suite is named here and nowhere else (:data:`PAPER_TASKS`, :data:`PAPER_SHOTS`). A run's
model is scored by lm-eval's own ``hf`` model (``HFLM``) through its Python API, and the table is
written into ``RUN/eval/`` as ``lm_eval.md`` and ``lm_eval.json``.

The paper's tasks download their datasets from the Hugging Face Hub; on a machine without network
use local task YAMLs (``--include-path DIR``, e.g. ``tests/lm_eval_tasks``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deltalearn.errors import UserError

__all__ = [
    "PAPER_SHOTS",
    "PAPER_SUITE",
    "PAPER_TASKS",
    "evaluate_tasks",
    "format_markdown",
    "resolve_task_names",
]

# The paper's downstream suite (lm-eval task names): ARC-Challenge, ARC-Easy, HellaSwag,
# OpenBookQA, PIQA, SciQ, Social IQA, WinoGrande, each scored 0-shot and 1-shot.
PAPER_SUITE = "paper"
PAPER_TASKS: tuple[str, ...] = (
    "arc_challenge",
    "arc_easy",
    "hellaswag",
    "openbookqa",
    "piqa",
    "sciq",
    "social_iqa",
    "winogrande",
)
PAPER_SHOTS: tuple[int, ...] = (0, 1)

OUT_DIR = "eval"
JSON_FILE = "lm_eval.json"
MARKDOWN_FILE = "lm_eval.md"


def resolve_task_names(tasks: str) -> list[str]:
    """``"paper"`` → :data:`PAPER_TASKS`; ``"t1,t2"`` → ``["t1", "t2"]`` (``paper`` may appear in
    the list too); duplicates dropped, order kept."""
    names: list[str] = []
    for item in str(tasks).split(","):
        item = item.strip()
        if not item:
            continue
        for name in PAPER_TASKS if item == PAPER_SUITE else (item,):
            if name not in names:
                names.append(name)
    if not names:
        raise UserError(
            f"--tasks expects '{PAPER_SUITE}' or comma-separated lm-eval task names, got {tasks!r}"
        )
    return names


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite_or_none(value: Any) -> float | None:
    """A metric value as a JSON-safe float (None for lm-eval's "N/A" and non-finite values)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter) of an lm-eval results dict."""
    rows = []
    n_shot = results.get("n-shot", {})
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not filt:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "shots": n_shot.get(task),
                    "metric": metric,
                    "filter": filt,
                    "value": _finite_or_none(value),
                    "stderr": _finite_or_none(stderr),
                }
            )
    return rows


def _averages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shot count: the mean ``acc`` over the tasks that report it, and the mean of
    ``acc_norm`` where a task reports it, else ``acc`` (the usual headline metric)."""
    out = []
    for shots in sorted({r["shots"] for r in rows if r["shots"] is not None}):
        acc: dict[str, float] = {}
        norm: dict[str, float] = {}
        for r in rows:
            if r["shots"] != shots or r["filter"] != "none" or r["value"] is None:
                continue
            if r["metric"] == "acc":
                acc[r["task"]] = r["value"]
            elif r["metric"] == "acc_norm":
                norm[r["task"]] = r["value"]
        headline = {t: norm.get(t, v) for t, v in acc.items()}
        for name, values in (("acc", acc), ("acc_norm/acc", headline)):
            if values:
                out.append(
                    {
                        "shots": shots,
                        "metric": name,
                        "tasks": len(values),
                        "value": sum(values.values()) / len(values),
                    }
                )
    return out


def format_markdown(report: dict[str, Any]) -> str:
    """The markdown table of :func:`evaluate_tasks`' report."""

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        f"# lm-evaluation-harness: {report['run_dir']}",
        "",
        f"lm-eval {report['lm_eval_version']}, tasks {', '.join(report['tasks'])}; "
        f"batch size {report['batch_size']}, device {report['device']}"
        + (f", limit {report['limit']}" if report.get("limit") is not None else "")
        + ".",
        "",
        "| task | shots | metric | filter | value | ± stderr |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['task']} | {r['shots']} | {r['metric']} | {r['filter']} | {num(r['value'])} "
            f"| {num(r['stderr'])} |"
        )
    if report["averages"]:
        lines += [
            "",
            "Averages (acc_norm/acc: acc_norm where the task reports it, else acc):",
            "",
            "| shots | metric | tasks | mean |",
            "|---:|---|---:|---:|",
        ]
        for a in report["averages"]:
            lines.append(f"| {a['shots']} | {a['metric']} | {a['tasks']} | {num(a['value'])} |")
    return "\n".join(lines) + "\n"


def _task_manager(manager_cls: Any, names: list[str], include_path: str | Path | None) -> Any:
    """lm-eval's task index: of ``include_path`` alone when it holds every requested name as a
    plain task, not a group or pattern (indexing lm-eval's own thousands of YAMLs takes seconds), else of both (a local
    task of the same name wins there too, so the tasks are the same either way)."""
    if include_path is not None:
        local = manager_cls(include_path=str(include_path), include_defaults=False)
        if all(n in local.all_subtasks for n in names):  # exact names: a glob may match more
            return local
    return manager_cls(include_path=str(include_path) if include_path is not None else None)


def evaluate_tasks(
    run_dir: str | Path,
    tasks: str = PAPER_SUITE,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    device: str = "auto",
    limit: int | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score ``RUN_DIR/model`` on lm-eval tasks and write ``RUN_DIR/eval/lm_eval.{md,json}``.

    ``tasks``: ``"paper"`` (the paper's suite at 0 and 1 shot) or comma-separated task names;
    ``num_fewshot``: one shot count for every task (default: 0 and 1 for ``paper``, each task's
    own default otherwise); ``include_path``: a folder of extra task YAMLs; ``limit``: at most
    this many documents per task (a quick look, not a result). Returns the report (rows of
    task, shots, metric, filter, value, stderr, plus averages) and the written paths.
    """
    from deltalearn.lm_eval import import_harness
    from deltalearn.train.distributed import resolve_device
    from deltalearn.train.runs import load_run

    names = resolve_task_names(tasks)
    if num_fewshot is not None:
        _check_int(num_fewshot, "--num-fewshot", 0)
    _check_int(batch_size, "--batch-size", 1)
    if limit is not None:
        _check_int(limit, "--limit", 1)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: not a folder of task YAMLs")
    paper = PAPER_SUITE in [t.strip() for t in str(tasks).split(",")]
    shots_list: list[int | None]
    if num_fewshot is not None:
        shots_list = [num_fewshot]
    else:
        shots_list = list(PAPER_SHOTS) if paper else [None]

    out = Path(run_dir) / OUT_DIR
    if out.exists() and not out.is_dir():
        raise UserError(f"eval folder {out}: is a file, expected a folder")
    run = load_run(run_dir)  # checks every file first: one-line errors
    harness = import_harness()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, names, include_path)
    matched = {n: manager.match_tasks([n]) for n in names}  # names or glob patterns
    unknown = [n for n, found in matched.items() if not found]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else ""
        raise UserError(
            f"unknown lm-eval task {', '.join(unknown)}: not among lm-eval's tasks{where} "
            "(list them with: deltalearn lm-eval ls tasks)"
        )
    names = list(dict.fromkeys(t for found in matched.values() for t in found))

    dev = resolve_device(device)
    lm = HFLM(  # lm-eval's own `hf` model around the loaded run; DeltaLM is decoder-only
        pretrained=run.model.to(dev),
        tokenizer=run.tokenizer,
        batch_size=batch_size,
        backend="causal",
    )
    rows: list[dict[str, Any]] = []
    versions: dict[str, Any] = {}
    for shots in shots_list:
        try:
            results = harness.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=False,
            )
        except OSError as e:  # datasets: ConnectionError offline, FileNotFoundError, ...
            hint = (
                "; the paper's tasks download their data from the Hugging Face Hub — run with "
                "network access, or pass local task YAMLs with --include-path"
                if isinstance(e, ConnectionError)
                else ""
            )
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"lm-eval could not load the data of {', '.join(names)}: {reason}{hint}"
            ) from None
        rows += _rows(results)
        versions.update(results.get("versions", {}))

    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "tasks": names,
        "shots": shots_list,
        "batch_size": batch_size,
        "device": str(dev),
        "limit": limit,
        "lm_eval_version": getattr(harness, "__version__", "unknown"),
        "task_versions": versions,
        "rows": rows,
        "averages": _averages(rows),
    }
    if write:
        from deltalearn.atomic import atomic_write_text

        out.mkdir(exist_ok=True)
        json_path, md_path = out / JSON_FILE, out / MARKDOWN_FILE
        report["json_path"], report["markdown_path"] = str(json_path), str(md_path)
        atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
        atomic_write_text(md_path, format_markdown(report))
    return report
