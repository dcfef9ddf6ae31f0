"""Command-line arguments of a tiny training run (2 layers, d = 32, a 100k-character corpus)."""

TINY_MODEL = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16}


def tiny_train_args(out, cache, *extra, steps: int = 6, eval_interval: int = 3) -> list[str]:
    """`deltalearn train ...` arguments for a run that takes about a second on one CPU thread."""
    args = [
        "train", "--out", str(out), "--variant", "ddl-cc", "--steps", str(steps),
        "--batch-size", "4", "--seq-len", "32", "--eval-interval", str(eval_interval),
        "--eval-batches", "2", "--vocab-size", "300", "--cache-dir", str(cache), "--no-progress",
        "--no-tensorboard", "--warmup-steps", "2", "--set", "data.max_chars=100000", *extra,
    ]  # fmt: skip
    return args + [f"--set=model.overrides.{k}={v}" for k, v in TINY_MODEL.items()]
