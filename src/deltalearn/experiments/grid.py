"""Sweep grids: a YAML file naming variants × seeds × (lr, steps, size) cells.

A grid file holds these keys (only ``variants`` is required)::

    extends: paper-grid                 # start from another grid (a shipped name or a path
                                        #   relative to this file) and change some keys
    description: one line for the report
    variants: [baseline, ddl, ddl-cc]   # preset names (DeltaLMConfig.preset)
    seeds: [1, 2, 3]                    # an int or a list
    lr: 2.0e-3                          # a number, a list (an axis), or {variant: number}
    steps: 300                          # an int, a list (an axis), or {variant: int}
    size: tiny                          # a size preset or a list of them
    baseline: baseline                  # the variant every other one is compared with (it
                                        #   needs to be among the variants for differences)
    steps_rule: fixed                   # or equal-flops: ``steps`` are the baseline's, every
                                        #   other variant gets the steps that spend its FLOPs
    train:                              # TrainConfig keys for every cell (nested or dotted)
      run.batch_size: 16
      data: {source: shakespeare}

The keys a cell sets itself (``model.variant``, ``model.size``, ``optim.lr``, ``run.steps``,
``run.seed``, ``run.out``) may not appear under ``train``; everything else is the same in every
cell, so a seed gives every cell the same batches in the same order (the sampler depends only on
the seed, the batch shape and the corpus). The shipped grids live in ``grids/`` beside this file
and are addressed by name (``deltalearn sweep paper-grid``).
"""

from __future__ import annotations

import copy
import importlib.resources
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltalearn.errors import ConfigError
from deltalearn.train.config import TrainConfig, _flatten, apply_overrides

__all__ = [
    "CELL_KEYS",
    "Cell",
    "Grid",
    "cell_config",
    "grid_from_dict",
    "load_grid",
    "plan_cells",
    "shipped_grids",
    "with_overrides",
]

GRID_KEYS = ("description", "variants", "seeds", "lr", "steps", "size", "baseline", "steps_rule")
STEPS_RULES = ("fixed", "equal-flops")
# TrainConfig keys that a cell sets from its axes (not allowed under ``train``).
CELL_KEYS = ("model.variant", "model.size", "optim.lr", "run.steps", "run.seed", "run.out")
# Run defaults of a sweep cell (a grid's ``train`` may change them).
CELL_DEFAULTS: dict[str, Any] = {"run.tensorboard": False, "run.keep_checkpoints": 1}


@dataclass(frozen=True)
class Cell:
    """One training run of a sweep."""

    variant: str
    size: str
    lr: float
    steps: int
    seed: int

    @property
    def name(self) -> str:
        """Its folder name under ``SWEEP_DIR/runs``."""
        return f"{self.variant}-{self.size}-lr{self.lr:.6g}-{self.steps}steps-seed{self.seed}"

    @property
    def group(self) -> tuple[str, str, float, int]:
        """The cell without its seed: the seeds of one group are averaged in the report."""
        return (self.variant, self.size, self.lr, self.steps)


@dataclass
class Grid:
    name: str
    variants: list[str]
    seeds: list[int] = field(default_factory=lambda: [1337])
    lr: list[float] | dict[str, float] = field(default_factory=lambda: [2e-3])
    steps: list[int] | dict[str, int] = field(default_factory=lambda: [300])
    size: list[str] = field(default_factory=lambda: ["tiny"])
    baseline: str = "baseline"
    steps_rule: str = "fixed"
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)  # dotted TrainConfig keys
    source: str = ""  # where it was read from (a path, or "shipped")

    def to_dict(self) -> dict[str, Any]:
        """The grid as a YAML/JSON-safe mapping (the form :func:`grid_from_dict` reads)."""
        return {
            "description": self.description,
            "variants": list(self.variants),
            "seeds": list(self.seeds),
            "lr": copy.deepcopy(self.lr),
            "steps": copy.deepcopy(self.steps),
            "size": list(self.size),
            "baseline": self.baseline,
            "steps_rule": self.steps_rule,
            "train": copy.deepcopy(self.train),
        }


