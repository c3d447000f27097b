"""Honest splits: train on part of train, select hyperparameters on a carve of it, report on val.

The built-in tasks read one row into exactly one training example and one
evaluation item, so a seeded carve of row indices gives a selection split whose
questions never appear in training. A user can instead name a selection file.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, is_dataclass


@dataclass
class TaskSplits:
    train: list  # SFT or preference examples
    select: list  # eval items the search optimises
    report: list  # held-out eval items scored once at the end
    carve: dict  # how select was made (for the record)

    def train_hash(self) -> str:
        return data_hash(self.train)


def data_hash(items: list) -> str:
    payload = json.dumps([asdict(x) if is_dataclass(x) else x for x in items], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def carve(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, selection indices), seeded, disjoint, covering range(n)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_select = max(1, round(n * fraction))
    if n_select >= n:
        raise ValueError(f"cannot carve {fraction:.0%} of {n} rows for selection and still train; "
                         f"lower task.select_fraction or use more rows")
    return sorted(order[n_select:]), sorted(order[:n_select])


def build_splits(task, train: str = "train", report: str = "val", select: str | None = None,
                 select_fraction: float = 0.2, carve_seed: int = 0, limit_train: int | None = None,
                 limit_select: int | None = None, limit_report: int | None = None) -> TaskSplits:
    """Read a task's files into train / select / report lists (any split may be a file path)."""
    report_items = task.eval_items(report, limit=limit_report)
    if select is not None:
        return TaskSplits(task.train_examples(train, limit=limit_train), task.eval_items(select, limit=limit_select),
                          report_items, {"select": select})
    examples = task.train_examples(train)
    items = task.eval_items(train)
    if len(examples) != len(items):
        raise ValueError(f"{task.name}: the train split gives {len(examples)} training examples but {len(items)} "
                         f"evaluation items, so it cannot be carved; set task.select to a separate file")
    train_idx, select_idx = carve(len(examples), select_fraction, carve_seed)
    train_ex = [examples[i] for i in train_idx][:limit_train]
    select_items = [items[i] for i in select_idx][:limit_select]
    return TaskSplits(train_ex, select_items, report_items,
                      {"from": train, "fraction": select_fraction, "seed": carve_seed,
                       "n_train": len(train_ex), "n_select": len(select_items)})
