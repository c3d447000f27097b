"""Your own task, configured in YAML: any data `datasets` reads, a column mapping and a prompt template.

    task:
      name: sports-understanding        # names the experiment, the registered model and its champion
      kind: mc                          # sft | dpo | mc | generation
      source: bbh/sports_understanding.json
      records_key: examples             # the records sit under this key of one JSON object
      template: "Q: Is this sentence plausible? {input}\\nA:"
      fixed_choices: ["yes", "no"]
      columns: {label: target}          # the right choice, by its text (or its 0-based index)

Each kind gives training examples and evaluation items of the paper's shapes (tasks/base.py):

    kind        trains on                                  scored by
    sft         the completion (SFT)                       exact match of a generation with the completion
    generation  the (first) answer (SFT)                   exact match with any accepted answer
    mc          DPO: right vs first wrong choice (or SFT)  MC1 / MC2 over the choices
    dpo         DPO: chosen vs rejected                    MC over [chosen, rejected]

With no report split (`task.report: null`) the train split is carved, seeded, into report and the rest; the
selection carve then comes out of the rest (lofit_ray.splits). Carves go by prompt, so rows repeating a prompt
stay on one side. Every problem in the data names the field to fix and the row.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..config.fields import template_fields
from .base import GenerationItem, MCQuestion, PreferenceExample, SFTExample, TaskDataError, limit_items
from .task import Task
from .source import read_records

CARVED_REPORT = "carved-report"
_MISSING = object()  # the split name of the report carve (task.report: null)


def lookup(row: dict, column: str):
    """row[column], or, for "a.b", row["a"]["b"] (nested records as `datasets` reads them); _MISSING if absent."""
    if column in row:
        return row[column]
    value = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def extract_answer(text: str, regex: str) -> str | None:
    """The regex's first group (else its whole match) in `text`, stripped; None when it does not match."""
    match = re.search(regex, text)
    if match is None:
        return None
    return (match.group(1) if match.groups() else match.group(0)).strip()


