"""Task registry: turns each task's files into training examples and eval items.

`make_task(task_config)` builds the task a config's `task:` section describes: a built-in task by
name, your own task (`kind` set: tasks/generic.py), or a task another package registers under the
entry point group `lofit_ray.tasks` (name = "module:Class"; the class takes the keyword arguments
`data_dir` and `source`). `get_task(name, **kw)` builds one by name. Task modules are imported lazily
so this package stays importable without torch or any task's extra dependencies. Built-in tasks read their rows through Hugging Face `datasets`
(tasks/source.py: local files, save_to_disk folders, hub ids).

`exact_match` / `match_item` score greedy generations for the generation tasks
(MQuAKE, CLUTRR, JSONL generation rows); they live here so every task and the
evaluator share one definition.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterable

from .base import (
    DATA_DIR_ENV,
    GenerationItem,
    MCQuestion,
    PreferenceExample,
    SFTExample,
    TaskDataError,
    data_dir,
    limit_items,
    require_file,
)
from .source import read_records

__all__ = [
    "DATA_DIR_ENV", "GenerationItem", "MCQuestion", "PreferenceExample", "SFTExample",
    "TaskDataError", "data_dir", "limit_items", "require_file",
    "Task", "SPLIT_NAMES", "TASK_NAMES", "ENTRY_POINT_GROUP", "entry_point_tasks", "get_task", "make_task",
    "exact_match", "match_item",
]

SPLIT_NAMES = ("train", "val", "test")


class Task:
    """Common surface of every task.

    Subclasses set `name`, `objective` ("dpo" | "sft"), `eval_kind` ("mc" |
    "generation") and `splits` (split name -> file path relative to the data dir),
    and implement `train_examples` / `eval_items` (and `labelled_statements` for
    ITI probing). `path=None` means the default split: "train" for training,
    "val" for evaluation; `path` may also be a split name or a file path.
    """

    name = ""
    objective = ""
    eval_kind = ""
    splits: dict[str, str] = {}
    source_hint = ""  # appended to "split file missing" errors: where the file comes from
    splits_under_data_dir = True  # False: split paths are used as given (user files)

    def __init__(self, data_dir: str | os.PathLike | None = None, source: str | None = None):
        self.data_dir = data_dir
        self.source = source  # a save_to_disk folder or hub id whose splits replace the data dir's files
        self.splits = dict(type(self).splits)

    def resolve(self, split_or_path, data_dir: str | os.PathLike | None = None) -> Path:
        """A split name ("train"/"val"/"test") maps via `splits`; anything else is a file path."""
        if isinstance(split_or_path, str) and split_or_path in self.splits:
            rel = Path(self.splits[split_or_path])
            if not self.splits_under_data_dir:
                return require_file(rel, f"{self.name} '{split_or_path}' file")
            path = rel if rel.is_absolute() else _data_dir(data_dir or self.data_dir) / rel
            if not path.exists():
                raise TaskDataError(
                    f"{self.name} '{split_or_path}' split: file not found: {path}. {self.source_hint}"
                    f"Put {rel} under the data dir (--data-dir / ${DATA_DIR_ENV}; `lofit-ray data fetch` "
                    f"writes it there), pass an existing file path instead of the split name, or set "
                    f"task.source to a save_to_disk folder or a hub dataset id."
                )
            return path
        if isinstance(split_or_path, str) and split_or_path in SPLIT_NAMES:
            raise TaskDataError(
                f"{self.name} has no '{split_or_path}' split (known splits: "
                f"{', '.join(sorted(self.splits)) or 'none'}). Pass a file path instead."
            )
        if Path(str(split_or_path)).expanduser().is_dir():  # a save_to_disk folder of one split
            return Path(str(split_or_path)).expanduser()
        return require_file(split_or_path, f"{self.name} data")

    def _path(self, path, default_split: str, data_dir) -> Path:
        return self.resolve(default_split if path is None else path, data_dir)

    def records(self, path, default_split: str, data_dir=None) -> tuple[str, list[dict]]:
        """(where, rows) of a split name or a path, read through `datasets` (tasks/source.py). With a
        `source`, split names pick the source's splits; paths are read as they are."""
        split = default_split if path is None else path
        if self.source and isinstance(split, str) and split in SPLIT_NAMES:
            return f"{self.source} [{split}]", self.source_records(split)
        where = self.resolve(split, data_dir)
        return str(where), read_records(where)

    def source_records(self, split: str) -> list[dict]:
        """The rows of one split of `source`; a task whose hub dataset needs building overrides this."""
        return read_records(self.source, split)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, objective={self.objective!r}, eval_kind={self.eval_kind!r})"


