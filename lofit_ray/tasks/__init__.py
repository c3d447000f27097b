"""Tasks: turn each task's files into training examples and eval items.

`make_task(task_config)` builds the task a config's `task:` section describes: a built-in task by
name, your own task (`kind` set: tasks/generic.py), or a task another package registers under the
entry point group `lofit_ray.tasks` (name = "module:Class"; the class takes the keyword arguments
`data_dir` and `source`). `get_task(name, **kw)` builds one by name. Which names exist is tasks/registry.py;
the surface every task shares is tasks/task.py (`Task`), the shapes it returns tasks/base.py. Task modules are
imported lazily so this package stays importable without torch or any task's extra dependencies. Built-in
tasks read their rows through Hugging Face `datasets` (tasks/source.py: local files, save_to_disk folders, hub
ids).

`exact_match` / `match_item` score greedy generations for the generation tasks
(MQuAKE, CLUTRR, JSONL generation rows); they live here so every task and the
evaluator share one definition.
"""
from __future__ import annotations

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
from .registry import ENTRY_POINT_GROUP, TASK_NAMES, entry_point_tasks, registered_class
from .task import SPLIT_NAMES, Task

__all__ = [
    "DATA_DIR_ENV", "GenerationItem", "MCQuestion", "PreferenceExample", "SFTExample",
    "TaskDataError", "data_dir", "limit_items", "require_file",
    "Task", "SPLIT_NAMES", "TASK_NAMES", "ENTRY_POINT_GROUP", "entry_point_tasks", "get_task", "make_task",
    "exact_match", "match_item",
]


def get_task(name: str, **kw) -> Task:
    """Build a task by name; keyword arguments go to its constructor
    (builtin tasks: data_dir=...; jsonl: train_path=..., eval_path=...)."""
    key = str(name).strip().lower()
    if key in TASK_NAMES:
        return registered_class(key)(**kw)
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
