"""The gate audit: how does a trained model use β, the discrepancy and its value channels?

`deltalearn audit RUN` (or `audit_run(RUN)` from Python, which returns the same numbers) runs the
run's model on held-out text (its validation split) and, per layer and sublayer (attention, MLP):

* the distribution of β — mean, std, quantiles, a histogram — and the share of tokens in each
  regime of the spectral analysis (`deltalearn.analysis.regimes`);
* the discrepancy `e = kᵀX − v` before and after the rewrite, and a check on the real activations
  that `e_post = (1 − β) e_pre` (write-only: `kᵀX' = kᵀX + βv`) and that nothing moves outside k,
  to within a worst-case round-off bound (`deltalearn.analysis.capture`). A failure is a bug: the
  audit is still written (marked FAILED) and `ContractionCheckError` is raised;
* how much each rewrite changes the state, `‖X' − X‖ / ‖X‖`, beside the additive branch's
  `‖h‖ / ‖X‖` of a baseline run at the same depth (`against=`);
* for dv > 1, how the value channels are used (targets, write per channel, state per channel,
  how alike the channels are, the compressor's read weights).

Output: `RUN/audit/` with `report.md`, `audit.json` and PNG figures, replaced as a whole (a failed
audit leaves the previous folder, or none). A baseline run has no gates: its audit holds the branch
norms only, and says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltalearn.analysis.capture import SUBLAYERS, SiteStats, capture_sites, tolerance_factor
from deltalearn.analysis.regimes import (
    BETA_BINS,
    BETA_EDGES,
    LOG_EDGES,
    QUANTILES,
    REGIME_NAMES,
    REGIMES,
    histogram_quantiles,
)

__all__ = [
    "AUDIT_DIR",
    "BASELINE_NOTE",
    "ContractionCheckError",
    "audit_model",
    "audit_run",
    "collect_gate_stats",
    "format_table",
]

AUDIT_DIR = "audit"
JSON_BINS = 200  # β histogram in audit.json: bins of 0.01 (the quantiles use bins of 0.001)
BASELINE_NOTE = (
    "This run is the additive baseline: its residual connections add the branch output h to the "
    "state (X' = X + h), so there is no gate β, no direction k and no target v — no regimes, no "
    "discrepancy and no contraction to audit. Only the branch norms ‖h‖ and ‖h‖ / ‖X‖ are reported."
)


class ContractionCheckError(RuntimeError):
    """The rewrite algebra failed on real activations: a bug in the model, not a user error."""


# ---------------------------------------------------------------------------------- the summary


def _q(qs: list[float]) -> dict[str, float]:
    return {f"{q:g}": v for q, v in zip(QUANTILES, qs, strict=True)}


def _site_row(s: SiteStats) -> dict[str, Any]:
    n = max(s.tokens, 1)
    S = s.sums
    ratio_q = histogram_quantiles(s.update_ratio_hist, LOG_EDGES, log=True)
    row: dict[str, Any] = {
        "layer": s.layer,
        "sublayer": s.sublayer,
        "tokens": s.tokens,
        "state_norm_mean": S["state_norm"] / n,
        "update_norm_mean": S["update_norm"] / n,
        "update_norm_rms": math.sqrt(S["update_norm_sq"] / n),
        "update_ratio_mean": S["update_ratio"] / n,
        "update_ratio_median": ratio_q[QUANTILES.index(0.5)],
        "update_ratio_quantiles": _q(ratio_q),
    }
    if s.rule == "additive":
        row["branch_norm_mean"] = S["branch_norm"] / n
        return row
    mean = S["beta"] / n
    dv = s.value_channels
    row.update(
        beta_mean=mean,
        beta_std=math.sqrt(max(S["beta_sq"] / n - mean * mean, 0.0)),
        frac_beta_gt_1=S["beta_gt_1"] / n,
        beta_quantiles=_q(histogram_quantiles(s.beta_hist, BETA_EDGES)),
        regimes={name: int(c) / n for name, c in zip(REGIME_NAMES, s.regimes, strict=True)},
        abs_discrepancy_mean=S["abs_discrepancy"] / n,
        e_pre_abs_mean=S["abs_e_pre"] / n,
        e_post_abs_mean=S["abs_e_post"] / n,
        e_pre_rms=math.sqrt(S["e_pre_sq"] / (n * dv)),
        e_post_rms=math.sqrt(S["e_post_sq"] / (n * dv)),
        contraction=math.sqrt(S["e_post_sq"] / S["e_pre_sq"]) if S["e_pre_sq"] > 0 else math.nan,
        abs_one_minus_beta_mean=S["abs_one_minus_beta"] / n,
        check=dict(s.check),
    )
    if dv > 1:
        C = s.channel
        written = max(S.get("written_tokens", 0.0), 1.0)
        row["channels"] = {
            "target_mean": (C["v"] / n).tolist(),
            "target_rms": np.sqrt(C["v_sq"] / n).tolist(),
            "e_pre_rms": np.sqrt(C["e_pre_sq"] / n).tolist(),
            "write_share": _share(C["write_sq"]),
            "state_share": _share(C["state_sq"]),
            "write_participation_mean": S.get("write_participation", 0.0) / written,
            "state_channel_cosine_mean": S["state_channel_cosine"] / n,
        }
    return row


def _share(x: np.ndarray) -> list[float]:
    total = float(x.sum())
    return (x / total).tolist() if total > 0 else [math.nan] * len(x)


def _read_shares(model: nn.Module) -> list[list[float] | None]:
    """Per block: the share of each value channel in the compressor's read weights `Σ_i |c_ij|`
    (CC folds to a `(d, dv)` matrix; TC: read vector × taps summed), or None without one."""
    out: list[list[float] | None] = []
    for block in model.layers:
        comp = getattr(block, "compress", None)
        if comp is None:
            out.append(None)
            continue
        with torch.no_grad():
            if hasattr(comp, "mixing_matrix"):
                c = comp.mixing_matrix().double()
            else:  # TokenCompressor: weight (d, dv, K), read (dv)
                c = comp.weight.double().sum(-1) * comp.read.double()
        out.append(_share(c.abs().sum(0).cpu().numpy()))
    return out


def _overall_check(rows: list[dict[str, Any]], d: int, dtype: torch.dtype) -> dict[str, Any]:
    checks = [r["check"] for r in rows if "check" in r]
    factor = tolerance_factor(d)
    eps = torch.finfo(dtype).eps
    out: dict[str, Any] = {
        "identity": "",
        "tolerance": f"(2d + 9)·eps·(‖X_j‖ + ‖X'_j‖ + |v_j|) = {factor}·{eps:.3g}·(...)",
        "tolerance_factor": factor,
        "eps": eps,
        "values": sum(c["values"] for c in checks),
        "failures": sum(c["failures"] for c in checks),
    }
    for key in (
        "max_abs_error",
        "max_relative_error",
        "max_error_over_tolerance",
        "max_orthogonal_over_tolerance",
    ):
        out[key] = max((c[key] for c in checks), default=0.0)
    out["passed"] = out["failures"] == 0
    return out


def audit_model(
    model: nn.Module,
    batches: Iterable[Any],
    against: tuple[nn.Module, Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """The audit of a `DeltaLM` on `batches` of token ids (no files): the dict `audit.json` holds,
    minus the run and data fields. ``against``: a baseline `(model, batches)` pair whose branch
    norms go beside this model's update sizes, layer by layer."""
    cfg = model.config
    sites = capture_sites(model, batches)
    rows = [_site_row(s) for s in sites]
    dv = cfg.value_channels if cfg.expanded else 1
    result: dict[str, Any] = {
        "variant": _variant_of(cfg),
        "rule": cfg.residual,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "value_channels": dv,
        "tokens": sites[0].tokens if sites else 0,
        "regimes": [{"name": n, "low": lo, "high": hi} for n, lo, hi in REGIMES],
    }
    if cfg.residual == "additive":
        result["note"] = BASELINE_NOTE
        result["contraction_check"] = None
        result["beta_histogram"] = None
    else:
        dtype = next(model.parameters()).dtype
        check = _overall_check(rows, cfg.hidden_size, dtype)
        check["identity"] = (
            "e_post = (1 − β) e_pre" if cfg.residual == "delta" else "kᵀX' = kᵀX + βv"
        )
        result["contraction_check"] = check
        coarse = BETA_BINS // JSON_BINS
        result["beta_histogram"] = {
            "bin_width": 2.0 / JSON_BINS,
            "rows": [f"{r['layer']}.{r['sublayer']}" for r in rows],
            "counts": [s.beta_hist.reshape(JSON_BINS, coarse).sum(1).tolist() for s in sites],
        }
        if dv > 1:
            for r, share in zip(
                rows, [s for s in _read_shares(model) for _ in SUBLAYERS], strict=True
            ):
                r["channels"]["read_share"] = share
    if against is not None:
        base_model, base_batches = against
        base_sites = capture_sites(base_model, base_batches)
        base_rows = [_site_row(s) for s in base_sites]
        for r, b in zip(rows, base_rows, strict=True):
            r["baseline_update_ratio_mean"] = b["update_ratio_mean"]
            r["baseline_update_ratio_median"] = b["update_ratio_median"]
            r["baseline_branch_norm_mean"] = b["branch_norm_mean"]
            r["baseline_state_norm_mean"] = b["state_norm_mean"]
        result["against"] = {
            "variant": _variant_of(base_model.config),
            "tokens": base_sites[0].tokens if base_sites else 0,
        }
    else:
        result["against"] = None
    result["layers"] = rows
    return result


