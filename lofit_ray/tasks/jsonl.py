"""User data as JSONL, one object per line; the row kind is inferred from line 1.

    {"prompt", "completion"}            -> SFT training example (loss on completion)
    {"prompt", "chosen", "rejected"}    -> DPO preference example
    {"question", "choices", "labels"}   -> MC eval item; optional "prompt" (text
                                           before the question) and "best" (index)
    {"prompt", "answers"} or "answer"   -> generation eval item; optional
                                           "max_new_tokens"

Texts are used verbatim: an MC choice is scored appended to prompt + question,
a completion/chosen/rejected appended to its prompt, so put any separating space
in the answer text (" Paris"), not at the end of the prompt. Every malformed row
raises TaskDataError naming the file, line, missing key and expected keys.
"""
from __future__ import annotations

from pathlib import Path

from .base import GenerationItem, MCQuestion, PreferenceExample, SFTExample, TaskDataError, limit_items
from .source import iter_jsonl
from .task import Task

ROW_KEYS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "mc": ("question", "choices", "labels"),
    "generation": ("prompt", "answers"),
}
TRAIN_KINDS, EVAL_KINDS = ("sft", "dpo"), ("mc", "generation")


def _describe(kinds) -> str:
    names = {"sft": "SFT", "dpo": "DPO", "mc": "MC", "generation": "generation"}
    keys = {k: ", ".join(ROW_KEYS[k]) + (" (or answer)" if k == "generation" else "") for k in kinds}
    return " or ".join(f"{names[k]} rows {{{keys[k]}}}" for k in kinds)


def infer_kind(row: dict) -> str | None:
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "dpo"
    if "completion" in keys:
        return "sft"
    if {"question", "choices"} <= keys:
        return "mc"
    if "prompt" in keys and ("answers" in keys or "answer" in keys):
        return "generation"
    return None


def _check(row: dict, kind: str, where: str) -> None:
    keys = ROW_KEYS[kind]
    if kind == "generation" and "answers" not in row and "answer" in row:
        keys = ("prompt", "answer")
    for key in keys:
        if key not in row:
            raise TaskDataError(f"{where}: missing key {key!r}; {_describe([kind])} expected "
                                f"(kind inferred from the file's first row), got keys {sorted(row)}.")
    for key in ("prompt", "completion", "chosen", "rejected", "question", "answer"):
        if key in keys and not isinstance(row[key], str):
            raise TaskDataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}.")


def _mc(row: dict, where: str) -> MCQuestion:
    choices, labels = row["choices"], row["labels"]
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise TaskDataError(f"{where}: 'choices' must be a non-empty list of strings.")
    if not (isinstance(labels, list) and len(labels) == len(choices) and all(l in (0, 1) for l in labels)
            and 1 in labels):
        raise TaskDataError(f"{where}: 'labels' must be a list of 0/1, one per choice, with at least one 1.")
    prompt = row.get("prompt", "")
    best = row.get("best", labels.index(1))
    if not isinstance(prompt, str) or not isinstance(best, int) or not 0 <= best < len(labels) or not labels[best]:
        raise TaskDataError(f"{where}: 'prompt' must be a string and 'best' the index of a choice labelled 1.")
    return MCQuestion(question=row["question"], choices=list(choices), labels=[int(l) for l in labels],
                      best=best, prefix=prompt + row["question"])


def _generation(row: dict, where: str, lineno: int) -> GenerationItem:
    answers = row["answers"] if "answers" in row else [row["answer"]]
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
        raise TaskDataError(f"{where}: 'answers' must be a non-empty list of non-empty strings.")
    max_new = row.get("max_new_tokens", GenerationItem.max_new_tokens)
    if not isinstance(max_new, int) or max_new < 1:
        raise TaskDataError(f"{where}: 'max_new_tokens' must be a positive integer.")
    return GenerationItem(prompt=row["prompt"], answers=list(answers), max_new_tokens=max_new,
                          meta={"line": lineno})


def read_items(path, allowed: tuple[str, ...]) -> tuple[str, list]:
    """(kind, items) for a JSONL file whose first row must be one of the `allowed` kinds."""
    kind, items = None, []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if kind is None:
            kind = infer_kind(row)
            if kind not in allowed:
                found = f"a {kind} row" if kind else "no known row kind"
                raise TaskDataError(f"{where}: first row has keys {sorted(row)} ({found}); this file must hold "
                                    f"{_describe(allowed)}.")
        _check(row, kind, where)
        if kind == "sft":
            items.append(SFTExample(prompt=row["prompt"], completion=row["completion"]))
        elif kind == "dpo":
            items.append(PreferenceExample(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"]))
        elif kind == "mc":
            items.append(_mc(row, where))
        else:
            items.append(_generation(row, where, lineno))
    return kind, items


def peek_kind(path) -> str | None:
    for _, row in iter_jsonl(path):
        return infer_kind(row)
    return None


class JsonlTask(Task):
    """Train/eval on user JSONL files: objective and eval_kind follow the files' first rows."""

    name = "jsonl"
    splits_under_data_dir = False  # the given paths are used as they are

    def __init__(self, train_path=None, eval_path=None, data_dir=None):
        super().__init__(data_dir)
        self.splits = {k: str(v) for k, v in (("train", train_path), ("val", eval_path)) if v is not None}

    def _kind(self, split: str, allowed) -> str | None:
        if split not in self.splits:
            return None
        kind = peek_kind(self.resolve(split))
        return kind if kind in allowed else None

    @property
    def objective(self) -> str | None:
        """"sft" or "dpo" from the train file's first row; None without a (valid) train file."""
        return self._kind("train", TRAIN_KINDS)

    @property
    def eval_kind(self) -> str | None:
        """"mc" or "generation" from the eval file's first row; None without a (valid) eval file."""
        return self._kind("val", EVAL_KINDS)

    def train_examples(self, path=None, limit=None, data_dir=None) -> list:
        path = self._path(path, "train", data_dir)
        return limit_items(read_items(path, TRAIN_KINDS)[1], limit, path)

    def eval_items(self, path=None, limit=None, data_dir=None) -> list:
        path = self._path(path, "val", data_dir)
        return limit_items(read_items(path, EVAL_KINDS)[1], limit, path)

    def labelled_statements(self, path=None, limit=None, data_dir=None) -> list[tuple[str, int]]:
        """ITI probing pairs from a DPO or MC file: prompt + chosen/correct (1), prompt +
        rejected/incorrect (0), from the first `limit` rows."""
        path = Path(self._path(path, "train", data_dir))
        kind, rows = read_items(path, ("dpo", "mc", "sft", "generation"))
        out = []
        for item in limit_items(rows, limit, path):
            if kind == "dpo":
                out += [(item.prompt + item.chosen, 1), (item.prompt + item.rejected, 0)]
            elif kind == "mc":
                out += [(item.prefix + c, l) for c, l in zip(item.choices, item.labels)]
            else:
                raise TaskDataError(f"{path}: probing statements need DPO or MC rows, not {kind} rows.")
        return out
