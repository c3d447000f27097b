"""The surface every task shares (`Task`): split names resolve to files under the data dir or to a `source`'s
splits, and rows come back through tasks/source.py. Each task module subclasses it; the task package builds
them by name (lofit_ray.tasks.get_task / make_task)."""
from __future__ import annotations

import os
from pathlib import Path

from .base import DATA_DIR_ENV, TaskDataError, data_dir, require_file
from .source import read_records

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