def _variant_of(cfg: Any) -> str:
    """A short name of the model's residual form (the run's preset name is in its config)."""
    if cfg.residual == "additive":
        return "baseline"
    if not cfg.expanded:
        return "ddl" if cfg.residual == "delta" else "write-only"
    return f"{cfg.residual}-{cfg.compressor}-dv{cfg.value_channels}"


# ------------------------------------------------------------------------------------- the run


def _check_int(flag: str, value: Any) -> None:
    from deltalearn.errors import UserError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be an integer >= 1, got {value!r}")


def _val_batches(run: Any, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    from deltalearn.data import eval_batches
    from deltalearn.train.build import prepare_data

    cfg = run.config
    data = prepare_data(cfg, progress=False)
    return [
        x for x, _ in eval_batches(data.tokens("val"), cfg.run.seq_len, batch_size, max_batches)
    ]


def audit_run(
    run_dir: str | Path,
    batch_size: int = 8,
    max_batches: int = 8,
    out_dir: str | Path | None = None,
    against: str | Path | None = None,
    device: str = "cpu",
    strict: bool = True,
) -> dict[str, Any]:
    """Audit ``RUN_DIR/model`` on its validation split; write ``out_dir`` (default
    ``RUN_DIR/audit``: ``report.md``, ``audit.json``, figures) and return what ``audit.json`` holds,
    plus ``path`` (audit.json), ``folder`` and ``report``.

    ``against``: a baseline run folder (additive, same depth) audited on its own validation split
    the same way, for its branch norms. ``strict``: raise `ContractionCheckError` (after writing
    the audit) when the rewrite algebra fails on the activations.
    """
    from deltalearn.errors import UserError
    from deltalearn.train.runs import load_run

    _check_int("--batch-size", batch_size)
    _check_int("--max-batches", max_batches)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / AUDIT_DIR
    _check_out(out)  # found now, not after the model has run
    base = None
    if against is not None:
        base = load_run(against)
        if base.model.config.residual != "additive":
            raise UserError(
                f"--against {against}: expected an additive baseline run, got variant "
                f"{base.config.model.variant!r}"
            )
        if base.model.config.num_layers != run.model.config.num_layers:
            raise UserError(
                f"--against {against}: has {base.model.config.num_layers} layers, the audited "
                f"run {run.model.config.num_layers}; compare at the same depth"
            )
    from deltalearn.train.distributed import resolve_device

    dev = resolve_device(device)
    model = run.model.to(dev)
    batches = _val_batches(run, batch_size, max_batches)
    pair = None
    if base is not None:
        pair = (base.model.to(dev), _val_batches(base, batch_size, max_batches))
    result = {"run_dir": str(run_dir), **audit_model(model, batches, pair)}
    result["variant"] = run.config.model.variant
    result["data"] = {
        "source": run.config.data.source,
        "split": "val",
        "batch_size": batch_size,
        "batches": len(batches),
        "seq_len": run.config.run.seq_len,
    }
    if base is not None:
        result["against"].update(run_dir=str(against), variant=base.config.model.variant)
    _write_folder(out, result)
    result["path"] = str(out / "audit.json")
    result["folder"] = str(out)
    result["report"] = str(out / "report.md")
    check = result["contraction_check"]
    if strict and check is not None and not check["passed"]:
        raise ContractionCheckError(check_failure_message(result))
    return result


def check_failure_message(result: dict[str, Any]) -> str:
    """One line naming the failed identity, the worst error and the tolerance."""
    c = result["contraction_check"]
    worst = max(
        (r for r in result["layers"]),
        key=lambda r: max(
            r["check"]["max_error_over_tolerance"], r["check"]["max_orthogonal_over_tolerance"]
        ),
    )
    return (
        f"rewrite check FAILED on real activations ({c['identity']}; nothing outside k): "
        f"{c['failures']} of {c['values']} values beyond the round-off bound, worst "
        f"{max(c['max_error_over_tolerance'], c['max_orthogonal_over_tolerance']):.3g}x the "
        f"tolerance at layer {worst['layer']} {worst['sublayer']} (max |error| "
        f"{c['max_abs_error']:.3g}) — a bug in the rewrite, see {result.get('folder', 'the report')}"
    )


def _check_out(out: Path) -> None:
    from deltalearn.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"audit folder {out}: is a file, expected a folder")
    if not out.parent.is_dir():
        raise UserError(f"audit folder {out}: its parent {out.parent} does not exist")