def _grid_files() -> dict[str, Any]:
    folder = importlib.resources.files("deltalearn.experiments") / "grids"
    if not folder.is_dir():
        return {}
    return {f.name[: -len(".yaml")]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def shipped_grids() -> list[str]:
    """Names of the grids that ship with the package."""
    return sorted(_grid_files())


def load_grid(name_or_path: str | Path) -> Grid:
    """A shipped grid by name, or a grid YAML file by path (a path wins when both exist)."""
    data, source, name = _load_raw(str(name_or_path), base=Path.cwd(), chain=())
    try:
        return grid_from_dict(data, name=name, source=source)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _load_raw(ref: str, base: Path, chain: tuple[str, ...]) -> tuple[dict[str, Any], str, str]:
    """The mapping of grid ``ref`` with its ``extends`` chain merged in (keys of the file over its
    parent's; ``train`` merged key by key), where it came from, and its name."""
    path = base / ref
    shipped = _grid_files()
    if path.is_file():
        text, source, name = _read_text(path), str(path), path.stem
    elif ref in shipped:
        text, source, name = shipped[ref].read_text(encoding="utf-8"), f"shipped grid {ref}", ref
        path = Path()  # a shipped grid extends shipped grids only
    elif path.exists():
        raise ConfigError(f"grid file {path}: is a folder, expected a YAML file")
    else:
        raise ConfigError(
            f"grid {ref!r}: no such file, and not a shipped grid "
            f"(one of {', '.join(sorted(shipped)) or 'none'})"
        )
    if source in chain:
        raise ConfigError(f"{source}: extends itself ({' -> '.join((*chain, source))})")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: cannot parse it: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a grid must be a mapping of {', '.join(GRID_KEYS)}, train")
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data, source, name
    if not isinstance(parent_ref, str) or not parent_ref.strip():
        raise ConfigError(f"{source}: extends must be a grid name or path, got {parent_ref!r}")
    parent_base = path.parent if path != Path() else Path("/nonexistent")
    parent, _, _ = _load_raw(parent_ref, parent_base, (*chain, source))
    merged = {**parent, **data}
    if isinstance(parent.get("train"), dict) and isinstance(data.get("train"), dict):
        merged["train"] = {**_flat_train(parent["train"]), **_flat_train(data["train"])}
    return merged, source, name


def _flat_train(train: dict[str, Any]) -> dict[str, Any]:
    """``train`` with sections (``run: {steps: 1}``) written as dotted keys (``run.steps``)."""
    flat: dict[str, Any] = {}
    for key, value in train.items():
        if isinstance(key, str) and isinstance(value, dict) and "." not in key:
            flat.update(_flatten({key: value}))
        else:
            flat[key] = value
    return flat


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"grid file {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"grid file {path}: not UTF-8 text") from None


# ---- checking values ------------------------------------------------------------------------


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key} must be {expected}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _as_list(key: str, value: Any, check: Callable[[Any], bool], noun: str) -> list[Any]:
    """A scalar or a non-empty list of distinct values that pass ``check``."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _bad(key, value, f"{noun} or a non-empty list of them")
    for v in values:
        if not check(v):
            raise _bad(key, value, f"{noun} or a list of them")
    if len(set(values)) != len(values):
        raise _bad(key, value, "a list without repeats")
    return list(values)


def _axis(
    key: str, value: Any, check: Callable[[Any], bool], noun: str, variants: list[str]
) -> list[Any] | dict[str, Any]:
    """A value, a list (an axis), or a mapping {variant: value} covering every variant."""
    if not isinstance(value, dict):
        return _as_list(key, value, check, noun)
    for v, x in value.items():
        if v not in variants:
            raise ConfigError(
                f"{key}: {v!r} is not one of the grid's variants ({', '.join(variants)})"
            )
        if not check(x):
            raise _bad(f"{key}.{v}", x, noun)
    missing = [v for v in variants if v not in value]
    if missing:
        raise ConfigError(f"{key}: no value for variant(s) {', '.join(missing)}")
    return {v: value[v] for v in variants}


def _numbers(value: Any) -> Any:
    """Number-like strings as floats: YAML 1.1 reads ``1e-3`` (no dot) as a string."""

    def one(x: Any) -> Any:
        if isinstance(x, str):
            try:
                return float(x)
            except ValueError:
                return x
        return x

    if isinstance(value, list):
        return [one(x) for x in value]
    if isinstance(value, dict):
        return {k: one(x) for k, x in value.items()}
    return one(value)


def _check_variant(name: Any) -> bool:
    from deltalearn.models import VARIANTS

    return isinstance(name, str) and name in VARIANTS


def _check_size(name: Any) -> bool:
    from deltalearn.models import SIZES

    return isinstance(name, str) and name in SIZES


def _train_keys(train: Any) -> dict[str, Any]:
    if train is None:
        return {}
    if not isinstance(train, dict):
        raise _bad("train", train, "a mapping of TrainConfig keys")
    if not all(isinstance(key, str) for key in train):
        raise _bad("train", train, "a mapping with string keys")
    flat = _flat_train(train)
    for key in flat:
        if key in CELL_KEYS:
            raise ConfigError(
                f"train.{key} is set by the grid itself (variants, size, lr, steps, seeds); "
                "remove it from train"
            )
    try:
        apply_overrides(TrainConfig(), flat)  # names and types
    except ConfigError as e:
        raise ConfigError(f"train: {e}") from None
    return flat


def grid_from_dict(data: Any, name: str, source: str = "") -> Grid:
    """Check a grid mapping (see the module docstring); :class:`ConfigError` naming the bad key."""
    from deltalearn.models import SIZES, VARIANTS

    if not isinstance(data, dict):
        raise ConfigError(f"a grid must be a mapping of {', '.join(GRID_KEYS)}, train")
    unknown = [k for k in data if k not in (*GRID_KEYS, "train")]
    if unknown:
        raise ConfigError(
            f"unknown grid key {unknown[0]!r} (allowed: {', '.join(GRID_KEYS)}, train)"
        )
    if "variants" not in data:
        raise ConfigError("a grid needs variants (a list of preset names)")
    variants = _as_list(
        "variants", data["variants"], _check_variant, f"a variant name ({', '.join(VARIANTS)})"
    )
    seeds = _as_list(
        "seeds", data.get("seeds", 1337), lambda s: _is_int(s) and s >= 0, "a seed >= 0"
    )
    lr = _axis(
        "lr",
        _numbers(data.get("lr", 2e-3)),
        lambda x: _is_number(x) and x > 0,
        "a number > 0",
        variants,
    )
    steps = _axis(
        "steps",
        data.get("steps", 300),
        lambda s: _is_int(s) and s >= 1,
        "an integer >= 1",
        variants,
    )
    size = _as_list("size", data.get("size", "tiny"), _check_size, f"a size ({', '.join(SIZES)})")
    # The reference of the differences (and of equal-flops); it need not be trained in this grid.
    baseline = data.get("baseline", "baseline")
    if not _check_variant(baseline):
        raise _bad("baseline", baseline, f"a variant name ({', '.join(VARIANTS)})")
    rule = data.get("steps_rule", "fixed")
    if rule not in STEPS_RULES:
        raise _bad("steps_rule", rule, f"one of {', '.join(STEPS_RULES)}")
    if rule == "equal-flops" and isinstance(steps, dict):
        raise ConfigError(
            "steps_rule equal-flops derives the steps per variant; give steps as the baseline's (an int or a list)"
        )
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise _bad("description", description, "a string")
    return Grid(
        name=name,
        variants=variants,
        seeds=seeds,
        lr=lr,
        steps=steps,
        size=size,
        baseline=baseline,
        steps_rule=rule,
        description=" ".join(description.split()),
        train=_train_keys(data.get("train")),
        source=source,
    )


def with_overrides(grid: Grid, overrides: dict[str, Any]) -> Grid:
    """``--set`` values: grid keys (``seeds``, ``steps``, ...) replace the grid's, any other
    dotted key is a TrainConfig key for every cell (``run.batch_size``)."""
    data = grid.to_dict()
    for key, value in overrides.items():
        if key in GRID_KEYS:
            data[key] = value
        else:
            data["train"][key] = value
    if isinstance(data["lr"], dict) and "lr" not in overrides and "variants" in overrides:
        data["lr"] = {v: x for v, x in data["lr"].items() if v in data["variants"]}
    try:
        return grid_from_dict(data, name=grid.name, source=grid.source)
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None


# ---- cells ----------------------------------------------------------------------------------


def base_config(grid: Grid, variant: str, size: str) -> TrainConfig:
    """The TrainConfig every cell of ``variant`` and ``size`` starts from (lr, steps, seed unset)."""
    t = TrainConfig()
    apply_overrides(t, CELL_DEFAULTS)
    apply_overrides(t, grid.train)
    t.model.variant, t.model.size = variant, size
    return t


def plan_cells(grid: Grid, flops: Callable[[TrainConfig], float] | None = None) -> list[Cell]:
    """Every cell, seed-major (all cells of the first seed first, so that a partial sweep already
    compares every variant), then size, steps, lr, variant.

    ``flops(cfg)``: training FLOPs per token of a cell's model, needed for ``equal-flops``.
    """
    if grid.steps_rule == "equal-flops" and flops is None:
        raise ConfigError("steps_rule equal-flops needs the FLOP count of each variant")
    cells: list[Cell] = []
    seen: set[Cell] = set()
    base_steps = list(grid.steps) if isinstance(grid.steps, list) else [None]
    lrs = list(grid.lr) if isinstance(grid.lr, list) else [None]
    for seed in grid.seeds:
        for size in grid.size:
            ratio: dict[str, float] = {}
            if grid.steps_rule == "equal-flops":
                assert flops is not None
                ref = flops(base_config(grid, grid.baseline, size))
                ratio = {v: ref / flops(base_config(grid, v, size)) for v in grid.variants}
            for s in base_steps:
                for lr in lrs:
                    for v in grid.variants:
                        steps = grid.steps[v] if isinstance(grid.steps, dict) else s
                        rate = grid.lr[v] if isinstance(grid.lr, dict) else lr
                        assert steps is not None and rate is not None
                        if ratio:
                            steps = max(1, round(steps * ratio[v]))
                        cell = Cell(v, size, float(rate), int(steps), seed)
                        if cell not in seen:
                            seen.add(cell)
                            cells.append(cell)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError(
            "two cells of the grid get the same folder name (learning rates too close?)"
        )
    return cells


def cell_config(grid: Grid, cell: Cell, out: str | Path) -> TrainConfig:
    """The validated TrainConfig of ``cell`` with its run folder under ``out/runs``."""
    t = base_config(grid, cell.variant, cell.size)
    t.optim.lr, t.run.steps, t.run.seed = cell.lr, cell.steps, cell.seed
    t.run.out = str(Path(out) / "runs" / cell.name)
    t.validate()
    return t
