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


# ----------------------------------------------------------------------------- every field checked

NAN, INF = float("nan"), float("inf")

# Bad values of every config key (set directly, as Python code would: validate() must catch the
# type as well as the range). test_every_key_has_bad_values keeps this table complete.
BAD_VALUES = {
    "model.variant": ["ddl-xx", 3],
    "model.size": ["huge", None],
    "model.overrides": [
        "x",
        {"num_layers": "two"},
        {"num_layers": 0},
        {"beta_init": "x"},
        {"bogus_field": 1},
        {"vocab_size": 100},
        {"max_seq_len": 8},
        {"hidden_size": 30},
        {1: 2},
    ],
    "data.source": ["", 3],
    "data.cache_dir": ["  ", 3],
    "data.vocab_size": [256, 0, "many", 300.5],
    "data.tokenizer": ["sentencepiece", None],
    "data.val_fraction": [0.0, 0.75, -0.1, NAN, "x"],
    "data.max_chars": [0, -5, 1.5],
    "optim.lr": [0, -1e-3, NAN, INF, "fast"],
    "optim.beta1": [-0.1, 1.0, True],
    "optim.beta2": [1.5, 1.0, NAN],
    "optim.eps": [0, -1e-8, INF],
    "optim.weight_decay": [-0.1, INF],
    "optim.grad_clip": [-1.0, NAN],
    "schedule.warmup_steps": [-1, 2.5],
    "schedule.min_lr_ratio": [-0.1, 1.5, NAN],
    "run.out": ["", None],
    "run.steps": [0, -1, "5"],
    "run.batch_size": [0, 4.0],
    "run.grad_accum": [0],
    "run.seq_len": [0],
    "run.seed": [-1, 2**64, 1.5],
    "run.device": ["tpu", "cuda:0"],
    "run.dtype": ["fp16"],
    "run.compile": ["yes"],
    "run.activation_checkpointing": ["yes"],
    "run.cuda_graphs": ["yes"],
    "run.fsdp": [1],
    "run.eval_interval": [0],
    "run.eval_batches": [0],
    "run.log_interval": [0, -3],
    "run.checkpoint_interval": [0],
    "run.keep_checkpoints": [0],
    "run.stop_after": [0],
    "run.skip_nonfinite": [None],
    "run.progress": ["no"],
    "run.tensorboard": [0],
}


def test_every_key_has_bad_values():
    from deltalearn.train.config import _flatten, config_to_dict

    assert set(BAD_VALUES) == set(_flatten(config_to_dict(TrainConfig())))


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, v) for k, values in BAD_VALUES.items() for v in values],
    ids=[f"{k}={v!r}" for k, values in BAD_VALUES.items() for v in values],
)
def test_validate_rejects_every_bad_value(key, value):
    cfg = TrainConfig()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = str(err.value)
    assert key in msg and err.value.key.startswith(key), msg
    assert len(msg.splitlines()) == 1
    shown = next(iter(value.values())) if isinstance(value, dict) and value else value
    if not isinstance(shown, dict) and key not in ("model.overrides",):
        assert repr(shown) in msg or str(shown) in msg, msg  # the value itself is named


def test_validate_accepts_the_defaults_and_edge_values():
    cfg = TrainConfig()
    cfg.validate()
    apply_overrides(
        cfg,
        {
            "optim.beta1": 0,
            "optim.grad_clip": 0,  # off
            "optim.weight_decay": 0,
            "schedule.warmup_steps": 10_000,  # longer than the run: legal, the lr just keeps rising
            "schedule.min_lr_ratio": 1,
            "data.val_fraction": 0.5,
            "data.tokenizer": "gpt2",
            "data.vocab_size": 5,  # ignored by gpt2
            "run.seed": 0,
            "run.batch_size": 12,
            "run.grad_accum": 3,
            "model.overrides.num_hidden_layers": 2,  # an alias
        },
    )
    cfg.validate()


