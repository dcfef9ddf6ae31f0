"""Open a finished run folder: its resolved config, trained model and tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltalearn.errors import ConfigError, UserError
from deltalearn.files import read_json_object
from deltalearn.train.config import TrainConfig, load_config

__all__ = [
    "RUN_LAYOUT",
    "Run",
    "check_folder_path",
    "check_run_paths",
    "generate_text",
    "load_run",
    "quiet_hf",
]


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


RUN_CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
MODEL_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# What a training run writes into its folder ("" is the folder itself): a folder or a file.
RUN_LAYOUT: dict[str, str] = {
    "": "folder",
    "config.yaml": "file",
    "log.jsonl": "file",
    "summary.json": "file",
    "tensorboard": "folder",
    "checkpoints": "folder",
    "tokenizer": "folder",
    "tokenizer/tokenizer.json": "file",
    "tokenizer/tokenizer_config.json": "file",
    "model": "folder",
    "model/config.json": "file",
    "model/generation_config.json": "file",
    "model/model.safetensors": "file",
    "model/tokenizer.json": "file",
    "model/tokenizer_config.json": "file",
}


def _kind(path: Path) -> str:
    return "folder" if path.is_dir() else "file"


def check_folder_path(path: str | Path, what: str) -> None:
    """Raise :class:`UserError` unless ``path`` is a folder or can be created as one: it is a
    file, or one of its parents is."""
    path = Path(path)
    existing = path.absolute()
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path.absolute() else f" ({existing} is a file)"
        raise UserError(f"{what} {path}: is a file, expected a folder{where}")


def check_run_paths(run_dir: str | Path) -> None:
    """Before training into ``run_dir``: raise :class:`UserError` naming the first path the run
    would write that exists with the wrong kind (a file where a folder goes, or the reverse), so
    that a run never fails on it halfway."""
    path = Path(run_dir)
    check_folder_path(path, "run folder")
    for rel, kind in RUN_LAYOUT.items():
        target = path / rel if rel else path
        if (target.exists() or target.is_symlink()) and _kind(target) != kind:
            what = "run folder" if not rel else f"run {kind}"
            raise UserError(f"{what} {target}: is a {_kind(target)}, expected a {kind}")


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} {path}: not found")
    if not path.is_dir():
        raise UserError(f"{what} {path}: is a file, expected a folder")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes in a safetensors file; :class:`UserError` naming it when it is missing,
    truncated or not a safetensors file (the library checks the header against the size)."""
    from safetensors import SafetensorError, safe_open

    what = "weights file"
    if not path.exists():
        raise UserError(f"{what} {path}: missing")
    if not path.is_file():
        raise UserError(f"{what} {path}: is a folder, expected a file")
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"{what} {path}: truncated or corrupt ({size} bytes; {reason})") from None


def _check_weights(model_dir: Path, config: Any) -> None:
    """The weights file holds exactly the tensors (names and shapes) that ``config``'s model has,
    so loading never leaves a layer randomly initialised or fails on a shape."""
    import torch

    from deltalearn.models import DeltaLM

    weights = model_dir / WEIGHTS_FILE
    found = _tensor_shapes(weights)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = DeltaLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = sorted(set(expected) - set(found) - tied)
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if missing[3:] else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if unexpected[3:] else ''}")
    if wrong:
        name = wrong[0]
        problems.append(f"{name} has shape {list(found[name])}, the model {list(expected[name])}")
    if problems:
        raise UserError(
            f"weights file {weights}: does not match {model_dir / MODEL_CONFIG_FILE} "
            f"({'; '.join(problems)})"
        )


def _load_model_config(model_dir: Path) -> Any:
    from deltalearn.models import DeltaLMConfig
    from deltalearn.train.build import check_model_fields

    path = model_dir / MODEL_CONFIG_FILE
    values = read_json_object(path, "model config")
    try:
        check_model_fields(values)
        return DeltaLMConfig.from_dict(values)
    except ValueError as e:  # ConfigError from the type check, ValueError from DeltaLMConfig
        raise UserError(f"model config {path}: {str(e).splitlines()[0]}") from None


def load_run(run_dir: str | Path) -> Run:
    """Load ``RUN_DIR/config.yaml`` and ``RUN_DIR/model`` (HF format: config, weights,
    tokenizer). Every file is checked first, so a missing, truncated or corrupt one is reported
    in one line naming it (:class:`UserError`) instead of a loader's traceback."""
    from deltalearn.data.tokenizer import load_tokenizer
    from deltalearn.models import DeltaLM

    path = Path(run_dir)
    _check_folder(path, "run folder")
    config_file = path / RUN_CONFIG_FILE
    if not config_file.exists():
        raise UserError(f"run folder {path}: not a run folder (no {RUN_CONFIG_FILE})")
    cfg = load_config(config_file, complete=True)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"config file {config_file}: {e}") from None
    model_dir = path / MODEL_DIR
    if not model_dir.exists():
        raise UserError(
            f"{path} has no trained model yet ({model_dir} is missing; finish training first)"
        )
    _check_folder(model_dir, "model folder")
    config = _load_model_config(model_dir)
    _check_weights(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    try:
        with quiet_hf():
            model = DeltaLM.from_pretrained(model_dir, config=config)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {model_dir}: {str(e).splitlines()[0]}") from None
    model.eval()
    return Run(path, cfg, model, tokenizer)


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
