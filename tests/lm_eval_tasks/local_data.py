"""Data loader for the local lm-eval test tasks in this folder (no network, any checkout path).

lm-evaluation-harness resolves ``!function local_data.load`` against the folder of the YAML that
names it, and calls ``custom_dataset`` with the task's ``dataset_kwargs``; the jsonl files are
found beside this module, so the YAMLs work from wherever the repository is checked out.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(files: dict[str, str], **_metadata):
    """``{split: file name}`` → a ``datasets.DatasetDict`` of the jsonl files beside this module
    (lm-eval also passes its run metadata as keyword arguments: ignored)."""
    import datasets

    splits = {}
    for split, name in files.items():
        with open(HERE / name, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
