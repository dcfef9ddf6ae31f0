"""Typed config: file round trips, overrides, unknown keys; optimizer groups and lr schedule."""

import pytest
import torch

from deltalearn.train.config import (
    ConfigError,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_diff,
    load_config,
    resolve_config,
    save_config,
)
from deltalearn.train.optim import lr_at, param_groups


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig()
    apply_overrides(cfg, {"optim.lr": 3e-3, "run.steps": 7, "model.overrides.num_layers": 2})
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and back.model.overrides == {"num_layers": 2}


def test_toml_and_partial_file(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[model]\nvariant = "ddl"\n[optim]\nlr = 1\n[run]\nsteps = 5\n'
    )
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.model.variant == "ddl" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.run.steps == 5 and cfg.run.batch_size == TrainConfig().run.batch_size


@pytest.mark.parametrize(
    "text, key",
    [("optim:\n  lrr: 1\n", "optim.lrr"), ("runn:\n  steps: 1\n", "runn")],
    ids=["unknown-key", "unknown-section"],
)
def test_unknown_key_is_named(tmp_path, text, key):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(tmp_path / "c.yaml")


def test_wrong_type_and_bad_values():
    with pytest.raises(ConfigError, match="run.steps"):
        apply_overrides(TrainConfig(), {"run.steps": "many"})
    cfg = apply_overrides(TrainConfig(), {"run.dtype": "fp16"})
    with pytest.raises(ConfigError, match="run.dtype"):
        cfg.validate()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolve_config_order_and_resume(tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"run:\n  out: {tmp_path / 'run'}\n  steps: 9\noptim:\n  lr: 0.01\n"
    )
    cfg = resolve_config(tmp_path / "c.yaml", {"optim.lr": 0.02})
    assert cfg.run.steps == 9 and cfg.optim.lr == 0.02  # flags beat the file
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    # Resuming with only --out keeps every saved value.
    again = resolve_config(None, {"run.out": str(tmp_path / "run")}, resume=True)
    assert again == cfg
    assert config_diff(cfg, again) == []
    changed = resolve_config(None, {"run.out": str(tmp_path / "run"), "run.seed": 3}, resume=True)
    assert config_diff(cfg, changed) == ["run.seed (1337 -> 3)"]


def test_param_groups_decay_only_matrices():
    from deltalearn.models import DeltaLM, DeltaLMConfig

    model = DeltaLM(
        DeltaLMConfig.preset(
            "ddl", num_layers=1, hidden_size=16, num_heads=2, head_dim=8, vocab_size=64
        )
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 or "embed" in names[id(p)] for p in no_decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    total = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == total


def test_lr_schedule_warmup_then_cosine():
    s = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(i, 1.0, 100, s) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert torch.tensor(lrs).min() > 0
