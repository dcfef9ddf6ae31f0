"""A first gate audit: how does a trained model use β and the discrepancy?

Runs ``model(x, output_gates=True)`` on validation batches and summarises, per layer and
sublayer (attention, MLP), the gate ``β`` (mean, std, fraction above 1 — i.e. the fraction of
token updates that overshoot into the reflective regime) and the mean ``|discrepancy|``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["audit_run", "collect_gate_stats", "format_table", "iter_gate_tensors"]

_QUANTITIES = ("beta", "readout", "discrepancy")


def _quantity(name: str) -> str | None:
    name = name.lower()
    for q in _QUANTITIES:
        if q in name:
            return q
    return "beta" if name in ("b", "gate", "gates") else None


SUBLAYERS = ("attn", "mlp")  # order of DeltaLMGates' sublayer axis


def iter_gate_tensors(gates: Any, path: tuple = ()) -> Iterator[tuple[int, str, str, torch.Tensor]]:
    """Flatten ``out.gates`` to ``(layer, sublayer, quantity, tensor)``.

    The model returns a ``DeltaLMGates``: ``beta`` ``(L, 2, B, T)`` and ``discrepancy``/``readout``
    ``(L, 2, B, T, dv)``, sublayer axis = (attention, MLP). Nested lists (outer index = layer) and
    dicts keyed by sublayer and quantity names are accepted too.
    """
    if gates is None:
        return
    beta = getattr(gates, "beta", None)
    if isinstance(beta, torch.Tensor) and beta.dim() >= 2 and not path:
        for q in _QUANTITIES:
            t = getattr(gates, q, None)
            if not isinstance(t, torch.Tensor):
                continue
            for layer in range(t.shape[0]):
                for j in range(t.shape[1]):
                    sub = SUBLAYERS[j] if t.shape[1] == len(SUBLAYERS) else str(j)
                    yield layer, sub, q, t[layer, j]
        return
    if isinstance(gates, torch.Tensor):
        ints = [p for p in path if isinstance(p, int)]
        names = [p for p in path if isinstance(p, str)]
        found = [_quantity(n) for n in reversed(names)]
        quantity = next((f for f in found if f is not None), "beta")
        subs = [n for n in names if _quantity(n) is None]
        sublayer = subs[-1] if subs else (str(ints[1]) if len(ints) > 1 else "all")
        yield (ints[0] if ints else -1), sublayer, quantity, gates
        return
    if isinstance(gates, dict):
        items: Iterable[tuple[Any, Any]] = gates.items()
    elif isinstance(gates, (list, tuple)):
        items = enumerate(gates)
    elif hasattr(gates, "__dict__"):
        items = vars(gates).items()
    else:
        return
    for key, value in items:
        yield from iter_gate_tensors(value, (*path, key))


def _sublayer_tensors(gates: Any) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for layer, sub, q, t in iter_gate_tensors(gates):
        grouped.setdefault((layer, sub), {})[q] = t
    return grouped


@torch.no_grad()
def collect_gate_stats(model: nn.Module, batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Per (layer, sublayer): mean/std β, fraction β > 1, mean |discrepancy|, over all tokens."""
    acc: dict[tuple[int, str], dict[str, float]] = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            x = torch.as_tensor(x, dtype=torch.long, device=device)
            out = model(x, output_gates=True)
            gates = getattr(out, "gates", None)
            if gates is None:
                return []
            for key, qs in _sublayer_tensors(gates).items():
                a = acc.setdefault(key, {"n": 0, "s": 0.0, "s2": 0.0, "gt1": 0, "dn": 0, "ds": 0.0})
                if "beta" in qs:
                    b = qs["beta"].detach().double()
                    a["n"] += b.numel()
                    a["s"] += b.sum().item()
                    a["s2"] += (b * b).sum().item()
                    a["gt1"] += (b > 1).sum().item()
                if "discrepancy" in qs:
                    d = qs["discrepancy"].detach().double().abs()
                    a["dn"] += d.numel()
                    a["ds"] += d.sum().item()
    finally:
        model.train(was_training)
    rows = []
    for (layer, sub), a in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if not a["n"]:
            continue
        mean = a["s"] / a["n"]
        var = max(a["s2"] / a["n"] - mean * mean, 0.0)
        rows.append(
            {
                "layer": layer,
                "sublayer": sub,
                "beta_mean": mean,
                "beta_std": math.sqrt(var),
                "frac_beta_gt_1": a["gt1"] / a["n"],
                "abs_discrepancy_mean": a["ds"] / a["dn"] if a["dn"] else None,
                "tokens": a["n"],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`collect_gate_stats` rows."""
    head = f"{'layer':>5}  {'sublayer':<10} {'beta mean':>9} {'beta std':>9} {'beta>1':>7} {'|disc|':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        disc = "-" if r["abs_discrepancy_mean"] is None else f"{r['abs_discrepancy_mean']:.4f}"
        lines.append(
            f"{r['layer']:>5}  {r['sublayer']:<10} {r['beta_mean']:>9.4f} {r['beta_std']:>9.4f} "
            f"{r['frac_beta_gt_1']:>7.3f} {disc:>9}"
        )
    return "\n".join(lines)


def audit_run(
    run_dir: str | Path,
    batch_size: int = 8,
    max_batches: int = 8,
    out_file: str | Path | None = None,
) -> dict[str, Any]:
    """Gate summary of ``RUN_DIR/model`` on its validation split; saved as ``RUN_DIR/audit.json``."""
    from deltalearn.data import eval_batches
    from deltalearn.train.build import prepare_data
    from deltalearn.train.errors import UserError
    from deltalearn.train.runs import load_run

    run = load_run(run_dir)
    cfg = run.config
    data = prepare_data(cfg, progress=False)
    batches = (
        x for x, _ in eval_batches(data.tokens("val"), cfg.run.seq_len, batch_size, max_batches)
    )
    rows = collect_gate_stats(run.model, batches)
    if not rows:
        raise UserError(f"{run_dir}: the model ({cfg.model.variant}) has no gates to audit")
    result = {"run_dir": str(run_dir), "variant": cfg.model.variant, "layers": rows}
    path = Path(out_file) if out_file else Path(run_dir) / "audit.json"
    path.write_text(json.dumps(result, indent=1))
    result["path"] = str(path)
    return result
