"""Honest splits: train on part of train, select hyperparameters on a carve of it, report on val.

The built-in tasks read one row into exactly one training example and one
evaluation item, so a seeded carve of the train file's distinct questions gives a
selection split whose questions never appear in training (rows repeating a question
stay together; rows whose question is in the report split are dropped). A user can
instead name a selection file.
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


def selection_fingerprint(select_items: list, metric: str) -> str:
    """What makes two selection scores comparable: the same selection items and the same metric."""
    return hashlib.sha256(f"{data_hash(select_items)}|{metric}".encode()).hexdigest()[:16]


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
    all_report = task.eval_items(report)
    report_items = all_report[:limit_report]
    if select is not None:
        return TaskSplits(task.train_examples(train, limit=limit_train), task.eval_items(select, limit=limit_select),
                          report_items, {"select": select})
    examples = task.train_examples(train)
    items = task.eval_items(train)
    if len(examples) != len(items):
        raise ValueError(f"{task.name}: the train split gives {len(examples)} training examples but {len(items)} "
                         f"evaluation items, so it cannot be carved; set task.select to a separate file")
    # Carve questions, not rows: copies of one question (CLUTRR's train file repeats some) fall on the same
    # side, and rows whose question is also in the report split are dropped. Without copies this is the
    # plain row carve.
    keys = [asked(x) for x in items]
    reported = {asked(x) for x in all_report}  # all of it: the training rows must not depend on limit_report
    questions = list(dict.fromkeys(k for k in keys if k not in reported))
    selected = {questions[i] for i in carve(len(questions), select_fraction, carve_seed)[1]}
    train_ex = [ex for ex, k in zip(examples, keys) if k not in reported and k not in selected][:limit_train]
    select_items = [x for x, k in zip(items, keys) if k in selected][:limit_select]
    return TaskSplits(train_ex, select_items, report_items,
                      {"from": train, "fraction": select_fraction, "seed": carve_seed,
                       "n_train": len(train_ex), "n_select": len(select_items),
                       "dropped_in_report": sum(k in reported for k in keys)})


def asked(item) -> str:
    """What an eval item asks the model (its prompt, or its MC scoring context): equal text = same question."""
    return getattr(item, "prompt", None) or getattr(item, "prefix", None) or item.question
