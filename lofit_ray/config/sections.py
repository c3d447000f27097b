"""The sections every job shares: training loops (phase 1, phase 2, the baselines), the task and its splits, MLflow."""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path

from ..tasks.registry import TASK_NAMES, is_registered
from ..tasks.source import is_hub_id
from .fields import ConfigError, _at_least, _help, _positive, template_fields


@dataclass
class TrainingConfig:
    """What every training loop shares (LoFiT phase 1, phase 2, LoRA): batching, the DPO beta, the seed."""

    SECTION: typing.ClassVar[str] = "training"

    batch_size: int = _help("global batch size (split evenly over Ray Train workers)", 8)
    max_length: int = _help("tokens per example; longer ones are cut from the left of the prompt", 128)
    dpo_beta: float = _help("DPO temperature beta (TruthfulQA and other preference tasks)", 0.5)
    seed: int = _help("seed of the parameter init and the epoch order", 42)

    def __post_init__(self):
        _at_least(self.batch_size, 1, "training.batch_size")
        _at_least(self.max_length, 1, "training.max_length")
        _positive(self.dpo_beta, "training.dpo_beta")


SELECTORS = ("l1", "gates", "grad", "grad_x_act", "random")  # lofit_ray.selectors
LR_SCHEDULES = ("constant", "linear")  # lofit_ray.train.TorchStepper
_SCHEDULE_HELP = ("constant, or linear: the lr decays to 0 over all steps, as in the paper's code (transformers' "
                  "Trainer default). A searched epoch count is retrained with the decay over that count")
_CLIP_HELP = "gradient-norm clipping; 0 turns it off (the paper's code clips at 1.0)"


def _check_optimizer(phase) -> None:
    if phase.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"{phase.SECTION}.lr_schedule: {phase.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    _at_least(phase.max_grad_norm, 0, f"{phase.SECTION}.max_grad_norm", "0 turns clipping off")


def optimizer_settings(phase) -> dict:
    """A phase's lr_schedule and max_grad_norm where they differ from the defaults (constant, no clipping): added
    after the first records, so settings and memo keys made at the defaults stay as they were."""
    return {name: getattr(phase, name) for name, default in (("lr_schedule", "constant"), ("max_grad_norm", 0.0))
            if getattr(phase, name) != default}


@dataclass
class Phase1Config:
    """Phase 1 (head selection): rank every head; phase 2 trains the top K. The paper's selector is l1."""

    SECTION: typing.ClassVar[str] = "phase1"

    epochs: int = _help("epochs of phase 1 (l1, gates)", 5)
    lr: float = _help("AdamW learning rate of what phase 1 trains (l1: the scales A; gates: A, v and the gates)",
                      5e-3)
    l1: float = _help("l1: weight of the L1 penalty sum |A|; larger = sparser, sharper ranking", 5e-4)
    selector: str = _help("how heads are ranked: l1 (the paper: scales A with an L1 penalty), gates (JoLA: "
                          "HardConcrete gates with an expected-L0 penalty), grad (||dL/dv|| at v=0: one pass, no "
                          "training), grad_x_act (sum |dL/dz . z|: one pass), random (the seeded control)", "l1")
    l0: float = _help("gates: weight of the expected-L0 penalty (the expected number of open gates)", 1e-3)
    gate_parts: str = _help("gates: separate (JoLA: one gate for the scale, one for the offset) or joint (one "
                            "gate per head)", "separate")
    lr_schedule: str = _help(_SCHEDULE_HELP, "constant")
    max_grad_norm: float = _help(_CLIP_HELP, 0.0)

    def __post_init__(self):
        _at_least(self.epochs, 1, "phase1.epochs")
        _positive(self.lr, "phase1.lr")
        _at_least(self.l1, 0, "phase1.l1", "0 turns the penalty off")
        if self.selector not in SELECTORS:
            raise ConfigError(f"phase1.selector: '{self.selector}' is not one of {', '.join(SELECTORS)}")
        _at_least(self.l0, 0, "phase1.l0", "0 turns the penalty off")
        if self.gate_parts not in ("separate", "joint"):
            raise ConfigError(f"phase1.gate_parts: '{self.gate_parts}' is not separate or joint")
        _check_optimizer(self)

    def settings(self) -> dict:
        """The fields the selector reads: the phase-1 memo key, so a ranking that ignores l1 or the lr
        (grad, random) is computed once, whatever the search proposes for them."""
        used = {"l1": ("epochs", "lr", "l1"), "gates": ("epochs", "lr", "l0", "gate_parts")}.get(self.selector, ())
        return {"selector": self.selector, **{name: getattr(self, name) for name in used},
                **(optimizer_settings(self) if used else {})}


