"""lm-evaluation-harness with DeltaLM registered: ``deltalearn lm-eval ARGS…`` and
``python -m deltalearn.lm_eval ARGS…``.

lm-eval 0.4.13 has no plugin hook, so DeltaLM's `AutoConfig` / `AutoModelForCausalLM`
registration (done by ``import deltalearn``) has to happen inside lm-eval's own process. This
module does that and then runs lm-eval's own command line with the arguments unchanged, so every
lm-eval flag works as documented, with its ``hf`` model type and no remote code::

    deltalearn lm-eval --model hf --model_args pretrained=RUN/model,dtype=float32 \\
        --tasks arc_easy --num_fewshot 1 --batch_size 16 --output_path results/

One convenience: ``pretrained=RUN`` (or ``tokenizer=RUN``) naming a `deltalearn train` run folder
is read as ``RUN/model``, where the run keeps its final model and tokenizer. Nothing else is
touched.

What lm-eval hands the model (checked in ``tests/test_lm_eval.py``): log-likelihood and rolling
log-likelihood requests call ``model(input_ids)`` on right-padded batches with no attention mask
and no positions (DeltaLM is causal everywhere, token-axis convolutions included, so the padding
after a row's last token changes none of its logits); ``generate_until`` calls ``generate`` on
left-padded batches with the attention mask and ``use_cache=True`` (DeltaLM hides pad tokens from
attention and the convolutions and counts RoPE positions over real tokens only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["import_harness", "main", "map_run_folders", "register", "run_model_dir"]

# `key=value` entries of --model_args whose value may name a run folder.
PATH_KEYS = ("pretrained", "tokenizer")
MODEL_ARGS_FLAGS = ("--model_args", "-a")


def register() -> None:
    """Register DeltaLM with transformers' Auto classes (what ``import deltalearn`` does)."""
    import deltalearn  # noqa: F401  (the import registers DeltaLMConfig and DeltaLM)


def import_harness():
    """The real ``lm_eval`` package (with ``lm_eval.__main__``), or :class:`UserError` naming the
    extra that installs it."""
    import importlib

    try:
        importlib.import_module("lm_eval.__main__")  # absolute: lm-evaluation-harness itself
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "lm_eval":
            raise
        from deltalearn.errors import UserError

        raise UserError(
            "lm-evaluation-harness is not installed: pip install 'deltalearn[eval]' "
            "(or pip install 'lm-eval[hf]>=0.4.13')"
        ) from None
    return sys.modules["lm_eval"]


def run_model_dir(value: str) -> str:
    """``RUN/model`` when ``value`` is a run folder of `deltalearn train` (its ``config.yaml``
    beside a ``model/`` holding ``config.json``); ``value`` itself otherwise."""
    path = Path(value)
    try:
        is_run = (path / "config.yaml").is_file() and (path / "model" / "config.json").is_file()
    except OSError:  # e.g. a name too long to be a path: a Hub model id, left as it is
        return value
    return str(path / "model") if is_run else value


def _map_model_args_value(value: str) -> str:
    """One value of --model_args: a JSON object, or ``key=value`` entries joined by commas."""
    if value.lstrip().startswith("{"):
        try:
            args = json.loads(value)
        except ValueError:
            return value  # lm-eval reports it
        if not isinstance(args, dict):
            return value
        mapped = {
            k: run_model_dir(v) if k in PATH_KEYS and isinstance(v, str) else v
            for k, v in args.items()
        }
        return value if mapped == args else json.dumps(mapped)
    parts = []
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if sep and key.strip() in PATH_KEYS:
            part = f"{key}={run_model_dir(val)}"
        parts.append(part)
    return ",".join(parts)


def map_run_folders(argv: list[str]) -> list[str]:
    """``argv`` with ``pretrained=RUN`` / ``tokenizer=RUN`` in the values of ``--model_args``
    (``-a``) mapped to ``RUN/model`` when RUN is a run folder; every other token unchanged."""
    out: list[str] = []
    in_model_args = False
    for token in argv:
        if token == "--":
            in_model_args = False
            out.append(token)
            continue
        if token in MODEL_ARGS_FLAGS:
            in_model_args = True
            out.append(token)
            continue
        if token.startswith("--model_args="):
            flag, _, value = token.partition("=")
            out.append(f"{flag}={_map_model_args_value(value)}")
            in_model_args = False
            continue
        if token.startswith("-"):
            in_model_args = False
        out.append(_map_model_args_value(token) if in_model_args else token)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default ``sys.argv[1:]``) with DeltaLM registered;
    returns its exit status (0 when it returns normally)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    cli_evaluate = import_harness().__main__.cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *map_run_folders(argv)]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse errors, --help
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