def test_batch_size_must_split_into_micro_batches():
    cfg = apply_overrides(TrainConfig(), {"run.batch_size": 10, "run.grad_accum": 4})
    with pytest.raises(ConfigError, match=r"run.batch_size \(10\).*run.grad_accum \(4\)"):
        cfg.validate()


def test_bad_value_in_a_config_file_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  beta2: 1.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: optim.beta2 must lie in \[0, 1\), got 1.5"):
        resolve_config(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError) as err:  # the flag's value is the bad one: no file named
        resolve_config(tmp_path / "c.yaml", {"optim.beta2": 2.0})
    assert "c.yaml" not in str(err.value) and "optim.beta2" in str(err.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        ("dir", "is a folder"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        ("optim: [1,\n", "cannot parse"),
        ("- a\n- b\n", "expected a mapping of sections.*list"),
        ("7\n", "expected a mapping of sections.*int"),
        ("optim: 3\n", "section 'optim' must be a mapping"),
    ],
    ids=["missing", "folder", "binary", "bad-yaml", "list", "scalar", "section-not-mapping"],
)
def test_broken_config_files_are_named(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_complete_config_required_for_a_saved_run(tmp_path):
    save_config(TrainConfig(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", complete=True) == TrainConfig()
    text = (tmp_path / "c.yaml").read_text()
    (tmp_path / "c.yaml").write_text(text[: text.index("\nrun:")])  # cut before the run section
    load_config(tmp_path / "c.yaml")  # a partial file is fine as user input ...
    with pytest.raises(ConfigError, match=r"c.yaml: run\..* missing \(truncated"):
        load_config(tmp_path / "c.yaml", complete=True)  # ... not as a saved run's config
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="missing"):
        load_config(tmp_path / "empty.yaml", complete=True)


def test_save_config_is_atomic(tmp_path):
    save_config(TrainConfig(), tmp_path / "c.yaml")
    save_config(TrainConfig(), tmp_path / "c.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


# ----------------------------------------------------------------------------- build.model_config


def _with_overrides(**overrides):
    cfg = TrainConfig()
    cfg.model.overrides = overrides
    return cfg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_layers": "two"}, "model.overrides.num_layers"),
        ({"num_layers": 2.5}, "model.overrides.num_layers"),
        ({"beta_init": "x"}, "model.overrides.beta_init"),  # DeltaLMConfig itself: TypeError
        ({"tie_word_embeddings": "yes"}, "model.overrides.tie_word_embeddings"),
        ({"num_hidden_layers": 0}, "model.overrides.num_hidden_layers"),  # alias, its value
        ({"hidden_size": 30}, "model.overrides.hidden_size"),
        ({"residual": "sideways"}, "model.overrides.residual"),
        ({"nope": 1}, "model.overrides.nope"),
    ],
    ids=lambda v: str(v),
)
def test_model_config_names_the_bad_override(overrides, key):
    from deltalearn.train.build import model_config

    with pytest.raises(ConfigError) as err:
        model_config(_with_overrides(**overrides), 300)
    assert str(err.value).startswith(key), str(err.value)


def test_model_config_lets_bugs_surface(monkeypatch):
    """A TypeError raised inside DeltaLMConfig or DeltaLM is a bug, not a config mistake."""
    from deltalearn.models import DeltaLM, DeltaLMConfig
    from deltalearn.train.build import build_model, model_config

    cfg = _with_overrides(num_layers=1, hidden_size=16, num_heads=2, head_dim=8)

    def broken_validate(self):
        raise TypeError("a bug in DeltaLMConfig.validate")

    with monkeypatch.context() as m:
        m.setattr(DeltaLMConfig, "validate", broken_validate)
        with pytest.raises(TypeError, match="a bug"):
            model_config(cfg, 300)
        with pytest.raises(TypeError, match="a bug"):
            build_model(cfg, 300)

    def broken_init(self, config):
        raise TypeError("a bug in DeltaLM.__init__")

    monkeypatch.setattr(DeltaLM, "__init__", broken_init)
    with pytest.raises(TypeError, match="a bug"):
        build_model(cfg, 300)
