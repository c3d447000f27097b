"""Honest splits: train on part of train, select hyperparameters on a carve of it, report on val.

Every task reads one row into exactly one training example and one evaluation item,
so a seeded carve of the train file's distinct questions gives a selection split whose
questions never appear in training (rows repeating a question stay together; rows
whose question is in the report split are dropped). A user can instead name a
selection file; the same rule then drops its overlap with the other splits.
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
    """Read a task's files into train / select / report lists (any split may be a file path).

    The three are disjoint by what each item asks: a training row or selection item whose prompt is also in a
    later split (select, report) is dropped, and the counts go into `carve` (the record and the search's report
    show them). A split left empty is an error naming the field to change."""
    all_report = task.eval_items(report)
    report_items = all_report[:limit_report]
    reported = {asked(x) for x in all_report}  # all of it: the training rows must not depend on limit_report
    examples = task.train_examples(train)
    items = _eval_items_of_train(task, train) if select is not None else task.eval_items(train)
    keys = [asked(x) for x in items] if len(items) == len(examples) else [ex.prompt for ex in examples]
    if select is not None:
        all_select = task.eval_items(select)
        select_items = [x for x in all_select if asked(x) not in reported]
        selected = {asked(x) for x in select_items}
        train_ex = [ex for ex, k in zip(examples, keys) if k not in reported and k not in selected]
        carve_info = {"select": select, "dropped_select_in_report": len(all_select) - len(select_items),
                      "dropped_train_in_select": sum(k in selected and k not in reported for k in keys)}
    else:
        if len(examples) != len(items):
            raise ValueError(f"{task.name}: the train split gives {len(examples)} training examples but {len(items)} "
                             f"evaluation items, so it cannot be carved; set task.select to a separate file")
        # Carve questions, not rows: copies of one question (CLUTRR's train file repeats some) fall on the same
        # side, and rows whose question is also in the report split are dropped. Without copies this is the
        # plain row carve.
        questions = list(dict.fromkeys(k for k in keys if k not in reported))
        if len(questions) < 2:
            raise _empty("task.train", f"{len(questions)} distinct prompt(s) of {train} are not in the report split; "
                         f"the selection carve needs at least 2", "use more training rows or another report split")
        selected = {questions[i] for i in carve(len(questions), select_fraction, carve_seed)[1]}
        train_ex = [ex for ex, k in zip(examples, keys) if k not in reported and k not in selected]
        select_items = [x for x, k in zip(items, keys) if k in selected]
        carve_info = {"from": train, "fraction": select_fraction, "seed": carve_seed}
    train_ex, select_items = train_ex[:limit_train], select_items[:limit_select]
    if not train_ex:
        raise _empty("task.train", f"no training rows of {train} are left once the prompts also in the selection or "
                     f"report split are dropped", "give more or other training rows, or another report split")
    if not select_items:
        raise _empty("task.select", "the selection split is empty once the prompts also in the report split are "
                     "dropped", "name another selection split, or leave task.select out to carve it from train")
    carve_info.update(n_train=len(train_ex), n_select=len(select_items), n_report=len(report_items),
                      dropped_in_report=sum(k in reported for k in keys))
    return TaskSplits(train_ex, select_items, report_items, carve_info)


def _eval_items_of_train(task, train) -> list:
    """The train split read as evaluation items (what each row asks), or [] where its rows have no such reading
    (a JSONL file of SFT or DPO rows): the training prompts then stand for what is asked."""
    from .tasks import TaskDataError

    try:
        return task.eval_items(train)
    except TaskDataError:
        return []


def _empty(field: str, what: str, fix: str):
    from .tasks import TaskDataError

    return TaskDataError(f"{field}: {what}; {fix}.")


def split_spec(task_config, model: str | None = None) -> dict:
    """A task config as plain data a Ray worker rebuilds the same splits from (data dir and file paths made
    absolute, so a worker in another directory reads the same files). `model` matters only to a task whose
    prompts use the model's chat template."""
    from dataclasses import asdict

    from .tasks.base import data_dir

    t = asdict(with_absolute_paths(task_config))
    if task_config.kind is None and task_config.name != "jsonl":
        t["data_dir"] = str(data_dir(task_config.data_dir).resolve())
    return {"task": t, "model": model if task_config.chat_template else None}


def with_absolute_paths(task_config):
    """The task config with its paths that exist here (source, train, report, select, data_dir) made absolute:
    relative paths mean the directory the command runs in, and Ray workers run in another one."""
    import dataclasses
    from pathlib import Path

    absolute = {}
    for key in ("source", "train", "report", "select", "data_dir"):
        value = getattr(task_config, key)
        if value and Path(value).expanduser().exists():
            absolute[key] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(task_config, **absolute) if absolute else task_config


def splits_from_spec(spec: dict):
    """(task, TaskSplits) of a split_spec."""
    from .config import TaskConfig
    from .config.loading import build
    from .tasks import make_task

    cfg = build(TaskConfig, spec["task"], "task")
    task = make_task(cfg, model=spec.get("model"))
    return task, build_splits(task, train=cfg.train, report=cfg.report, select=cfg.select,
                              select_fraction=cfg.select_fraction, carve_seed=cfg.carve_seed,
                              limit_train=cfg.limit_train, limit_select=cfg.limit_select,
                              limit_report=cfg.limit_report)


def asked(item) -> str:
    """What an eval item asks the model (its prompt, or its MC scoring context): equal text = same question."""
    return getattr(item, "prompt", None) or getattr(item, "prefix", None) or item.question
