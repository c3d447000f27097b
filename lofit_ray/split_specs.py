"""A task config as plain data that a Ray worker rebuilds the same task and splits from.

The driver writes the spec (split_spec), a worker or the per-process cache (lofit_ray.process_cache) reads it
back (splits_from_spec). It sits above the tasks, the config and lofit_ray.splits, which carves the rows: the
tasks use the carve, so the carve cannot be the module that builds tasks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import TaskConfig
from .config.loading import build
from .splits import build_splits
from .tasks import make_task
from .tasks.base import data_dir


def split_spec(task_config, model: str | None = None) -> dict:
    """A task config as plain data a Ray worker rebuilds the same splits from (data dir and file paths made
    absolute, so a worker in another directory reads the same files). `model` matters only to a task whose
    prompts use the model's chat template."""
    t = dataclasses.asdict(with_absolute_paths(task_config))
    if task_config.kind is None and task_config.name != "jsonl":
        t["data_dir"] = str(data_dir(task_config.data_dir).resolve())
    return {"task": t, "model": model if task_config.chat_template else None}


def with_absolute_paths(task_config):
    """The task config with its paths that exist here (source, train, report, select, data_dir) made absolute:
    relative paths mean the directory the command runs in, and Ray workers run in another one."""
    absolute = {}
    for key in ("source", "train", "report", "select", "data_dir"):
        value = getattr(task_config, key)
        if value and Path(value).expanduser().exists():
            absolute[key] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(task_config, **absolute) if absolute else task_config


def splits_from_spec(spec: dict):
    """(task, TaskSplits) of a split_spec: the task its config describes, and that task's splits."""
    cfg = build(TaskConfig, spec["task"], "task")
    task = make_task(cfg, model=spec.get("model"))
    return task, build_splits(task, train=cfg.train, report=cfg.report, select=cfg.select,
                              select_fraction=cfg.select_fraction, carve_seed=cfg.carve_seed,
                              limit_train=cfg.limit_train, limit_select=cfg.limit_select,
                              limit_report=cfg.limit_report, on_overlap=cfg.on_overlap)
