"""Typed training configuration: nested dataclasses, YAML/TOML loading, dotted overrides.

A run is described by one :class:`TrainConfig`. It is built from the defaults, then a config
file (``--config FILE``, YAML or TOML, nested sections as below), then dotted overrides
(``{"optim.lr": 3e-3}``) — the command line turns its flags into such a dict, so this module
never sees ``argv``. Unknown keys raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltalearn.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]


@dataclass
class ModelConfig:
    variant: str = (
        "ddl-cc"  # DeltaLMConfig.preset variant: baseline, ddl, ddl-cc, write-only-cc, ...
    )
    size: str = "tiny"  # preset size: tiny, small, medium
    # extra DeltaLMConfig fields (e.g. num_layers, hidden_size); vocab_size and max_seq_len are
    # always taken from the data and run.seq_len
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare", a local file/folder, or "hf:NAME"
    cache_dir: str | None = None  # where prepared tokens live; None = the data layer's default
    vocab_size: int = 4096  # BPE vocabulary for a freshly trained tokenizer (small: CPU-friendly)
    tokenizer: str = "bpe"  # "bpe" (trained on the corpus) or "gpt2"
    val_fraction: float = 0.05  # share of the corpus held out for validation
    max_chars: int | None = None  # use only the first N characters (quick experiments, tests)


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate (SPEC §4 uses 1e-3 at 124M; tiny models take more)
    beta1: float = 0.9  # AdamW β1 (SPEC §4)
    beta2: float = 0.95  # AdamW β2 (SPEC §4)
    eps: float = 1e-8  # AdamW ε
    weight_decay: float = (
        0.1  # applied to ≥2-D weight matrices only (not norms, biases, embeddings)
    )
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables


@dataclass
class ScheduleConfig:
    warmup_steps: int = 20  # linear warm-up from 0 to the peak lr (SPEC: 2000 of 100k; tiny: short)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak lr at the last step


@dataclass
class RunConfig:
    out: str = "runs/train"  # run folder: config, checkpoints, logs, final model
    steps: int = 300  # total optimizer steps (the schedule is defined over these)
    batch_size: int = 16  # global batch in sequences per optimizer step (all ranks together)
    grad_accum: int = 1  # micro-batches per step per rank; batch_size % (world * grad_accum) == 0
    seq_len: int = 128  # tokens per sequence
    seed: int = 1337  # model init and batch order
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    dtype: str = "auto"  # autocast dtype: "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard with FSDP2 fully_shard instead of DDP (multi-process runs)
    eval_interval: int = 50  # evaluate validation loss every N steps (and at the end)
    eval_batches: int = 8  # validation batches per evaluation
    log_interval: int = 1  # write a train-loss line to log.jsonl every N steps
    checkpoint_interval: int = 100  # save a checkpoint every N steps (and at stop/end)
    keep_checkpoints: int = 2  # keep the last N checkpoints
    stop_after: int | None = None  # stop (with a checkpoint) after this step, e.g. to test resume
    skip_nonfinite: bool = False  # skip a batch with a non-finite loss instead of stopping
    progress: bool = True  # show a tqdm progress bar
    tensorboard: bool = True  # also log to TensorBoard when it is installed


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work together."""
        r = self.run
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_interval"):
            if getattr(r, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(r, name)}")
        if r.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints must be >= 1, got {r.keep_checkpoints}")
        if r.stop_after is not None and r.stop_after < 1:
            raise ConfigError(f"run.stop_after must be >= 1, got {r.stop_after}")
        if r.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"run.dtype must be auto, fp32 or bf16, got {r.dtype!r}")
        if r.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"run.device must be auto, cpu or cuda, got {r.device!r}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError("schedule.min_lr_ratio must be in [0, 1]")
        if self.schedule.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps must be >= 0")


# Keys that may change when a run is resumed: they do not change the trained weights
# (compile only reorders floating-point work).
RESUMABLE_KEYS = frozenset(
    {
        "run.out",
        "run.stop_after",
        "run.progress",
        "run.tensorboard",
        "run.keep_checkpoints",
        "run.checkpoint_interval",
        "run.eval_interval",
        "run.log_interval",
        "run.compile",
        "data.cache_dir",
    }
)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Nested plain dict (YAML/JSON-safe)."""
    return dataclasses.asdict(cfg)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.overrides":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against its field type (YAML gives ints for floats, etc.)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        # ints accept int or text; floats also accept ints; bools are never numbers here
        accepted = (int, str) if annotation is int else (int, float, str)
        noun = "an integer" if annotation is int else "a number"
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{key} must be {noun}, got {value!r}")
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(f"{key} must be {noun}, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: TrainConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "model" and len(parts) >= 3 and parts[1] == "overrides":
        cfg.model.overrides[".".join(parts[2:])] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {key!r}")
    section_name, name = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"unknown config key {key!r}")
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}")
    setattr(section, name, _coerce(value, hints[name], key))


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set dotted keys (``"optim.lr"``) in place and return ``cfg``."""
    for key, value in overrides.items():
        _set(cfg, key, value)
    return cfg


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a config from a nested dict; unknown sections or keys raise :class:`ConfigError`."""
    if not isinstance(d, dict):
        raise ConfigError("a config file must hold a mapping of sections (model, data, ...)")
    cfg = TrainConfig()
    for section, values in d.items():
        if section not in ("model", "data", "optim", "schedule", "run"):
            raise ConfigError(f"unknown config key {section!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
    return apply_overrides(cfg, _flatten(d))


def load_config(path: str | Path) -> TrainConfig:
    """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            with path.open("rb") as f:
                data = tomllib.load(f)
        else:
            data = yaml.safe_load(path.read_text()) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    return config_from_dict(data)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_diff(
    old: TrainConfig, new: TrainConfig, ignore: frozenset[str] = RESUMABLE_KEYS
) -> list[str]:
    """Dotted keys whose values differ, as ``"key (old -> new)"``, skipping ``ignore``."""
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key} ({a.get(key)!r} -> {b.get(key)!r})")
    return out


def resolve_config(
    config_file: str | Path | None, overrides: dict[str, Any], resume: bool = False
) -> TrainConfig:
    """Defaults ← (saved run config when resuming) ← config file ← overrides.

    When resuming, only what the user states explicitly (keys in the file, flags) replaces the
    saved config, so ``--resume --out RUN_DIR`` alone continues the run exactly as it was.
    """
    cfg = TrainConfig()
    out = overrides.get("run.out")
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _flatten(config_to_dict(load_config(config_file)))
        if resume:  # keep only the keys the file actually sets
            raw = Path(config_file)
            data = (
                tomllib.loads(raw.read_text())
                if raw.suffix == ".toml"
                else yaml.safe_load(raw.read_text())
            ) or {}
            file_values = _flatten(data)
        out = out or file_values.get("run.out")
    if resume:
        saved = Path(out or cfg.run.out) / "config.yaml"
        if saved.is_file():
            cfg = load_config(saved)
            cfg.run.stop_after = None  # a pause point of the earlier invocation, not of the run
    apply_overrides(cfg, file_values)
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg
