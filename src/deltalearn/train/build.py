"""Build the two things a run needs from its config: the prepared data and the model."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from deltalearn.errors import ConfigError
from deltalearn.train.config import TrainConfig, bad_value

__all__ = ["build_model", "check_model_fields", "model_config", "prepare_data"]


def prepare_data(cfg: TrainConfig, progress: bool = True) -> Any:
    """Tokenise (or load from cache) the corpus named by ``cfg.data``; returns ``PreparedData``."""
    from deltalearn.data import prepare_dataset

    d = cfg.data
    return prepare_dataset(
        source=d.source,
        cache_dir=d.cache_dir,
        vocab_size=d.vocab_size,
        tokenizer=d.tokenizer,
        val_fraction=d.val_fraction,
        max_chars=d.max_chars,
        progress=progress,
    )


# Python types of the DeltaLMConfig field annotations (they are strings: postponed evaluation).
_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
_NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _override_fields(config_cls: type) -> dict[str, tuple[type, ...]]:
    """The overridable fields of ``DeltaLMConfig`` (its own, not the inherited transformers
    ones) with the Python types each accepts."""
    own = {k: v for k, v in config_cls.__annotations__.items() if not str(v).startswith("ClassVar")}
    fields = {}
    for f in dataclasses.fields(config_cls):
        if f.name in own:
            names = [part.strip() for part in str(own[f.name]).split("|")]
            fields[f.name] = tuple(_TYPE_NAMES[n] for n in names if n in _TYPE_NAMES)
    return fields


def _accepts(types: tuple[type, ...], value: Any) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:  # an int is a fine float
        return True
    return isinstance(value, types)


def _type_error(key: str, value: Any, types: tuple[type, ...]) -> ConfigError | None:
    if _accepts(types, value):
        return None
    noun = " or ".join(_NOUNS.get(t, "null") for t in types)
    return bad_value(key, f"{key} must be {noun}, got {value!r}")


def check_model_fields(values: dict[str, Any], prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming ``prefix + name`` for the first ``DeltaLMConfig`` field
    in ``values`` whose value has the wrong type (a string for an integer, ...). Names that are
    not DeltaLMConfig's own fields are left to it."""
    from deltalearn.models import DeltaLMConfig

    fields = _override_fields(DeltaLMConfig)
    for name, value in values.items():
        types = fields.get(DeltaLMConfig.attribute_map.get(name, name))
        error = None if types is None else _type_error(f"{prefix}{name}", value, types)
        if error is not None:
            raise error


def _checked_overrides(cfg: TrainConfig, config_cls: type) -> tuple[dict[str, Any], dict[str, str]]:
    """``cfg.model.overrides`` with aliases resolved, after checking each name and type (errors
    name ``model.overrides.<name>``), and each field's name as the user spelled it."""
    fields = _override_fields(config_cls)
    aliases = dict(config_cls.attribute_map)
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, value in cfg.model.overrides.items():
        key = f"model.overrides.{name}"
        field = aliases.get(name, name)
        if field not in fields:
            raise bad_value(
                key,
                f"{key}: unknown DeltaLMConfig field; expected one of "
                + ", ".join(sorted(set(fields) - {"vocab_size"})),
            )
        if field == "vocab_size":
            raise bad_value(key, f"{key}: the vocabulary comes from the data; set data.vocab_size")
        if field in out:
            raise bad_value(key, f"{key} sets {field} twice (with its alias)")
        error = _type_error(key, value, fields[field])
        if error is not None:
            raise error
        out[field] = value
        spelled[field] = name
    seq_len = out.get("max_seq_len")
    if seq_len is not None and isinstance(cfg.run.seq_len, int) and seq_len < cfg.run.seq_len:
        raise bad_value(
            "model.overrides.max_seq_len",
            f"model.overrides.max_seq_len ({seq_len}) must be >= run.seq_len ({cfg.run.seq_len})",
        )
    return out, spelled


def model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """The ``DeltaLMConfig`` for this run: preset + overrides, vocab and context from the run.

    A bad override raises :class:`ConfigError` naming ``model.overrides.<field>``; any other
    exception from ``DeltaLMConfig`` is a bug and propagates unchanged.
    """
    from deltalearn.models import DeltaLMConfig

    overrides, spelled = _checked_overrides(cfg, DeltaLMConfig)
    overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", cfg.run.seq_len)
    try:
        return DeltaLMConfig.preset(cfg.model.variant, size=cfg.model.size, **overrides)
    except ValueError as e:  # DeltaLMConfig's "<field> must ..." for a bad value
        raise _model_error(cfg, str(e).splitlines()[0], spelled) from None


def _model_error(cfg: TrainConfig, message: str, spelled: dict[str, str]) -> ConfigError:
    """Name the config key behind a ``DeltaLMConfig`` message that starts with a field name."""
    field = message.split(" ", 1)[0]
    if field in ("variant", "size"):
        return bad_value(f"model.{field}", f"model.{message}")
    if field in spelled:  # the user's own name for it (maybe an alias such as num_hidden_layers)
        key = f"model.overrides.{spelled[field]}"
        return bad_value(key, f"{key}{message[len(field) :]}")
    if field == "max_seq_len":
        return bad_value("run.seq_len", f"run.seq_len (the model's max_seq_len): {message}")
    if field == "vocab_size":
        return bad_value("data.vocab_size", f"data.vocab_size (the model's vocab_size): {message}")
    overrides = ", ".join(f"{k}={v!r}" for k, v in cfg.model.overrides.items()) or "none"
    return bad_value(
        "model.overrides",
        f"model (variant {cfg.model.variant}, size {cfg.model.size}, overrides {overrides}): "
        f"{message}",
    )


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """A freshly initialised ``DeltaLM`` (seed the RNG before calling for a reproducible init)."""
    from deltalearn.models import DeltaLM

    return DeltaLM(model_config(cfg, vocab_size))
