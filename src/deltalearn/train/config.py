"""Typed training configuration: nested dataclasses, YAML/TOML loading, dotted overrides.

A run is described by one :class:`TrainConfig`. It is built from the defaults, then a config
file (``--config FILE``, YAML or TOML, nested sections as below), then dotted overrides
(``{"optim.lr": 3e-3}``) — the command line turns its flags into such a dict, so this module
never sees ``argv``. Unknown keys raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltalearn.atomic import atomic_write_text
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
    "bad_value",
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
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    cuda_graphs: bool = False  # record the training step as a CUDA graph and replay it (one GPU)
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
        """Raise :class:`ConfigError` for the first value outside its allowed range.

        Every field of every section is checked (type, then range); the message names the dotted
        key, the value and what is allowed. The model section is checked by building its
        ``DeltaLMConfig`` (cheap: no weights), so a bad override fails here, before any data is
        prepared. A warm-up longer than the run is legal: the lr then rises until the last step.
        """
        for section in (self.model, self.data, self.optim, self.schedule, self.run):
            name = _SECTION_NAMES[type(section)]
            for f in dataclasses.fields(section):
                _check_type(
                    f"{name}.{f.name}", getattr(section, f.name), _HINTS[type(section)][f.name]
                )
        self._validate_data()
        o = self.optim
        _check_range("optim.lr", o.lr, low=0.0, low_open=True)
        _check_range("optim.beta1", o.beta1, low=0.0, high=1.0, high_open=True)
        _check_range("optim.beta2", o.beta2, low=0.0, high=1.0, high_open=True)
        _check_range("optim.eps", o.eps, low=0.0, low_open=True)
        _check_range("optim.weight_decay", o.weight_decay, low=0.0)
        _check_range("optim.grad_clip", o.grad_clip, low=0.0, note="0 disables clipping")
        _check_range("schedule.warmup_steps", self.schedule.warmup_steps, low=0)
        _check_range("schedule.min_lr_ratio", self.schedule.min_lr_ratio, low=0.0, high=1.0)
        self._validate_run()
        self._validate_model()  # last: the model takes its vocabulary and context from the rest

    def _validate_model(self) -> None:
        from deltalearn.models import SIZES, VARIANTS
        from deltalearn.train.build import model_config

        _check_choice("model.variant", self.model.variant, tuple(VARIANTS))
        _check_choice("model.size", self.model.size, tuple(SIZES))
        for key in self.model.overrides:
            if not isinstance(key, str):
                raise _invalid("model.overrides", key, "field names (strings) as keys")
        model_config(self, self._model_vocab_size())

    def _model_vocab_size(self) -> int:
        """The vocabulary the model will get (known exactly for gpt2; at most this for bpe)."""
        from deltalearn.data.tokenizer import GPT2_VOCAB_SIZE

        return GPT2_VOCAB_SIZE if self.data.tokenizer == "gpt2" else self.data.vocab_size

    def _validate_data(self) -> None:
        from deltalearn.data.split import check_val_fraction
        from deltalearn.data.tokenizer import MIN_BPE_VOCAB, TOKENIZER_KINDS
        from deltalearn.errors import DataError

        d = self.data
        if not d.source.strip():
            raise _invalid("data.source", d.source, "a corpus name, a path or hf:NAME")
        if d.cache_dir is not None and not d.cache_dir.strip():
            raise _invalid("data.cache_dir", d.cache_dir, "a folder path, or null for the default")
        _check_choice("data.tokenizer", d.tokenizer, TOKENIZER_KINDS)
        if d.tokenizer == "bpe":
            _check_range("data.vocab_size", d.vocab_size, low=MIN_BPE_VOCAB, note="for bpe")
        try:  # the data layer owns the rule
            check_val_fraction(d.val_fraction)
        except DataError as e:
            raise bad_value("data.val_fraction", f"data.{e}") from None
        if d.max_chars is not None:
            _check_range("data.max_chars", d.max_chars, low=1, note="or null for the whole corpus")

    def _validate_run(self) -> None:
        r = self.run
        if not r.out.strip():
            raise _invalid("run.out", r.out, "a folder path")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_checkpoints",
        ):
            _check_range(f"run.{name}", getattr(r, name), low=1)
        if r.batch_size % r.grad_accum:
            raise bad_value(
                "run.batch_size",
                f"run.batch_size ({r.batch_size}) must be divisible by run.grad_accum "
                f"({r.grad_accum})",
            )
        _check_range("run.seed", r.seed, low=0)
        if r.seed >= 2**64:  # torch.manual_seed's limit
            raise _invalid("run.seed", r.seed, "below 2**64")
        _check_choice("run.device", r.device, ("auto", "cpu", "cuda"))
        _check_choice("run.dtype", r.dtype, ("auto", "fp32", "bf16"))
        if r.stop_after is not None:
            _check_range("run.stop_after", r.stop_after, low=1, note="or null to run to the end")
        if r.cuda_graphs:
            self._check_cuda_graphs()

    def _check_cuda_graphs(self) -> None:
        """run.cuda_graphs records the eager step of one CUDA process (`train.cuda_graph`)."""
        r = self.run
        if r.device == "cpu":
            raise _invalid("run.cuda_graphs", r.cuda_graphs, "false with run.device cpu")
        excluded = {  # each would need its own capture rules; none is verified recorded
            "run.compile": "a compiled step is a different program (Inductor's)",
            "run.fsdp": "FSDP2 gathers and reduces from hooks outside the recorded kernels",
            "run.activation_checkpointing": "its recompute saves and restores RNG state in Python",
        }
        for key, why in excluded.items():
            if getattr(r, key.removeprefix("run.")):
                raise bad_value(
                    "run.cuda_graphs", f"run.cuda_graphs cannot be combined with {key}: {why}"
                )


_SECTION_NAMES = {
    ModelConfig: "model",
    DataConfig: "data",
    OptimConfig: "optim",
    ScheduleConfig: "schedule",
    RunConfig: "run",
}
_HINTS = {cls: typing.get_type_hints(cls) for cls in _SECTION_NAMES}


def bad_value(key: str, message: str) -> ConfigError:
    """A :class:`ConfigError` about the dotted ``key`` (kept as ``.key``, so that the caller
    can also name the file the value came from)."""
    error = ConfigError(message)
    error.key = key  # type: ignore[attr-defined]
    return error


def _invalid(key: str, value: Any, allowed: str) -> ConfigError:
    return bad_value(key, f"{key} must be {allowed}, got {value!r}")


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _invalid(key, value, f"one of {', '.join(allowed)}")


def _check_range(
    key: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
) -> None:
    """``value`` must be finite and lie within the bounds (open or closed at each end)."""
    ok = isinstance(value, int) or math.isfinite(value)  # (huge ints overflow isfinite)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    lo, hi = _number(low), _number(high)
    if low is not None and high is not None:
        allowed = f"lie in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"be {'>' if low_open else '>='} {lo}"
    else:
        allowed = f"be {'<' if high_open else '<='} {hi}"
    suffix = f" ({note})" if note else ""
    raise bad_value(key, f"{key} must {allowed}{suffix}, got {value!r}")


def _number(x: float | None) -> str:
    return str(x) if isinstance(x, int | None) else f"{x:g}"


def _check_type(key: str, value: Any, annotation: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` has the field's type (ints count as floats,
    bools never as numbers). Catches values set in Python, which skip :func:`_coerce`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        ok, noun = isinstance(value, bool), "true or false"
    elif annotation is int:
        ok, noun = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        noun = "a number"
    elif annotation is str:
        ok, noun = isinstance(value, str), "a string"
    else:  # dict[str, Any]
        ok, noun = isinstance(value, dict), "a mapping"
    if not ok:
        raise _invalid(key, value, noun)


# Keys that may change when a run is resumed: they do not change the trained weights
# (compile only reorders floating-point work; activation checkpointing recomputes the same ops).
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
        "run.activation_checkpointing",
        "run.cuda_graphs",
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


def _read_file(path: Path) -> dict[str, Any]:
    """The nested mapping in a YAML or TOML file; one-line :class:`ConfigError` naming the file
    when it is missing, not a file, unreadable, not text, not parseable or not a mapping."""
    what = f"config file {path}"
    if not path.exists():
        raise ConfigError(f"{what}: not found")
    if not path.is_file():
        raise ConfigError(f"{what}: is a folder, expected a YAML or TOML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{what}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: not UTF-8 text (corrupt?)") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{what}: cannot parse it: {str(e).splitlines()[0]}") from None
    if data is None:  # an empty YAML file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what}: expected a mapping of sections (model, data, optim, schedule, run), "
            f"got {type(data).__name__} {_short(data)}"
        )
    return data


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_config(path: str | Path, *, complete: bool = False) -> TrainConfig:
    """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file.

    ``complete=True`` also requires every key (as :func:`save_config` writes them): a run's
    ``config.yaml`` with keys missing is truncated, and defaults must not fill the gap. Every
    error names the file.
    """
    path = Path(path)
    data = _read_file(path)
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if complete:
        missing = sorted(set(_flatten(config_to_dict(TrainConfig()))) - set(_flatten(data)))
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if missing[3:] else ""
            )
            raise ConfigError(
                f"config file {path}: {shown} missing (truncated, or not written by deltalearn)"
            )
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash leaves the old file or the new)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


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
    saved config, so ``--resume --out RUN_DIR`` alone continues the run exactly as it was. A bad
    value names its key, and also the file it came from when no flag replaced it.
    """
    cfg = TrainConfig()
    file_values: dict[str, Any] = {}
    if config_file is not None:
        load_config(config_file)  # names and types, errors naming the file
        file_values = _flatten(_read_file(Path(config_file)))  # only the keys it sets
    saved: Path | None = None
    if resume:
        out = overrides.get("run.out") or file_values.get("run.out") or cfg.run.out
        saved = Path(out) / "config.yaml"
        if saved.exists():
            cfg = load_config(saved, complete=True)
            cfg.run.stop_after = None  # a pause point of the earlier invocation, not of the run
        else:
            saved = None
    apply_overrides(cfg, file_values)
    apply_overrides(cfg, overrides)
    try:
        cfg.validate()
    except ConfigError as e:
        key = getattr(e, "key", None)
        if key is None or any(_covers(k, key) for k in overrides):
            raise
        if config_file is not None and any(_covers(k, key) for k in file_values):
            raise ConfigError(f"config file {config_file}: {e}") from None
        if saved is not None:
            raise ConfigError(f"config file {saved}: {e}") from None
        raise
    return cfg


def _covers(set_key: str, bad_key: str) -> bool:
    """Whether setting ``set_key`` (e.g. ``model.overrides``) set ``bad_key``."""
    return bad_key == set_key or bad_key.startswith(set_key + ".")
