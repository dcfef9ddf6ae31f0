"""The gate audit summarises exactly what the model's `output_gates` returns."""

import torch
from model_helpers import random_ids, tiny_model

from deltalearn.analysis.audit import collect_gate_stats


def test_gate_stats_match_the_gates_over_several_batches():
    model = tiny_model("ddl-cc")
    batches = [random_ids(2, 7, seed=1), random_ids(3, 5, seed=2)]
    rows = collect_gate_stats(model, batches)
    gates = [model(x, output_gates=True).gates for x in batches]
    beta = torch.cat([g.beta.flatten(2) for g in gates], -1).double()  # (L, 2, tokens)
    disc = torch.cat([g.discrepancy.abs().mean(-1).flatten(2) for g in gates], -1).double()
    assert [(r["layer"], r["sublayer"]) for r in rows] == [
        (0, "attn"),
        (0, "mlp"),
        (1, "attn"),
        (1, "mlp"),
    ]
    for r in rows:
        b = beta[r["layer"], ("attn", "mlp").index(r["sublayer"])]
        d = disc[r["layer"], ("attn", "mlp").index(r["sublayer"])]
        assert r["tokens"] == 2 * 7 + 3 * 5
        torch.testing.assert_close(r["beta_mean"], b.mean().item())
        torch.testing.assert_close(r["beta_std"], b.std(unbiased=False).item())
        torch.testing.assert_close(r["frac_beta_gt_1"], (b > 1).double().mean().item())
        torch.testing.assert_close(r["abs_discrepancy_mean"], d.mean().item())


def test_baseline_has_no_gates_to_summarise():
    assert collect_gate_stats(tiny_model("baseline"), [random_ids(1, 4)]) == []
