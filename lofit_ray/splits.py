"""Honest splits: train on part of train, select hyperparameters on a carve of it, report on val.

Every task reads one row into exactly one training example and one evaluation item,
so a seeded carve of the train file's distinct questions gives a selection split whose
questions never appear in training (rows repeating a question stay together; rows
whose question is in the task's own report split are dropped and counted).

A split the user names (task.select, or task.train / task.report given as a file) is checked
against the earlier splits (train, then select, then report) by what each item asks: sharing
items is an error naming them, unless task.on_overlap is `drop`, which drops them from the later
split and counts them. A report split that is the training data is an error either way.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from .tasks.base import TaskDataError


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
                 limit_select: int | None = None, limit_report: int | None = None,
                 on_overlap: str = "error") -> TaskSplits:
    """Read a task's files into train / select / report lists (any split may be a file path).

    The three are disjoint by what each item asks (`asked`). Named splits (module docstring) sharing items with
    an earlier one are an error, or with on_overlap="drop" lose those items; otherwise a training row or carved
    selection item whose prompt is in the report split is dropped. Every count goes into `carve` (the record and
    the search's report show them). A split left empty is an error naming the field to change."""
    examples = task.train_examples(train)
    items = _eval_items_of_train(task, train) if select is not None else task.eval_items(train)
    keys = [asked(x) for x in items] if len(items) == len(examples) else [ex.prompt for ex in examples]
    trained = set(keys)
    overlap_dropped = {}
    all_report = task.eval_items(report)
    same_file = _is_file(report) and _is_file(train) and _resolved(report) == _resolved(train)
    if same_file or (all_report and all(asked(x) in trained for x in all_report)):  # whatever on_overlap says
        raise _empty("task.report", f"{report} is the training data ({train}): every item it asks is trained on",
                     "name a held-out split or file")
    if _is_file(report) or _is_file(train):  # the user's own files meet: check them, never drop training rows
        all_report = _without_overlap(all_report, trained, ("task.report", report), ("task.train", train),
                                      on_overlap, overlap_dropped)
    if select is not None:
        all_select = _without_overlap(task.eval_items(select), trained, ("task.select", select),
                                      ("task.train", train), on_overlap, overlap_dropped)
        all_report = _without_overlap(all_report, {asked(x) for x in all_select}, ("task.report", report),
                                      ("task.select", select), on_overlap, overlap_dropped)
    report_items = all_report[:limit_report]
    reported = {asked(x) for x in all_report}  # all of it: the training rows must not depend on limit_report
    if select is not None:
        select_items = all_select
        train_ex = [ex for ex, k in zip(examples, keys) if k not in reported]
        carve_info = {"select": select}
    else:
        if len(examples) != len(items):
            raise ValueError(f"{task.name}: the train split gives {len(examples)} training examples but {len(items)} "
                             f"evaluation items, so it cannot be carved; set task.select to a separate file")
        # Carve questions, not rows: copies of one question (CLUTRR's train file repeats some) fall on the same
        # side, and rows whose question is also in the report split are dropped. Without copies this is the
        # plain row carve.
        questions = list(dict.fromkeys(k for k in keys if k not in reported))
        if select_fraction == 0:  # nothing is chosen (a study without a search): all of train is trained on
            questions = []
        elif len(questions) < 2:
            raise _empty("task.train", f"{len(questions)} distinct prompt(s) of {train} are not in the report split; "
                         f"the selection carve needs at least 2", "use more training rows or another report split")
        selected = {questions[i] for i in carve(len(questions), select_fraction, carve_seed)[1]} if questions else set()
        train_ex = [ex for ex, k in zip(examples, keys) if k not in reported and k not in selected]
        select_items = [x for x, k in zip(items, keys) if k in selected]
        carve_info = {"from": train, "fraction": select_fraction, "seed": carve_seed}
    train_ex, select_items = train_ex[:limit_train], select_items[:limit_select]
    if not train_ex:
        raise _empty("task.train", f"no training rows of {train} are left once the prompts also in the selection or "
                     f"report split are dropped", "give more or other training rows, or another report split")
    if not select_items and (select is not None or select_fraction > 0):
        raise _empty("task.select", "the selection split is empty once the prompts also in another split are "
                     "dropped", "name another selection split, or leave task.select out to carve it from train")
    if not report_items:
        raise _empty("task.report", "the report split is empty once the prompts also in another split are dropped",
                     "name another report split")
    carve_info.update(n_train=len(train_ex), n_select=len(select_items), n_report=len(report_items),
                      dropped_in_report=sum(k in reported for k in keys), **overlap_dropped)
    return TaskSplits(train_ex, select_items, report_items, carve_info)


def _is_file(split: str | None) -> bool:
    """A split given as a path (the user's own file or folder), not a split name of the task's data."""
    return split is not None and Path(str(split)).expanduser().exists()


def _resolved(split: str) -> Path:
    return Path(str(split)).expanduser().resolve()


def _without_overlap(later: list, earlier: set, later_split: tuple[str, str], earlier_split: tuple[str, str],
                     on_overlap: str, dropped: dict) -> list:
    """`later` without the items whose prompt is in `earlier` (on_overlap="drop", counted in `dropped` as
    overlap_<field>), or a TaskDataError naming both splits, the count and the first three."""
    shared = [x for x in later if asked(x) in earlier]
    if not shared:
        return later
    (field, name), (earlier_field, earlier_name) = later_split, earlier_split
    short = field.removeprefix("task.")
    if on_overlap != "drop":
        first = "; ".join(repr(asked(x)[:80]) for x in shared[:3])
        raise _empty(field, f"{len(shared)} item(s) of {name} are also in {earlier_field} ({earlier_name}), by "
                     f"prompt: {first}", f"remove them from one file, or set task.on_overlap: drop to drop them "
                     f"from the {short} split (counted in the search's report)")
    dropped[f"overlap_{short}"] = dropped.get(f"overlap_{short}", 0) + len(shared)
    return [x for x in later if asked(x) not in earlier]


def _eval_items_of_train(task, train) -> list:
    """The train split read as evaluation items (what each row asks), or [] where its rows have no such reading
    (a JSONL file of SFT or DPO rows): the training prompts then stand for what is asked."""
    try:
        return task.eval_items(train)
    except TaskDataError:
        return []


def _empty(field: str, what: str, fix: str):
    return TaskDataError(f"{field}: {what}; {fix}.")


def asked(item) -> str:
    """What an eval item asks the model (its prompt, or its MC scoring context): equal text = same question."""
    return getattr(item, "prompt", None) or getattr(item, "prefix", None) or item.question
