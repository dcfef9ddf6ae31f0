"""A first gate audit: how does a trained model use β and the discrepancy?

Runs ``model(x, output_gates=True)`` on validation batches and summarises, per layer and
sublayer (attention, MLP), the gate ``β`` (mean, std, fraction above 1 — i.e. the fraction of
token updates that overshoot into the reflective regime) and the mean ``|discrepancy|``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["audit_run", "collect_gate_stats", "format_table"]

SUBLAYERS = ("attn", "mlp")  # order of the sublayer axis of `DeltaLMGates`


@torch.no_grad()
def collect_gate_stats(model: nn.Module, batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Per (layer, sublayer): mean/std β, fraction β > 1, mean |discrepancy|, over all tokens.

    Reads `DeltaLMGates` (β `(L, 2, B, T)`, discrepancy `(L, 2, B, T, dv)`); returns [] for a model
    without gates (the additive baseline).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals: torch.Tensor | None = None  # (L, 2, 5): tokens, Σβ, Σβ², #β>1, mean-over-dv Σ|disc|
    try:
        for x in batches:
            x = torch.as_tensor(x, dtype=torch.long, device=device)
            gates = model(x, output_gates=True).gates
            if gates is None:
                return []
            beta = gates.beta.double().flatten(2)  # (L, 2, B·T)
            disc = gates.discrepancy.double().abs().mean(-1).flatten(2)  # (L, 2, B·T)
            batch = torch.stack(
                [
                    torch.full_like(beta[..., 0], beta.shape[-1]),
                    beta.sum(-1),
                    beta.pow(2).sum(-1),
                    (beta > 1).sum(-1).double(),
                    disc.sum(-1),
                ],
                dim=-1,
            ).cpu()
            totals = batch if totals is None else totals + batch
    finally:
        model.train(was_training)
    if totals is None:
        return []
    rows = []
    for layer in range(totals.shape[0]):
        for j, sub in enumerate(SUBLAYERS):
            n, s, s2, above, disc_sum = totals[layer, j].tolist()
            mean = s / n
            rows.append(
                {
                    "layer": layer,
                    "sublayer": sub,
                    "beta_mean": mean,
                    "beta_std": math.sqrt(max(s2 / n - mean * mean, 0.0)),
                    "frac_beta_gt_1": above / n,
                    "abs_discrepancy_mean": disc_sum / n,
                    "tokens": int(n),
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`collect_gate_stats` rows."""
    head = f"{'layer':>5}  {'sublayer':<10} {'beta mean':>9} {'beta std':>9} {'beta>1':>7} {'|disc|':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer']:>5}  {r['sublayer']:<10} {r['beta_mean']:>9.4f} {r['beta_std']:>9.4f} "
            f"{r['frac_beta_gt_1']:>7.3f} {r['abs_discrepancy_mean']:>9.4f}"
        )
    return "\n".join(lines)


def audit_run(
    run_dir: str | Path,
    batch_size: int = 8,
    max_batches: int = 8,
    out_file: str | Path | None = None,
) -> dict[str, Any]:
    """Gate summary of ``RUN_DIR/model`` on its validation split; saved as ``RUN_DIR/audit.json``
    (atomically: a failed audit leaves no file, or the previous one, behind)."""
    from deltalearn.data import eval_batches
    from deltalearn.errors import UserError
    from deltalearn.train.build import prepare_data
    from deltalearn.train.runs import load_run

    for flag, value in (("--batch-size", batch_size), ("--max-batches", max_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be an integer >= 1, got {value!r}")
    run = load_run(run_dir)
    path = Path(out_file) if out_file else Path(run_dir) / "audit.json"
    if path.is_dir():  # found now, not after the model has run
        raise UserError(f"audit file {path}: is a folder, expected a file")
    if not path.parent.is_dir():
        raise UserError(f"audit file {path}: its folder {path.parent} does not exist")
    cfg = run.config
    data = prepare_data(cfg, progress=False)
    batches = (
        x for x, _ in eval_batches(data.tokens("val"), cfg.run.seq_len, batch_size, max_batches)
    )
    rows = collect_gate_stats(run.model, batches)
    if not rows:
        raise UserError(f"{run_dir}: the model ({cfg.model.variant}) has no gates to audit")
    result = {"run_dir": str(run_dir), "variant": cfg.model.variant, "layers": rows}
    _write_atomic(path, json.dumps(result, indent=1))
    result["path"] = str(path)
    return result


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; an unwritable place is the user's to fix."""
    from deltalearn.atomic import atomic_write_text
    from deltalearn.errors import UserError

    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"audit file {path}: cannot write it ({e.strerror})") from None
