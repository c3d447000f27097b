"""Which tasks exist: the built-in ones by name, and those other packages register under the entry point group
`lofit_ray.tasks`. Config validation (lofit_ray.config) checks task names against this module and the task
package builds tasks from it; it imports no task module, so neither side reaches into the other."""
from __future__ import annotations

import importlib

# name -> "module:class"; imported on first use.
_REGISTRY = {
    "truthfulqa": "lofit_ray.tasks.truthfulqa:TruthfulQATask",
    "mquake": "lofit_ray.tasks.mquake:MQuAKETask",
    "clutrr": "lofit_ray.tasks.clutrr:ClutrrTask",
    "jsonl": "lofit_ray.tasks.jsonl:JsonlTask",
}
TASK_NAMES = tuple(_REGISTRY)
ENTRY_POINT_GROUP = "lofit_ray.tasks"


def registered_class(name: str) -> type:
    """The class of a built-in task (its module is imported here, on first use)."""
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def entry_point_tasks() -> dict:
    """Tasks other packages register: {name: entry point} of the group `lofit_ray.tasks`."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def is_registered(name: str) -> bool:
    """A task another package registers under the `lofit_ray.tasks` entry point group."""
    return name in entry_point_tasks()
