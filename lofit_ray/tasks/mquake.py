"""MQuAKE: answer a multi-hop question under an imagined (counterfactual) fact edit.

Source (github.com/fc2869/lo-fit, utils/dataloaders.py `MQUAKE`, utils/evaluate.py
`evaluate_mquake`, lofit_trainer.py):
- prompt "Q: Imagine that {edited_prompt}. {question} A:" where edited_prompt is
  the first requested rewrite's cloze filled with its subject, a space and
  target_new, and question is the FIRST of the case's three paraphrases only;
- SFT on the new (post-edit) answer: loss only after " A:" (TRL's
  DataCollatorForCompletionOnlyLM), with "</s>" appended for Llama; our trainer
  is expected to append the tokenizer's EOS to the completion itself;
- eval: greedy, max_new_tokens=16, correct if the text after "A:" up to the
  first newline equals (case-insensitively) new_answer or any new_answer_alias.

The original training text was prompt + answer with no space ("A:Karl Döhler"),
and its eval did not strip whitespace, so a generated " Paris" counted as wrong.
Here the completion gets `answer_sep` (default " ") in front, matching how the
base model writes answers after "A:", and `exact_match` strips whitespace;
answer_sep="" reproduces the original training text.
"""
from __future__ import annotations

from .base import GenerationItem, SFTExample, TaskDataError, limit_items
from .task import Task

PROMPT = "Q: Imagine that {edited_prompt}. {question} A:"
MAX_NEW_TOKENS = 16


def read_cases(records: list[dict], where) -> list[dict]:
    """The cases, validated for the fields the prompt needs; errors name the source and the row."""
    cases = []
    for row, case in enumerate(records, 1):
        try:
            rw = case["requested_rewrite"][0]
            fields = (rw["prompt"], rw["subject"], rw["target_new"]["str"], case["questions"][0],
                      case["new_answer"])
        except (KeyError, IndexError, TypeError) as e:
            raise TaskDataError(
                f"{where}: row {row}: not an MQuAKE case (missing {e}); each row needs requested_rewrite[0]"
                f".prompt/.subject/.target_new.str, questions[0] and new_answer."
            ) from e
        if not all(isinstance(x, str) for x in fields):
            raise TaskDataError(f"{where}: row {row}: MQuAKE prompt fields and new_answer must be strings.")
        if not isinstance(case.get("new_answer_alias") or [], list):
            raise TaskDataError(f"{where}: row {row}: MQuAKE new_answer_alias must be a list of strings.")
        cases.append(dict(case, _row=row))
    return cases


def prompt_for(case: dict) -> str:
    rw = case["requested_rewrite"][0]
    # the original used str.format(subject); replace() is the same for "{}" clozes
    edited = rw["prompt"].replace("{}", rw["subject"]) + " " + rw["target_new"]["str"]
    return PROMPT.format(edited_prompt=edited, question=case["questions"][0])


def answers_for(case: dict) -> list[str]:
    return [case["new_answer"]] + [a for a in case.get("new_answer_alias") or [] if isinstance(a, str)]


class MQuAKETask(Task):
    name = "mquake"
    objective = "sft"
    eval_kind = "generation"
    splits = {"train": "mquake/train.jsonl", "val": "mquake/val.jsonl", "test": "mquake/test.jsonl"}
    source_hint = "The splits ship in github.com/fc2869/lo-fit under dataset/MQuAKE/. "

    def __init__(self, data_dir=None, answer_sep: str = " ", source: str | None = None):
        super().__init__(data_dir, source)
        self.answer_sep = answer_sep

    def cases(self, path, default_split: str, data_dir) -> tuple[str, list[dict]]:
        where, records = self.records(path, default_split, data_dir)
        return where, read_cases(records, where)

    def train_examples(self, path=None, limit=None, data_dir=None) -> list[SFTExample]:
        where, cases = self.cases(path, "train", data_dir)
        items = [SFTExample(prompt=prompt_for(c), completion=self.answer_sep + c["new_answer"]) for c in cases]
        return limit_items(items, limit, where)

    def eval_items(self, path=None, limit=None, data_dir=None) -> list[GenerationItem]:
        where, cases = self.cases(path, "val", data_dir)
        items = [GenerationItem(prompt=prompt_for(c), answers=answers_for(c), max_new_tokens=MAX_NEW_TOKENS,
                                meta={"case_id": c.get("case_id"), "row": c["_row"], "stops": ["\n"]},
                                reference=self.answer_sep + c["new_answer"])
                 for c in cases]
        return limit_items(items, limit, where)

    def labelled_statements(self, path=None, limit=None, data_dir=None) -> list[tuple[str, int]]:
        """ITI probing pairs per case: prompt + new answer (1), prompt + a wrong answer (0).
        The wrong answer is the case's real-world pre-edit `answer` (a hard negative the
        edit overrides), else the next case's new answer."""
        where, cases = self.cases(path, "train", data_dir)
        cases = limit_items(cases, limit, where)
        out = []
        for i, c in enumerate(cases):
            accepted = {a.casefold() for a in answers_for(c)}
            candidates = [c.get("answer")] + [cases[(i + k) % len(cases)]["new_answer"] for k in range(1, len(cases))]
            wrong = next((a for a in candidates if isinstance(a, str) and a and a.casefold() not in accepted), None)
            out.append((prompt_for(c) + self.answer_sep + c["new_answer"], 1))
            if wrong is not None:
                out.append((prompt_for(c) + self.answer_sep + wrong, 0))
        return out
