"""The shapes every task turns its files into, and where task data lives.

Training examples are either SFT pairs (loss on the completion tokens only) or
DPO preference triples. Evaluation items are either multiple-choice questions
(scored by summed answer log-probs) or generation items (scored by exact match
of a greedy generation against a list of accepted answers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR_ENV = "LOFIT_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class TaskDataError(ValueError):
    """Task data is missing, malformed or empty; the message names the file and the fix."""


@dataclass
class SFTExample:
    prompt: str
    completion: str  # the loss is taken on these tokens only


@dataclass
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class MCQuestion:
    """A multiple-choice item: `prefix` is the text every choice is appended to."""

    question: str
    choices: list[str]
    labels: list[int]  # 1 = correct, 0 = incorrect, same length as choices
    best: int = -1  # index of the single best answer (MC1); -1 = first correct one
    prefix: str = ""  # the full scoring context (task-specific prompt ending before the answer)

    def best_index(self) -> int:
        return self.best if self.best >= 0 else self.labels.index(1)


@dataclass
class GenerationItem:
    prompt: str
    answers: list[str]  # any of these counts as an exact match
    max_new_tokens: int = 16
    meta: dict = field(default_factory=dict)
    reference: str = ""  # the completion training uses (scored as answer_logprob); "" = answers[0]


def data_dir(configured: str | os.PathLike | None = None) -> Path:
    """Where task data lives: the explicit value, else $LOFIT_DATA_DIR, else ../shared/data beside the repo
    when it exists, else $LOFIT_HOME/data (where `lofit-ray data fetch` puts it on a fresh machine).

    "The repo" is this checkout or, when this file runs from a copy (`ray job submit --working-dir .`
    imports a temporary copy), the checkout lofit-ray was installed from in editable mode.
    """
    from ..paths import lofit_home

    value = configured or os.environ.get(DATA_DIR_ENV)
    if value:
        return Path(value).expanduser()
    beside = _REPO_ROOT.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    installed = _editable_checkout()
    if installed is not None and (installed.parent / "shared" / "data").is_dir():
        return installed.parent / "shared" / "data"
    return lofit_home() / "data"


def _editable_checkout() -> Path | None:
    import json
    from importlib import metadata

    try:
        text = metadata.distribution("lofit-ray").read_text("direct_url.json") or "{}"
    except metadata.PackageNotFoundError:
        return None
    url = json.loads(text).get("url", "")
    return Path(url[len("file://"):]) if url.startswith("file://") else None


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(
            f"{what}: file not found: {path}. Pass an existing file path, or set --data-dir / "
            f"${DATA_DIR_ENV} to the folder holding the task data."
        )
    return path


def limit_items(items: list, limit: int | None, path) -> list:
    if not items:
        raise TaskDataError(f"{path}: no examples were read; the split is empty. Check the file's format.")
    return items[:limit] if limit else items