@dataclass
class Phase2Config:
    """Phase 2: learn an offset v on the top-K heads only, everything else frozen."""

    SECTION: typing.ClassVar[str] = "phase2"

    epochs: int = _help("epochs of phase 2", 5)
    lr: float = _help("AdamW learning rate of the offsets v", 1e-2)
    skip_frozen_layers: bool = _help("run the layers below the lowest trained head once per example, not every "
                                     "epoch (same result, faster)", True)
    lr_schedule: str = _help(_SCHEDULE_HELP, "constant")
    max_grad_norm: float = _help(_CLIP_HELP, 0.0)

    def __post_init__(self):
        _at_least(self.epochs, 1, "phase2.epochs")
        _positive(self.lr, "phase2.lr")
        _check_optimizer(self)


@dataclass
class LoraConfig:
    """The LoRA baseline (peft) on the attention projections, trained by the same loop as LoFiT."""

    SECTION: typing.ClassVar[str] = "lora"

    epochs: int = _help("epochs of LoRA training", 5)
    lr: float = _help("AdamW learning rate", 5e-4)
    rank: int = _help("LoRA rank r", 8)
    alpha: float = _help("LoRA alpha (scale alpha / r)", 16.0)
    targets: list[str] = _help("linear modules to adapt", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = _help("LoRA dropout", 0.0)
    max_grad_norm: float = _help("gradient-norm clipping; 0 turns it off", 1.0)

    def __post_init__(self):
        _at_least(self.epochs, 1, "lora.epochs")
        _positive(self.lr, "lora.lr")
        _at_least(self.rank, 1, "lora.rank")
        _positive(self.alpha, "lora.alpha")
        if not self.targets:
            raise ConfigError("lora.targets: name at least one module, e.g. [q_proj, v_proj]")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: {self.dropout} must be in [0, 1)")
        _at_least(self.max_grad_norm, 0, "lora.max_grad_norm", "0 turns clipping off")


@dataclass
class ReftConfig:
    """The ReFT baseline (LoReFT, lofit_ray.baselines.reft) on one layer's residual stream, trained by the same
    loop as LoFiT."""

    SECTION: typing.ClassVar[str] = "reft"

    epochs: int = _help("epochs of ReFT training", 5)
    lr: float = _help("AdamW learning rate", 1e-3)
    rank: int = _help("LoReFT rank r: 2 r hidden + r trainable parameters (rank 1 is nearest LoFiT's count)", 1)
    depth: float = _help("which layer's output is edited, as a share of the depth (0 = the first, 1 = the last)",
                         0.5)

    def __post_init__(self):
        _at_least(self.epochs, 1, "reft.epochs")
        _positive(self.lr, "reft.lr")
        _at_least(self.rank, 1, "reft.rank")
        if not 0 <= self.depth <= 1:
            raise ConfigError(f"reft.depth: {self.depth} must be between 0 (the first layer) and 1 (the last)")


@dataclass
class ItiConfig:
    """The ITI baseline: probe every head, shift the top K along the truthful direction."""

    SECTION: typing.ClassVar[str] = "iti"

    alphas: list[float] = _help("intervention strengths; the best on the selection split wins",
                                factory=lambda: [1.0, 2.5, 5.0, 10.0, 15.0, 20.0])
    val_fraction: float = _help("share of probing statements held out to rank the probes", 0.2)

    def __post_init__(self):
        if not self.alphas:
            raise ConfigError("iti.alphas: list at least one value, e.g. [1.0, 5.0, 15.0]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"iti.val_fraction: {self.val_fraction} must be between 0 and 1")


# -- data and records -------------------------------------------------------------------------

TASK_KINDS = ("sft", "dpo", "mc", "generation")  # lofit_ray.tasks.generic: a user's task, configured in YAML
ON_OVERLAP = ("error", "drop")  # lofit_ray.splits: named splits sharing prompts stop the run, or lose them
_NEEDS = {"sft": ("completion",), "generation": ("answer",), "dpo": ("chosen", "rejected"), "mc": ("label",)}
_WHAT = {"completion": "the text to train on", "answer": "the right answer", "chosen": "the preferred answer",
         "rejected": "the dispreferred answer", "label": "the right choice (its index or text)"}


@dataclass
class TaskColumns:
    """Which column of your data holds what (kind: sft | dpo | mc | generation). Column names as `datasets`
    reads them; `a.b` reads key b of a mapping column a (e.g. choices.text); records nested under a key of one
    JSON object: set task.records_key."""

    SECTION: typing.ClassVar[str] = "task.columns"

    prompt: str | None = _help("column holding the whole prompt (or give task.template instead)", None)
    completion: str | None = _help("sft: the text trained on (and, in evaluation, the reference to match)", None)
    answer: str | None = _help("generation: the right answer (a string, or a list of accepted strings); the first "
                               "is trained on", None)
    chosen: str | None = _help("dpo: the preferred answer", None)
    rejected: str | None = _help("dpo: the dispreferred answer", None)
    choices: list[str] | None = _help("mc: one column holding a list of choices ([options]), or several columns "
                                      "holding one choice each ([opa, opb, opc, opd]); or give task.fixed_choices", None)
    label: str | None = _help("mc: the right choice: its 0-based index, its text, or its name (see choice_labels)",
                              None)
    choice_labels: str | None = _help("mc: a column holding each choice's name as the label gives it (ARC's "
                                      "choices.label: [A, B, C, D] with answerKey: B)", None)


@dataclass
class TaskConfig:
    """Which task and which splits: train minus a selection carve, and a report split scored once.

    The paper's tasks are named (truthfulqa, mquake, clutrr) and need nothing else. Your own task sets `kind`,
    a `source` and the `columns` (and usually a `template`); see docs/data.md."""

    SECTION: typing.ClassVar[str] = "task"

    name: str = _help("truthfulqa | mquake | clutrr | jsonl, or your own task's name when `kind` is set (registered "
                      "models, experiments and champions are named after it)", "truthfulqa")
    kind: str | None = _help("your own task: sft (train and match a completion), dpo (chosen vs rejected), mc "
                             "(multiple choice: MC1/MC2), generation (exact match of a short answer); leave it out "
                             "for the paper's tasks", None)
    data_dir: str | None = _help("task data folder; default $LOFIT_DATA_DIR, else ../shared/data when it exists, "
                                 "else $LOFIT_HOME/data (`lofit-ray data fetch` fills it)", None)
    source: str | None = _help("where split names are read: a hub dataset id (owner/name or owner/name:config), a "
                               "local .csv/.json/.jsonl/.parquet file, or a save_to_disk folder (the paper's tasks: "
                               "instead of the data dir's files; truthfulqa/truthful_qa builds the paper's fold)", None)
    records_key: str | None = _help("a .json source holding one object: the key its records sit under (e.g. "
                                    "examples)", None)
    train: str = _help("split name or file trained on (minus the selection carve)", "train")
    report: str | None = _help("held-out split name or file, scored once at the end (e.g. val, test, a path); "
                               "default val for the paper's tasks; for your own task, null carves report_fraction "
                               "of `train` (seeded by carve_seed)", None)
    select: str | None = _help("a separate selection split/file instead of carving train", None)
    select_fraction: float = _help("share of `train` carved off to choose hyperparameters on; 0: no selection "
                                   "split, train on all of `train` (only a study with search.num_trials: 0, which "
                                   "chooses nothing)", 0.2)
    report_fraction: float = _help("your own task with no report split: share of `train` carved off to report on",
                                   0.2)
    carve_seed: int = _help("seed of the carves", 0)
    limit_train: int | None = _help("use at most this many training examples (after the carve)", None)
    limit_select: int | None = _help("use at most this many selection examples", None)
    limit_report: int | None = _help("use at most this many report examples", None)
    on_overlap: str = _help("when a split you name (task.select, or task.train / task.report as a file) shares "
                            "prompts with an earlier one (train, then select, then report): error (stop, naming "
                            "them) or drop (drop them from the later split; the search's report counts them). A "
                            "report split that is the training data is an error either way", "error")
    columns: TaskColumns = _help("your own task: which column holds what", factory=TaskColumns)
    template: str | None = _help("your own task: the prompt as a format string over columns, e.g. "
                                 "'Q: {question}\\nA:' (default: the columns.prompt column as it is)", None)
    chat_template: bool = _help("wrap the prompt as a user turn in the tokenizer's chat template", False)
    fixed_choices: list[str] | None = _help("mc: the same choices for every row (e.g. [yes, no]), when no column "
                                            "holds them", None)
    label_names: list[str] | None = _help("mc: the names the label gives the choices, in order, the same for every "
                                          "row (e.g. ['1', '2'] for a 1-based label; [A, B, C, D])", None)
    answer_prefix: str = _help("put before every answer, completion and choice: texts are joined as they are, "
                               "so 'A:' + ' yes'", " ")
    mc_training: str = _help("mc: train by dpo (the right choice over the first wrong one, as TruthfulQA) or sft "
                             "(the right choice as the completion)", "dpo")
    answer_regex: str | None = _help("generation/sft scoring: extract the answer from both the output and the "
                                     "reference with this regex (its first group, else the match), e.g. "
                                     "'answer is (\\S+)'", None)
    stops: list[str] = _help("generation/sft scoring: the output is cut at the first of these", factory=lambda: ["\n"])
    max_new_tokens: int = _help("generation/sft scoring: tokens generated per item", 16)

    def __post_init__(self):
        if not 0 <= self.select_fraction < 1:
            raise ConfigError(f"task.select_fraction: {self.select_fraction} must be at least 0 and below 1")
        if not 0 < self.report_fraction < 1:
            raise ConfigError(f"task.report_fraction: {self.report_fraction} must be between 0 and 1")
        for name in ("limit_train", "limit_select", "limit_report"):
            _at_least(getattr(self, name), 1, f"task.{name}", "or null for no limit")
        _at_least(self.max_new_tokens, 1, "task.max_new_tokens")
        if self.on_overlap not in ON_OVERLAP:
            raise ConfigError(f"task.on_overlap: {self.on_overlap!r} is not one of {', '.join(ON_OVERLAP)}; error "
                              f"stops on prompts shared by two splits, drop drops them from the later split")
        if self.kind is None:
            self._check_builtin()
        else:
            self._check_user_task()

    def _check_user_task(self) -> None:
        """What can be checked of your own task before any data is read (tasks/generic.py reads it)."""
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"task.kind: {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or ""):
            raise ConfigError(f"task.name: {self.name!r} names your task in MLflow; use letters, digits, '.', '_' "
                              f"or '-', e.g. sports-understanding")
        if not self.source:
            raise ConfigError("task.source: your own task needs its data: a hub dataset id (owner/name), a "
                              ".csv/.json/.jsonl/.parquet file, or a save_to_disk folder")
        for name in _NEEDS[self.kind]:
            if getattr(self.columns, name) is None:
                raise ConfigError(f"task.columns.{name}: a {self.kind} task needs it: name the column holding "
                                  f"{_WHAT[name]}")
        if self.template is None and self.columns.prompt is None:
            raise ConfigError("task.template: give a prompt template over your columns (e.g. 'Q: {question}\\nA:'), "
                              "or task.columns.prompt naming a column that holds the whole prompt")
        if self.template is not None and not template_fields(self.template):
            raise ConfigError(f"task.template: {self.template!r} names no column; write columns as {{name}}")
        if self.kind == "mc":
            if (self.columns.choices is None) == (self.fixed_choices is None):
                raise ConfigError("task.columns.choices: an mc task needs its choices from exactly one place: "
                                  "task.columns.choices (column names) or task.fixed_choices (texts)")
            if self.fixed_choices is not None and len(self.fixed_choices) < 2:
                raise ConfigError("task.fixed_choices: list at least two choices")
            if self.mc_training not in ("dpo", "sft"):
                raise ConfigError(f"task.mc_training: {self.mc_training!r} is not dpo or sft")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as exc:
                raise ConfigError(f"task.answer_regex: not a valid regex ({exc})") from None

    def _check_builtin(self) -> None:
        if self.report is None:
            self.report = "val"
        if self.name not in TASK_NAMES and not is_registered(self.name):
            raise ConfigError(f"task.name: {self.name!r} is not a built-in task ({', '.join(TASK_NAMES)}); for your "
                              f"own data set task.kind (sft, dpo, mc or generation), task.source and task.columns")
        if self.source is not None:
            if self.name == "jsonl":
                raise ConfigError("task.source: the jsonl task reads the files task.train and task.report; "
                                  "set those (a file or a save_to_disk folder each) and drop task.source")
            if not Path(self.source).expanduser().exists() and not is_hub_id(self.source):
                raise ConfigError(f"task.source: {self.source!r} is neither an existing save_to_disk folder nor "
                                  f"a hub dataset id (owner/name or owner/name:config)")


# The fields added to TaskConfig since the first records (a user task's, on_overlap): a record's settings leave them
# out while they hold their defaults.
USER_TASK_FIELDS = ("kind", "records_key", "report_fraction", "columns", "template", "chat_template", "fixed_choices",
                    "label_names", "answer_prefix", "mc_training", "answer_regex", "stops", "max_new_tokens",
                    "on_overlap")


@dataclass
class MLflowConfig:
    """Where runs, head sets and adapters are recorded."""

    tracking_uri: str | None = _help("MLflow URI; default $MLFLOW_TRACKING_URI or sqlite:///$LOFIT_HOME/mlflow.db", None)
    experiment: str = _help("MLflow experiment name (your own task: default lofit-<task name>)", "lofit")
    artifact_root: str | None = _help("artifact location of a new experiment; default beside the SQLite store", None)


SELECTION_METRICS = ("auto", "mc1", "mc2", "em", "em_lenient", "answer_logprob", "score")