class GenericTask(Task):
    """A task built from a TaskConfig with `kind` set; see the module docstring."""

    splits_under_data_dir = False

    def __init__(self, config, tokenizer=None):
        super().__init__(data_dir=None, source=config.source)
        self.config = config
        self.name = config.name
        self.tokenizer = tokenizer  # needed only with chat_template
        self.splits = {}
        if config.chat_template:
            if tokenizer is None:
                raise TaskDataError("task.chat_template: the prompt needs a model's tokenizer; build this task "
                                    "with make_task(config, model=...)")
            if not getattr(tokenizer, "chat_template", None):
                raise TaskDataError(f"task.chat_template: the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} "
                                    f"has no chat template; set task.chat_template: false and write the prompt with "
                                    f"task.template")
        self._rows: dict[str, list[dict]] = {}

    @property
    def objective(self) -> str:
        kind = self.config.kind
        return "dpo" if kind == "dpo" or (kind == "mc" and self.config.mc_training == "dpo") else "sft"

    @property
    def eval_kind(self) -> str:
        return "mc" if self.config.kind in ("mc", "dpo") else "generation"

    # -- rows -----------------------------------------------------------------------------------
    def read(self, split: str) -> tuple[str, list[dict]]:
        """(where, rows) of a split of the source, or of a file or folder given as the split."""
        cfg = self.config
        if split in self._rows:
            return self._where(split), self._rows[split]
        if split == CARVED_REPORT or (split == cfg.train and cfg.report is None):
            self._carve_report()
            return self._where(split), self._rows[split]
        path = Path(str(split)).expanduser()
        if path.exists():
            rows = read_records(path, None, records_key=cfg.records_key)
        elif Path(cfg.source).expanduser().is_file() and split != cfg.train:
            field = "report" if split == cfg.report else "select"
            raise TaskDataError(f"task.{field}: {cfg.source} is one file, so it has no split {split!r}; leave "
                                f"task.{field} out to carve it from the file, or name another file")
        else:
            rows = read_records(cfg.source, split, records_key=cfg.records_key)
        self._rows[split] = rows
        return self._where(split), rows

    def _where(self, split: str) -> str:
        if split == CARVED_REPORT:
            return f"{self.config.source} [report carve of {self.config.train}]"
        path = Path(str(split)).expanduser()
        return str(path) if path.exists() else f"{self.config.source} [{split}]"

    def _carve_report(self) -> None:
        """task.report: null: a seeded share of the train split's distinct prompts becomes the report split."""
        from ..splits import carve

        cfg = self.config
        path = Path(str(cfg.train)).expanduser()
        rows = (read_records(path, None, records_key=cfg.records_key) if path.exists()
                else read_records(cfg.source, cfg.train, records_key=cfg.records_key))
        if not rows:
            raise TaskDataError(f"{self._where(cfg.train)}: no rows; check task.source and task.train")
        where = self._where(cfg.train)
        keys = [self.prompt_text(row, f"{where} row {i}") for i, row in enumerate(rows)]
        distinct = list(dict.fromkeys(keys))
        try:
            reported = {distinct[i] for i in carve(len(distinct), cfg.report_fraction, cfg.carve_seed)[1]}
        except ValueError as exc:
            raise TaskDataError(f"task.report_fraction: {exc}") from None
        self._rows[CARVED_REPORT] = [r for r, k in zip(rows, keys) if k in reported]
        self._rows[cfg.train] = [r for r, k in zip(rows, keys) if k not in reported]

    # -- one row -> text ---------------------------------------------------------------------------
    def _column(self, row: dict, field: str, where: str, column: str | None = None):
        """The value of the column that task.columns.<field> names (or `column`); "a.b" reads key b of column a."""
        column = column or getattr(self.config.columns, field)
        value = lookup(row, column)
        if value is _MISSING:
            raise TaskDataError(f"task.columns.{field}: {where} has no column {column!r}; its columns are "
                                f"{sorted(row)}. Name one of them (a.b reads key b of column a).")
        return value

    def prompt_text(self, row: dict, where: str) -> str:
        """The prompt before any chat template: the template over the row's columns, or the prompt column."""
        cfg = self.config
        if cfg.template is None:
            return str(self._column(row, "prompt", where))
        missing = [f for f in template_fields(cfg.template) if re.split(r"[.\[]", f, maxsplit=1)[0] not in row]
        if missing:
            raise TaskDataError(f"task.template: field {{{missing[0]}}} is not a column of {where}; its columns are "
                                f"{sorted(row)}. Fix the template or task.records_key.")
        try:
            return cfg.template.format_map(row)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise TaskDataError(f"task.template: cannot fill it from {where} ({type(exc).__name__}: {exc}); index a "
                                f"list or mapping column as {{column[0]}} or {{column[key]}}") from None

    def prompt(self, row: dict, where: str) -> str:
        text = self.prompt_text(row, where)
        if not self.config.chat_template:
            return text
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
        bos = self.tokenizer.bos_token  # the tokenizer adds it again when the prompt is encoded
        return chat[len(bos):] if bos and chat.startswith(bos) else chat

    def _text(self, value, field: str, where: str) -> str:
        if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
            value = value[-1]["content"]  # a conversation (chat messages): its last turn is the answer
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
            raise TaskDataError(f"task.columns.{field}: {where} holds {value!r}; expected non-empty text")
        return str(value)

    def _answers(self, row: dict, where: str) -> list[str]:
        field = "completion" if self.config.kind == "sft" else "answer"
        value = self._column(row, field, where)
        values = value if isinstance(value, list) else [value]
        if not values:
            raise TaskDataError(f"task.columns.{field}: {where} holds an empty list; give at least one answer")
        return [self._text(v, field, where) for v in values]

    def _choices(self, row: dict, where: str) -> list[str]:
        cfg = self.config
        if cfg.fixed_choices is not None:
            return list(cfg.fixed_choices)
        columns = cfg.columns.choices
        if len(columns) == 1:  # one column holding the list
            value = self._column(row, "choices", where, columns[0])
            if not isinstance(value, list) or len(value) < 2:
                raise TaskDataError(f"task.columns.choices: {where} column {columns[0]!r} holds {value!r}; one "
                                    f"column must hold a list of at least two choices (or list one column per choice)")
            return [self._text(v, "choices", where) for v in value]
        return [self._text(self._column(row, "choices", where, c), "choices", where) for c in columns]

    def _label(self, row: dict, choices: list[str], where: str) -> int:
        value = self._column(row, "label", where)
        if isinstance(value, bool):
            value = int(value)
        names = self._label_names(row, where)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value.strip() not in choices \
                and (names is None or value.strip() not in names):
            value = int(value.strip())
        if isinstance(value, int):
            if not 0 <= value < len(choices):
                raise TaskDataError(f"task.columns.label: {where} gives index {value}, out of range for its "
                                    f"{len(choices)} choices (0-based: 0..{len(choices) - 1}); fix the data or the "
                                    f"choices")
            return value
        wanted = str(value).strip()
        names = self._label_names(row, where)
        if names is not None:
            if wanted not in names or len(names) != len(choices):
                raise TaskDataError(f"task.columns.label: {where} gives {value!r}; the choices are named {names} "
                                    f"({len(choices)} choices)")
            return names.index(wanted)
        for i, choice in enumerate(choices):
            if choice.strip() == wanted:
                return i
        folded = [i for i, c in enumerate(choices) if c.strip().casefold() == wanted.casefold()]
        if len(folded) == 1:
            return folded[0]
        raise TaskDataError(f"task.columns.label: {where} gives {value!r}, which is none of its choices "
                            f"{choices}; give the right choice's text or its 0-based index")

    def _label_names(self, row: dict, where: str) -> list[str] | None:
        """What the label column calls each choice, when it names them (A/B/C/D, 1/2): task.label_names, or the
        column task.columns.choice_labels names."""
        if self.config.label_names is not None:
            return [str(n).strip() for n in self.config.label_names]
        if self.config.columns.choice_labels is None:
            return None
        names = self._column(row, "choice_labels", where)
        if not isinstance(names, list):
            raise TaskDataError(f"task.columns.choice_labels: {where} holds {names!r}; it must hold a list of names")
        return [str(n).strip() for n in names]

    # -- rows -> examples and items ------------------------------------------------------------------
    def example_and_item(self, row: dict, where: str):
        """(training example, evaluation item) of one row."""
        cfg = self.config
        prompt, sep = self.prompt(row, where), cfg.answer_prefix
        if cfg.kind in ("sft", "generation"):
            answers = self._answers(row, where)
            accepted = answers
            if cfg.answer_regex is not None:
                accepted = [extract_answer(a, cfg.answer_regex) for a in answers]
                if any(a is None for a in accepted):
                    raise TaskDataError(f"task.answer_regex: {cfg.answer_regex!r} finds nothing in the reference "
                                        f"answer of {where} ({answers[0]!r}); it must match the references too")
            item = GenerationItem(prompt=prompt, answers=accepted, max_new_tokens=cfg.max_new_tokens,
                                  reference=sep + answers[0],
                                  meta={"where": where, "stops": list(cfg.stops), "answer_regex": cfg.answer_regex})
            return SFTExample(prompt, sep + answers[0]), item
        if cfg.kind == "dpo":
            chosen = self._text(self._column(row, "chosen", where), "chosen", where)
            rejected = self._text(self._column(row, "rejected", where), "rejected", where)
            item = MCQuestion(question=prompt, choices=[sep + chosen, sep + rejected], labels=[1, 0], best=0,
                              prefix=prompt)
            return PreferenceExample(prompt, sep + chosen, sep + rejected), item
        choices = self._choices(row, where)
        label = self._label(row, choices, where)
        texts = [sep + c for c in choices]
        item = MCQuestion(question=prompt, choices=texts, labels=[int(i == label) for i in range(len(choices))],
                          best=label, prefix=prompt)
        if cfg.mc_training == "sft":
            return SFTExample(prompt, texts[label]), item
        wrong = next(i for i in range(len(texts)) if i != label)
        return PreferenceExample(prompt, texts[label], texts[wrong]), item

    def _pairs(self, split) -> tuple[str, list]:
        where, rows = self.read(split)
        return where, [self.example_and_item(row, f"{where} row {i}") for i, row in enumerate(rows)]

    def train_examples(self, path=None, limit=None, data_dir=None) -> list:
        where, pairs = self._pairs(self.config.train if path is None else path)
        return limit_items([ex for ex, _ in pairs], limit, where)

    def eval_items(self, path=None, limit=None, data_dir=None) -> list:
        split = path if path is not None else (self.config.report or CARVED_REPORT)
        where, pairs = self._pairs(split)
        return limit_items([item for _, item in pairs], limit, where)

    def labelled_statements(self, path=None, limit=None, data_dir=None) -> list[tuple[str, int]]:
        """ITI's probing pairs: prompt + each choice, labelled right (1) or wrong (0); mc and dpo tasks only."""
        if self.eval_kind != "mc":
            raise TaskDataError(f"{self.name}: ITI probes right and wrong answers, which a {self.config.kind} task "
                                f"does not have; run ITI on an mc or dpo task")
        items = self.eval_items(self.config.train if path is None else path, limit)
        return [(item.prefix + c, l) for item in items for c, l in zip(item.choices, item.labels)]
