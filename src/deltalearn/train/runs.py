"""Open a finished run folder: its resolved config, trained model and tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltalearn.errors import UserError
from deltalearn.train.config import TrainConfig, load_config

__all__ = ["Run", "generate_text", "load_run", "quiet_hf"]


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide transformers' per-file progress bars ("Loading weights") for a moment."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class Run:
    path: Path  # the run folder
    config: TrainConfig  # RUN_DIR/config.yaml
    model: Any  # DeltaLM loaded from RUN_DIR/model, in eval mode
    tokenizer: Any  # PreTrainedTokenizerFast from RUN_DIR/model


def load_run(run_dir: str | Path) -> Run:
    """Load ``RUN_DIR/model`` (HF format) and ``RUN_DIR/config.yaml``; one-line errors if missing."""
    path = Path(run_dir)
    model_dir = path / "model"
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run folder (no config.yaml)")
    if not model_dir.is_dir():
        raise UserError(
            f"{path} has no trained model yet ({model_dir} is missing; finish training first)"
        )
    from transformers import AutoTokenizer

    from deltalearn.models import DeltaLM

    try:
        with quiet_hf():
            model = DeltaLM.from_pretrained(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {model_dir}: {str(e).splitlines()[0]}") from None
    model.eval()
    return Run(path, load_config(path / "config.yaml"), model, tokenizer)


def generate_text(
    run_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    greedy: bool = False,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` with the run's model (``generate`` with sampling, or argmax)."""
    import torch

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise UserError(f"--temperature must be > 0 (or pass --greedy), got {temperature}")
    run = load_run(run_dir)
    tok = run.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids if prompt else None
    if ids is None or ids.numel() == 0:  # an empty prompt starts from the document separator
        bos = tok.eos_token_id if tok.eos_token_id is not None else 0
        ids = torch.tensor([[bos]])
    limit = getattr(run.model.config, "max_seq_len", None)
    if limit is not None and ids.shape[1] >= limit:
        ids = ids[:, -(limit - 1) :]  # keep the most recent context the model can see
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - ids.shape[1])
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.eos_token_id}
    if greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or 0)
    with torch.no_grad():
        out = run.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tok.decode(out[0], skip_special_tokens=True)