_data_dir = data_dir  # Task.resolve's argument shadows the function name

# name -> "module:class"; imported on first use.
_REGISTRY = {
    "truthfulqa": "lofit_ray.tasks.truthfulqa:TruthfulQATask",
    "mquake": "lofit_ray.tasks.mquake:MQuAKETask",
    "clutrr": "lofit_ray.tasks.clutrr:ClutrrTask",
    "jsonl": "lofit_ray.tasks.jsonl:JsonlTask",
}
TASK_NAMES = tuple(_REGISTRY)
ENTRY_POINT_GROUP = "lofit_ray.tasks"


def entry_point_tasks() -> dict:
    """Tasks other packages register: {name: entry point} of the group `lofit_ray.tasks`."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_task(name: str, **kw) -> Task:
    """Build a task by name; keyword arguments go to its constructor
    (builtin tasks: data_dir=...; jsonl: train_path=..., eval_path=...)."""
    key = str(name).strip().lower()
    if key in _REGISTRY:
        module, cls = _REGISTRY[key].split(":")
        return getattr(importlib.import_module(module), cls)(**kw)
    registered = entry_point_tasks()
    if name in registered:
        return registered[name].load()(**kw)
    raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES + tuple(registered))}; for "
                        f"your own data set task.kind, task.source and task.columns")


def make_task(config, model: str | None = None) -> Task:
    """The task a TaskConfig describes. `model` (a model spec) is needed only by a task whose prompts go
    through the model's chat template (task.chat_template)."""
    if config.kind is not None:
        from .generic import GenericTask

        tokenizer = None
        if config.chat_template:
            if model is None:
                raise TaskDataError("task.chat_template: the prompt depends on the model; build the task for one")
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(model)
        return GenericTask(config, tokenizer=tokenizer)
    if config.name == "jsonl":
        return get_task("jsonl", train_path=config.train, eval_path=config.report)
    return get_task(config.name, data_dir=config.data_dir, source=config.source)


# --- exact match for generation tasks ---------------------------------------

_QUOTES = "\"'`\u2018\u2019\u201c\u201d"


def _lenient(text: str, stops: Iterable[str] = ()) -> str:
    text = text.strip()
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip().rstrip("." + _QUOTES).lstrip(_QUOTES).strip().casefold()


def exact_match(generated: str, answers: list[str], stops: Iterable[str] = ("\n",)) -> tuple[bool, bool]:
    """(strict, lenient) exact match of a generation against accepted answers.

    strict: equal after stripping surrounding whitespace.
    lenient: the generation is cut at the first stop string (a newline by default),
    then both sides drop trailing periods and surrounding quotes and compare
    case-insensitively. This is what the LoFiT repo's evaluators effectively
    did (MQuAKE: cut at newline, lower-case; CLUTRR: cut at '.', strip, lower-case),
    minus their whitespace bugs. Stops apply to the generation only, so answers
    like "Washington, D.C." are not truncated.
    """
    gen = generated.strip()
    strict = any(gen == a.strip() for a in answers)
    cut = _lenient(generated, stops)
    lenient = bool(cut) and any(cut == _lenient(a) for a in answers)
    return strict, strict or lenient


def match_item(generated: str, item: GenerationItem) -> tuple[bool, bool]:
    """exact_match with the item's own stop strings (item.meta["stops"], e.g. CLUTRR cuts at '.'). An item with
    meta["answer_regex"] (a user task's task.answer_regex) compares the regex's extract of the output, cut at
    the stops, with its answers (extracted the same way when the items were built)."""
    stops = item.meta.get("stops", ("\n",))
    regex = item.meta.get("answer_regex")
    if regex:
        from .generic import extract_answer

        cut = generated.lstrip()
        for stop in stops:
            cut = cut.split(stop, 1)[0]
        return exact_match(extract_answer(cut, regex) or "", item.answers, stops=())
    return exact_match(generated, item.answers, stops=stops)


def match_settled(generated: str, item: GenerationItem) -> bool:
    """True once no further text can change match_item's result, so generation may stop here.

    Lenient match is fixed once a stop string follows the (left-stripped) start; strict match is fixed
    (false) once the stripped text is no longer the start of any accepted answer.
    """
    stops = item.meta.get("stops", ("\n",))
    if item.meta.get("answer_regex"):  # the extract can change until the output is cut at a stop
        return any(stop in generated.lstrip() for stop in stops)
    text = generated.strip()
    lenient_fixed = any(stop in generated.lstrip() for stop in stops)
    strict_fixed = bool(text) and not any(a.strip().startswith(text) for a in item.answers)
    return lenient_fixed and strict_fixed
