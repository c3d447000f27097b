"""CLUTRR: infer the kinship relation between two people in a short story.

Source (github.com/fc2869/lo-fit, utils/dataloaders.py `CLUTRR`, utils/evaluate.py
`evaluate_clutrr`, lofit_trainer.py):
- prompt = TEMPLATE.format(story, B, A, B, A) + "\\n" for query ('A', 'B'), the story
  being `clean_story` with the [ ] name markers removed;
- SFT text prompt + relation (+ "</s>" for Llama): the loss starts after " 's\\n"
  (DataCollatorForCompletionOnlyLM), i.e. it is on the relation only; our trainer
  is expected to append the tokenizer's EOS to the completion itself;
- eval: greedy, max_new_tokens=16, prediction = generated text up to the first
  '.', stripped, lower-cased, compared with the relation (target_text).
  Items carry meta["stops"] = ["\\n", "."] so `match_item` reproduces that.

The original parsed the query with query[1:-1].replace("'", "").split(','), which
leaves a leading space on the second name ("how is  Rosalee related to Herman?
Answer:  Rosalee is Herman 's"). Names are stripped here; original_spacing=True
reproduces the double spaces byte for byte.
"""
from __future__ import annotations

import ast

from .base import GenerationItem, SFTExample, TaskDataError, limit_items
from .task import Task

TEMPLATE = (
    "Read the following story about a family. \"{story}\" Assume the relations described in the story are "
    "all true. Based on relations between the fictional characters in the story (assume the relations are "
    "all true) and your commonsense knowledge about family relationship, how is {b} related to {a}? "
    "Answer: {b} is {a} 's"
)
MAX_NEW_TOKENS = 16
STOPS = ["\n", "."]
# Relations in the shipped splits; used to pick wrong answers for probing data.
RELATIONS = (
    "aunt", "brother", "daughter", "daughter-in-law", "father", "father-in-law", "granddaughter",
    "grandfather", "grandmother", "grandson", "mother", "mother-in-law", "nephew", "niece", "sister",
    "son", "son-in-law", "uncle",
)


def read_examples(records: list[dict], where) -> list[dict]:
    """The CLUTRR records, validated for story/query/target_text; errors name the source and the record."""
    for i, rec in enumerate(records):
        if not isinstance(rec.get("clean_story") or rec.get("story"), str) \
                or not isinstance(rec.get("query"), str) or not isinstance(rec.get("target_text"), str):
            raise TaskDataError(
                f"{where}: record {i} needs string fields 'clean_story' (or 'story'), 'query' "
                f"(like \"('Alice', 'Bob')\") and 'target_text'."
            )
    return records


def _names(query: str, original_spacing: bool, where: str) -> tuple[str, str]:
    if original_spacing:
        parts = query[1:-1].replace("'", "").split(",")
    else:
        try:
            parts = [str(p).strip() for p in ast.literal_eval(query)]
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parts = []
    if len(parts) != 2:
        raise TaskDataError(f"{where}: query {query!r} is not a pair of names like \"('Alice', 'Bob')\".")
    return parts[0], parts[1]


class ClutrrTask(Task):
    name = "clutrr"
    objective = "sft"
    eval_kind = "generation"
    splits = {"train": "clutrr/train.json", "val": "clutrr/val.json", "test": "clutrr/test.json"}
    source_hint = "The splits ship in github.com/fc2869/lo-fit under dataset/clutrr/. "

    def __init__(self, data_dir=None, original_spacing: bool = False, source: str | None = None):
        super().__init__(data_dir, source)
        self.original_spacing = original_spacing

    def _prompts(self, path, default_split: str, data_dir) -> tuple[str, list[tuple[str, dict]]]:
        where, records = self.records(path, default_split, data_dir)
        out = []
        for i, rec in enumerate(read_examples(records, where)):
            a, b = _names(rec["query"], self.original_spacing, f"{where}: record {i}")
            story = (rec.get("clean_story") or rec.get("story")).replace("[", "").replace("]", "")
            out.append((TEMPLATE.format(story=story, a=a, b=b) + "\n", rec))
        return where, out

    def train_examples(self, path=None, limit=None, data_dir=None) -> list[SFTExample]:
        where, prompts = self._prompts(path, "train", data_dir)
        items = [SFTExample(prompt=p, completion=rec["target_text"]) for p, rec in prompts]
        return limit_items(items, limit, where)

    def eval_items(self, path=None, limit=None, data_dir=None) -> list[GenerationItem]:
        where, prompts = self._prompts(path, "val", data_dir)
        items = [GenerationItem(prompt=p, answers=[rec["target_text"]], max_new_tokens=MAX_NEW_TOKENS,
                                meta={"id": rec.get("id"), "task_name": rec.get("task_name"), "stops": list(STOPS)})
                 for p, rec in prompts]
        return limit_items(items, limit, where)

    def labelled_statements(self, path=None, limit=None, data_dir=None) -> list[tuple[str, int]]:
        """ITI probing pairs: prompt + true relation (1), prompt + a different relation (0),
        the wrong one rotating through RELATIONS so every relation appears as a negative."""
        where, prompts = self._prompts(path, "train", data_dir)
        prompts = limit_items(prompts, limit, where)
        out = []
        for i, (p, rec) in enumerate(prompts):
            gold = rec["target_text"]
            others = [r for r in RELATIONS if r != gold.strip().lower()]
            out += [(p + gold, 1), (p + others[i % len(others)], 0)]
        return out