def _write_folder(out: Path, result: dict[str, Any]) -> None:
    """Write the audit into a hidden temp folder beside ``out``, then swap it in: a reader sees
    the old folder or the new one, never a mix (between the two renames, neither)."""
    from deltalearn.analysis.figures import write_figures
    from deltalearn.analysis.report import write_report
    from deltalearn.atomic import fsync_dir, temp_path
    from deltalearn.errors import UserError

    tmp = temp_path(out)
    old = temp_path(out)
    try:
        tmp.mkdir()
        files = write_figures(result, tmp)
        result["figures"] = files
        write_report(result, tmp / "report.md")
        (tmp / "audit.json").write_text(json.dumps(_jsonable(result), indent=1))
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise UserError(f"audit folder {out}: cannot write it ({e.strerror or e})") from None
    finally:
        for p in (tmp, old):
            if p.exists():
                with contextlib.suppress(OSError):
                    shutil.rmtree(p)


def _jsonable(x: Any) -> Any:
    """NaN/inf as None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------- the first audit's summary


@torch.no_grad()
def collect_gate_stats(model: nn.Module, batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Per (layer, sublayer): mean/std β, fraction β > 1, mean |discrepancy|, over all tokens.

    Reads `DeltaLMGates` (β `(L, 2, B, T)`, discrepancy `(L, 2, B, T, dv)`); returns [] for a model
    without gates (the additive baseline). `audit_model` returns the same four numbers per row.
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
    """A plain-text table of audit rows (those of `audit_model` or `collect_gate_stats`); rows
    without a gate (the baseline) show the relative branch norm instead."""
    if rows and "beta_mean" not in rows[0]:
        head = f"{'layer':>5}  {'sublayer':<8} {'|h|':>9} {'|X|':>9} {'|h|/|X|':>9}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(
                f"{r['layer']:>5}  {r['sublayer']:<8} {r['branch_norm_mean']:>9.4f} "
                f"{r['state_norm_mean']:>9.4f} {r['update_ratio_mean']:>9.4f}"
            )
        return "\n".join(lines)
    full = bool(rows) and "regimes" in rows[0]
    head = f"{'layer':>5}  {'sublayer':<8} {'beta mean':>9} {'beta std':>9} {'beta>1':>7} {'|disc|':>9}"
    if full:
        head += f" {'ident':>6} {'part':>6} {'over':>6} {'relax':>6} {'refl':>6} {'e_post/pre':>10} {'|dX|/|X|':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['layer']:>5}  {r['sublayer']:<8} {r['beta_mean']:>9.4f} {r['beta_std']:>9.4f} "
            f"{r['frac_beta_gt_1']:>7.3f} {r['abs_discrepancy_mean']:>9.4f}"
        )
        if full:
            line += "".join(f" {r['regimes'][n]:>6.3f}" for n in REGIME_NAMES)
            line += f" {r['contraction']:>10.4f} {r['update_ratio_mean']:>9.4f}"
        lines.append(line)
    return "\n".join(lines)
