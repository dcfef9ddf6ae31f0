"""Build the two things a run needs from its config: the prepared data and the model."""

from __future__ import annotations

from typing import Any

from torch import nn

from deltalearn.errors import ConfigError
from deltalearn.train.config import TrainConfig

__all__ = ["build_model", "model_config", "prepare_data"]


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


def model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """The ``DeltaLMConfig`` for this run: preset + overrides, vocab and context from the run."""
    from deltalearn.models import DeltaLMConfig

    overrides = dict(cfg.model.overrides)
    overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", cfg.run.seq_len)
    try:
        return DeltaLMConfig.preset(cfg.model.variant, size=cfg.model.size, **overrides)
    except (TypeError, ValueError) as e:  # unknown variant/size/field: the user's config
        raise ConfigError(f"model config: {str(e).splitlines()[0]}") from None


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """A freshly initialised ``DeltaLM`` (seed the RNG before calling for a reproducible init)."""
    from deltalearn.models import DeltaLM

    return DeltaLM(model_config(cfg, vocab_size))
