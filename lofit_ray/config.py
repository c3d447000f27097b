"""Every configuration of lofit-ray: typed dataclasses, one YAML + `--set` loader, checked on load.

One module, one set of defaults. The YAML sections of a job are the same dataclasses the
components take (`phase1:` is a `Phase1Config`, handed to `selectors.select_heads` as is), so a
value keeps its name and type from the file to the code that uses it. Each field's help text
is its `metadata["help"]`; the CLI builds its flags from it. Every error names the dotted field
and the fix; unknown keys are errors too, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range."""


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _at_least(value, low, where: str, fix: str = "") -> None:
    if value is not None and not value >= low:
        raise ConfigError(f"{where}: {value!r} must be at least {low}{'; ' + fix if fix else ''}")


def _positive(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{where}: {value!r} must be a positive number")


def _check_dtype(dtype: str, where: str = "dtype") -> None:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: '{dtype}' is not one of float32 (CPU), bfloat16, float16 (GPU)")


# -- training loops ---------------------------------------------------------------------------

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

    def __post_init__(self):
        _at_least(self.epochs, 1, "phase1.epochs")
        _positive(self.lr, "phase1.lr")
        _at_least(self.l1, 0, "phase1.l1", "0 turns the penalty off")
        if self.selector not in SELECTORS:
            raise ConfigError(f"phase1.selector: '{self.selector}' is not one of {', '.join(SELECTORS)}")
        _at_least(self.l0, 0, "phase1.l0", "0 turns the penalty off")
        if self.gate_parts not in ("separate", "joint"):
            raise ConfigError(f"phase1.gate_parts: '{self.gate_parts}' is not separate or joint")

    def settings(self) -> dict:
        """The fields the selector reads: the phase-1 memo key, so a ranking that ignores l1 or the lr
        (grad, random) is computed once, whatever the search proposes for them."""
        used = {"l1": ("epochs", "lr", "l1"), "gates": ("epochs", "lr", "l0", "gate_parts")}.get(self.selector, ())
        return {"selector": self.selector, **{name: getattr(self, name) for name in used}}


@dataclass
class Phase2Config:
    """Phase 2: learn an offset v on the top-K heads only, everything else frozen."""

    SECTION: typing.ClassVar[str] = "phase2"

    epochs: int = _help("epochs of phase 2", 5)
    lr: float = _help("AdamW learning rate of the offsets v", 1e-2)
    skip_frozen_layers: bool = _help("run the layers below the lowest trained head once per example, not every "
                                     "epoch (same result, faster)", True)

    def __post_init__(self):
        _at_least(self.epochs, 1, "phase2.epochs")
        _positive(self.lr, "phase2.lr")


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

@dataclass
class TaskConfig:
    """Which task and which splits: train minus a selection carve, and a report split scored once."""

    SECTION: typing.ClassVar[str] = "task"

    name: str = _help("truthfulqa | mquake | clutrr | jsonl", "truthfulqa")
    data_dir: str | None = _help("task data folder; default $LOFIT_DATA_DIR, else ../shared/data when it exists, "
                                 "else $LOFIT_HOME/data (`lofit-ray data fetch` fills it)", None)
    source: str | None = _help("where split names are read instead of the data dir's files: a save_to_disk "
                               "folder with train/val/test, or a hub dataset id (truthfulqa/truthful_qa "
                               "builds the paper's fold; needs a network once, then $LOFIT_CACHE_DIR)", None)
    train: str = _help("split name or file trained on (minus the selection carve)", "train")
    report: str = _help("held-out split name or file, scored once at the end (e.g. val, test, a path)", "val")
    select: str | None = _help("a separate selection split/file instead of carving train", None)
    select_fraction: float = _help("share of `train` carved off to choose hyperparameters on", 0.2)
    carve_seed: int = _help("seed of the carve", 0)
    limit_train: int | None = _help("use at most this many training examples (after the carve)", None)
    limit_select: int | None = _help("use at most this many selection examples", None)
    limit_report: int | None = _help("use at most this many report examples", None)

    def __post_init__(self):
        if not 0 < self.select_fraction < 1:
            raise ConfigError(f"task.select_fraction: {self.select_fraction} must be between 0 and 1")
        for name in ("limit_train", "limit_select", "limit_report"):
            _at_least(getattr(self, name), 1, f"task.{name}", "or null for no limit")
        if self.source is not None:
            from .tasks.source import is_hub_id

            if self.name == "jsonl":
                raise ConfigError("task.source: the jsonl task reads the files task.train and task.report; "
                                  "set those (a file or a save_to_disk folder each) and drop task.source")
            if not Path(self.source).expanduser().exists() and not is_hub_id(self.source):
                raise ConfigError(f"task.source: {self.source!r} is neither an existing save_to_disk folder nor "
                                  f"a hub dataset id (owner/name or owner/name:config)")


@dataclass
class MLflowConfig:
    """Where runs, head sets and adapters are recorded."""

    tracking_uri: str | None = _help("MLflow URI; default $MLFLOW_TRACKING_URI or sqlite:///$LOFIT_HOME/mlflow.db", None)
    experiment: str = _help("MLflow experiment name", "lofit")
    artifact_root: str | None = _help("artifact location of a new experiment; default beside the SQLite store", None)


SELECTION_METRICS = ("auto", "mc1", "mc2", "em", "em_lenient", "answer_logprob", "score")


# -- the search job ---------------------------------------------------------------------------

@dataclass
class Space:
    """One searched hyperparameter: a list of `values` (categorical) or a `low`/`high` range.

    Discrete values for the phase-1 knobs (l1, phase1_lr) let trials share one head ranking.
    """

    values: list[float] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def check(self, where: str) -> None:
        if any(v is not None and not math.isfinite(v) for v in [*(self.values or []), self.low, self.high]):
            raise ConfigError(f"{where}: every value must be a finite number (got {self.all_values()})")
        if self.values is not None:
            if not self.values or self.low is not None or self.high is not None:
                raise ConfigError(f"{where}: give either a non-empty `values` list or `low`/`high`, not both")
        elif self.low is None or self.high is None or not self.low <= self.high:
            raise ConfigError(f"{where}: needs `values: [...]` or `low` <= `high` (got low={self.low}, high={self.high})")
        elif self.log and self.low <= 0:
            raise ConfigError(f"{where}: log scale needs low > 0 (got {self.low})")

    def bounds(self) -> tuple[float, float]:
        vals = self.values if self.values is not None else [self.low, self.high]
        return min(vals), max(vals)

    def all_values(self) -> list[float]:
        return list(self.values) if self.values is not None else [self.low, self.high]

    def suggest(self, trial, name: str):
        """This space's value for an Optuna trial (the reproduction's searches; Ray Tune's come from search.py)."""
        if self.values is not None:
            return trial.suggest_categorical(name, list(self.values))
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass
class SearchSpaceConfig:
    """Per trial, k cuts the phase-1 ranking; selector, l1 and phase1_lr set phase1's; phase2_lr sets phase2.lr."""

    SECTION: typing.ClassVar[str] = "search.space"

    k: Space = _help("heads phase 2 trains (about 3-10% of the model's heads)", factory=lambda: Space(values=[8, 16]))
    l1: Space = _help("phase1.l1 per trial", factory=lambda: Space(values=[5e-4, 2e-3]))
    phase1_lr: Space = _help("phase1.lr per trial", factory=lambda: Space(values=[5e-3]))
    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: Space(low=3e-3, high=3e-2, log=True))
    selector: list[str] = _help("phase1.selector per trial, a categorical dimension: any of l1, gates, grad, "
                                "grad_x_act, random (l1 and phase1_lr matter only to selectors that read them)",
                                factory=lambda: ["l1"])

    def __post_init__(self):
        for name in ("k", "l1", "phase1_lr", "phase2_lr"):
            getattr(self, name).check(f"search.space.{name}")
        if not self.selector or any(s not in SELECTORS for s in self.selector):
            raise ConfigError(f"search.space.selector: {self.selector} must list one or more of "
                              f"{', '.join(SELECTORS)}")
        k = self.k
        if any(v != int(v) for v in k.all_values()) or (k.values is None and not k.integer and k.low != int(k.low)):
            raise ConfigError(f"search.space.k: K counts heads, so its values must be integers (got {k.all_values()})")
        if k.bounds()[0] < 1:
            raise ConfigError(f"search.space.k: K must be at least 1 (got {k.bounds()[0]:g})")
        if self.l1.bounds()[0] < 0:
            raise ConfigError(f"search.space.l1: {self.l1.bounds()[0]:g} is negative; L1 weights are >= 0")
        for name in ("phase1_lr", "phase2_lr"):
            if getattr(self, name).bounds()[0] <= 0:
                raise ConfigError(f"search.space.{name}: {getattr(self, name).bounds()[0]:g} is not positive; "
                                  f"learning rates are > 0")


@dataclass
class SearchConfig:
    SECTION: typing.ClassVar[str] = "search"

    num_trials: int = _help("trials Optuna proposes", 4)
    max_concurrent: int = _help("trials running at once", 1)
    seed: int = _help("Optuna's seed", 0)
    metric: str = _help("selection metric: auto (MC2 for multiple choice, the reference answer's log-prob per "
                        "token for generation: continuous, so a small selection split still ranks trials), "
                        "score (mean of MC1 and MC2; EM + 1e-3 lenient EM), mc1, mc2, em, em_lenient, "
                        "answer_logprob", "auto")
    asha: bool = _help("stop weak trials early (ASHA on the per-epoch selection metric)", True)
    grace_period: int = _help("ASHA: epochs every trial gets", 1)
    reduction_factor: int = _help("ASHA: keep 1 in this many at each rung", 2)
    space: SearchSpaceConfig = _help("what is searched", factory=SearchSpaceConfig)
    cost_aware: bool = _help("memoize phase 1, share reference log-probs, reuse loaded models", True)
    study_storage: str | None = _help("Optuna storage URL that keeps each model's study (history, importances: "
                                      "optuna-dashboard reads it; --resume continues it); default "
                                      "sqlite:///$LOFIT_HOME/optuna.db", None)
    controls: int = _help("random-heads controls after the search: the champion's K and settings on this many "
                          "random head sets (seeds 0..N-1), scored on the report split beside it; 0 = none", 3)

    def __post_init__(self):
        _at_least(self.num_trials, 1, "search.num_trials")
        _at_least(self.controls, 0, "search.controls")
        _at_least(self.max_concurrent, 1, "search.max_concurrent")
        if self.metric not in SELECTION_METRICS:
            raise ConfigError(f"search.metric: '{self.metric}' is not one of {', '.join(SELECTION_METRICS)}")


@dataclass
class ScalingConfig:
    SECTION: typing.ClassVar[str] = "scaling"

    num_workers: int = _help("Ray Train workers of phase 1", 2)
    cpus_per_worker: float = _help("CPUs each Ray Train worker takes", 0.49)
    worker_resources: dict[str, float] = _help("extra Ray resources each Ray Train worker needs, e.g. {phase1: 1} "
                                               "to place phase 1 on nodes started with --resources '{\"phase1\": 4}'",
                                               factory=dict)
    use_gpu: bool = _help("one GPU per Ray Train worker and per trial", False)
    trial_cpus: float = _help("CPUs of the trial process (phase 2 and evaluation run there)", 1.0)
    trial_threads: int | None = _help("torch threads in a trial; default the CPUs Ray assigned it (trial_cpus, "
                                      "at least 1), so concurrent trials never oversubscribe the cores", None)
    max_failures: int = _help("Ray Train retries a killed worker this many times", 1)

    def __post_init__(self):
        _at_least(self.num_workers, 1, "scaling.num_workers")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"scaling.cpus_per_worker: {self.cpus_per_worker} must be > 0")


@dataclass
class DeepSpeedConfig:
    SECTION: typing.ClassVar[str] = "deepspeed"

    enabled: bool = _help("wrap phase 1 in a DeepSpeed engine in each Ray Train worker", True)
    zero_stage: int = _help("ZeRO stage 0-3", 2)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: {self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class SearchJobConfig:
    """`jobs/search.py` / `lofit-ray search`: Ray Tune + Optuna over K, L1 and learning rates, per model."""

    name: str = _help("job name: Ray run names and the summary file", "lofit-search")
    models: list[str] = _help("model specs, searched one after another", factory=lambda: ["smollm2-135m"])
    dtype: str = _help("float32 on CPU; bfloat16 on GPU", "float32")
    task: TaskConfig = _help("task and splits", factory=TaskConfig)
    training: TrainingConfig = _help("batching shared by both phases", factory=TrainingConfig)
    phase1: Phase1Config = _help("phase 1; search.space.selector / l1 / phase1_lr override selector / l1 / lr "
                                 "per trial",
                                 factory=Phase1Config)
    phase2: Phase2Config = _help("phase 2; search.space.phase2_lr overrides lr per trial", factory=Phase2Config)
    search: SearchConfig = _help("the search", factory=SearchConfig)
    scaling: ScalingConfig = _help("Ray resources", factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = _help("DeepSpeed in the phase-1 workers", factory=DeepSpeedConfig)
    mlflow: MLflowConfig = _help("MLflow", factory=MLflowConfig)
    storage_path: str | None = _help("Ray results (Tune state for --resume); default ./ray_results", None)

    def __post_init__(self):
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError("models: list at least one model spec, e.g. [smollm2-135m]")
        _check_dtype(self.dtype)
        if self.training.batch_size % self.scaling.num_workers:
            raise ConfigError(f"training.batch_size ({self.training.batch_size}) must be divisible by "
                              f"scaling.num_workers ({self.scaling.num_workers})")


# -- loading ----------------------------------------------------------------------------------

def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_shown = reprlib.Repr()  # values quoted in errors: short and one line, however big or deep the YAML value
_shown.maxstring, _shown.maxother = 80, 80


def _key(name) -> str:
    """A key in an error's dotted path: text keys as written, odd ones (not text, unprintable, long) quoted short."""
    if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 60:
        return name
    return _shown.repr(name)


def _load_yaml(text: str, where: str):
    """yaml.safe_load, its errors as one-line ConfigErrors naming the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # a value YAML cannot build, e.g. an integer of 5000 digits
        raise ConfigError(f"{where}: not valid YAML: {str(exc).split(';')[0]}") from None


def coerce(value, hint, where: str, normalize=None):
    """Check `value` against a type hint (recursing into lists, dicts and dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        first = None
        for option in options:
            try:
                return coerce(value, option, where, normalize)
            except ConfigError as exc:
                first = first or exc
        raise first
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, normalize)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {_shown.repr(value)}")
        return [coerce(v, args[0], f"{where}[{i}]", normalize) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown.repr(value)}")
        return {str(k): coerce(v, args[1], f"{where}.{_key(k)}", normalize) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown.repr(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_shown.repr(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_shown.repr(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown.repr(value)}")
        return value
    return value


def build(cls, data, where: str = "", normalize=None):
    """Build dataclass `cls` from YAML data, checking every value against its type hint.

    Unknown keys and wrongly typed values raise ConfigError naming the dotted field.
    `normalize(cls, name, hint, value)` may rewrite a value first (shorthands).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_shown.repr(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields, key=str)  # YAML keys need not be text: 1, null, true
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{_key(unknown[0])}: unknown key; known keys here: "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        if normalize:
            try:
                value = normalize(cls, name, hints[name], value)
            except TypeError as exc:  # e.g. a shorthand list holding a list or mapping
                raise ConfigError(f"{path}: cannot read {_shown.repr(value)} ({exc})") from None
        kwargs[name] = coerce(value, hints[name], path, normalize)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc
    except ConfigError as exc:
        # a section's own check names "<its usual section>.field"; say where it sits in this file. One line,
        # even when it quotes a YAML key holding a line break.
        text, section = str(exc).replace("\r", "\\r").replace("\n", "\\n"), getattr(cls, "SECTION", None)
        if where and section and text.startswith(section + ".") and where != section:
            text = where + text[len(section):]
        raise ConfigError(text) from None


def _shorthands(cls, name, hint, value):
    """`k: [8, 16]` or `k: 8` means `k: {values: [...]}`; `tasks: [a, b]` means defaults for each."""
    if hint is Space and not isinstance(value, dict):
        return {"values": value if isinstance(value, list) else [value]}
    if name == "tasks" and isinstance(value, list):
        value = {t: {} for t in value}
    if name == "tasks" and isinstance(value, dict):
        value = {k: ({} if v is None else v) for k, v in value.items()}
    return value


def parse_set(pairs: list[str]) -> dict:
    """`--set a.b=VALUE` pairs (VALUE read as YAML) -> {"a.b": value}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. search.num_trials=2), got {_shown.repr(pair)}")
        out[key] = _load_yaml(value, f"--set {_key(key)}")
    return out


def shipped_configs() -> dict[str, Path]:
    """The configs that come with lofit-ray, by name: configs/ of this checkout, or, in an installed wheel,
    the package lofit_ray.configs (the same files)."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    if not folder.is_dir():
        from importlib import resources

        try:
            folder = Path(str(resources.files("lofit_ray.configs")))
        except ModuleNotFoundError:
            return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_file(name_or_path: str | Path) -> Path:
    """A config path as given, else a shipped config by name ("quickstart" or "quickstart.yaml")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml")
    if name in shipped and (len(path.parts) == 1 or path.parent.name == "configs"):
        return shipped[name]
    raise ConfigError(f"config file not found: {name_or_path}; pass a YAML file or the name of a shipped config "
                      f"({', '.join(shipped) or 'none found'})")


def load_config(path: str | Path | None = None, overrides: dict | None = None, schema=SearchJobConfig):
    """Read a YAML config of `schema` (the schema's defaults when path is None), apply overrides, check it.
    `path` may also name a shipped config ("quickstart", "configs/smoke.yaml" outside a checkout)."""
    data = {}
    if path is not None:
        path = config_file(path)
        try:
            if path.stat().st_size > 1 << 20:  # configs are a few KB; do not spend minutes parsing a stray file
                raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config (at most 1 MiB); "
                                  f"pass one of the files in configs/")
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        data = _load_yaml(text, str(path))
        if data is None:  # empty, or comments only: every default
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields at the top level, got "
                              f"{type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a section")
            node = child
        node[leaf] = value
    return build(schema, data, "", normalize=_shorthands)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(schema, data: dict):
    """The inverse of to_dict (e.g. a config shipped to a Ray worker as plain data)."""
    return build(schema, data, "", normalize=_shorthands)


# -- the reproduce job ------------------------------------------------------------------------

REPRODUCE_TASKS = ("truthfulqa", "mquake", "clutrr")
# every method of the comparison, in the order cells run and the tables list them
REPRODUCE_METHODS = ("zero_shot", "iti", "random_heads", "transfer_heads", "lofit", "gates_heads", "grad_heads",
                     "grad_x_act_heads", "lora", "reft")
# The paper's comparison (the default); gates_heads, grad_heads and grad_x_act_heads are LoFiT's phase 2 on the
# heads of the other selectors (phase1.selector), for comparing selectors; reft is the LoReFT baseline.
PAPER_METHODS = ("zero_shot", "iti", "random_heads", "transfer_heads", "lofit", "lora")


def _listed_once(values: list, where: str, example: str) -> None:
    if not values:
        raise ConfigError(f"{where}: list at least one value, e.g. {example}")
    dup = sorted({v for v in values if values.count(v) > 1}, key=str)
    if dup:
        raise ConfigError(f"{where}: {dup[0]!r} is listed twice; list each value once")


def _positive_space(space: Space, where: str) -> None:
    space.check(where)
    if space.bounds()[0] <= 0:
        raise ConfigError(f"{where}: {space.bounds()[0]:g} is not positive; give values > 0")


def _penalty_space(space: Space, where: str) -> None:
    space.check(where)
    if space.bounds()[0] < 0:
        raise ConfigError(f"{where}: {space.bounds()[0]:g} is negative; penalty weights are >= 0")


@dataclass
class LofitSpace:
    """LoFiT's search: phase 1 (lr, L1; discrete values share rankings) and phase 2's lr."""

    SECTION: typing.ClassVar[str] = "search.spaces.lofit"

    phase1_lr: Space = _help("phase1.lr per trial", factory=lambda: Space(values=[5e-3, 2e-2]))
    l1: Space = _help("phase1.l1 per trial", factory=lambda: Space(values=[1e-4, 1e-3]))
    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: Space(low=3e-3, high=1e-1, log=True))

    def __post_init__(self):
        _positive_space(self.phase1_lr, "search.spaces.lofit.phase1_lr")
        _penalty_space(self.l1, "search.spaces.lofit.l1")
        _positive_space(self.phase2_lr, "search.spaces.lofit.phase2_lr")


@dataclass
class GatesSpace:
    """gates_heads' search: the gates' phase 1 (lr, L0 weight; discrete values share rankings) and phase 2's lr."""

    SECTION: typing.ClassVar[str] = "search.spaces.gates_heads"

    phase1_lr: Space = _help("phase1.lr per trial", factory=lambda: Space(values=[5e-3, 2e-2]))
    l0: Space = _help("phase1.l0 per trial", factory=lambda: Space(values=[1e-4, 1e-3]))
    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: Space(low=3e-3, high=1e-1, log=True))

    def __post_init__(self):
        _positive_space(self.phase1_lr, "search.spaces.gates_heads.phase1_lr")
        _penalty_space(self.l0, "search.spaces.gates_heads.l0")
        _positive_space(self.phase2_lr, "search.spaces.gates_heads.phase2_lr")


@dataclass
class OffsetSpace:
    """random_heads / transfer_heads / grad_heads / grad_x_act_heads: the heads are given (or need no
    training to find), so only phase 2's lr is searched."""

    SECTION: typing.ClassVar[str] = "search.spaces.random_heads"

    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: Space(low=3e-3, high=1e-1, log=True))

    def __post_init__(self):
        _positive_space(self.phase2_lr, "search.spaces.random_heads.phase2_lr")


@dataclass
class ItiSpace:
    """ITI: the intervention strength (probes are fitted once per model x task x K x seed)."""

    SECTION: typing.ClassVar[str] = "search.spaces.iti"

    alpha: Space = _help("intervention strength per trial", factory=lambda: Space(low=0.5, high=30.0, log=True))

    def __post_init__(self):
        _positive_space(self.alpha, "search.spaces.iti.alpha")


@dataclass
class LoraSpace:
    """LoRA: lora.lr and lora.rank per trial (lora.alpha stays fixed, so the scale alpha / rank moves with rank)."""

    SECTION: typing.ClassVar[str] = "search.spaces.lora"

    lr: Space = _help("lora.lr per trial", factory=lambda: Space(low=1e-4, high=3e-3, log=True))
    rank: Space = _help("lora.rank per trial", factory=lambda: Space(values=[4, 8, 16]))

    def __post_init__(self):
        _positive_space(self.lr, "search.spaces.lora.lr")
        _positive_space(self.rank, "search.spaces.lora.rank")
        if any(v != int(v) for v in self.rank.all_values()):
            raise ConfigError(f"search.spaces.lora.rank: ranks are integers (got {self.rank.all_values()})")


@dataclass
class ReftSpace:
    """ReFT: reft.lr and reft.depth per trial (the rank stays fixed, so the trainable count does)."""

    SECTION: typing.ClassVar[str] = "search.spaces.reft"

    lr: Space = _help("reft.lr per trial", factory=lambda: Space(low=1e-4, high=1e-2, log=True))
    depth: Space = _help("reft.depth per trial", factory=lambda: Space(values=[0.25, 0.5, 0.75]))

    def __post_init__(self):
        _positive_space(self.lr, "search.spaces.reft.lr")
        self.depth.check("search.spaces.reft.depth")
        low, high = self.depth.bounds()
        if low < 0 or high > 1:
            raise ConfigError(f"search.spaces.reft.depth: {self.depth.all_values()} must lie in [0, 1]")


@dataclass
class MethodSpaces:
    """What each method's search tunes. Epochs are searched by every trained method too: a trial trains up to
    phase2.epochs (lora.epochs for LoRA) and is scored on the selection split after each epoch; the best epoch
    is its epoch count (the learning rate is constant, so stopping there equals training that many epochs)."""

    SECTION: typing.ClassVar[str] = "search.spaces"

    lofit: LofitSpace = _help("LoFiT: phase1_lr, l1, phase2_lr (+ epochs)", factory=LofitSpace)
    random_heads: OffsetSpace = _help("random heads: phase2_lr (+ epochs)", factory=OffsetSpace)
    transfer_heads: OffsetSpace = _help("another task's heads: phase2_lr (+ epochs)", factory=OffsetSpace)
    gates_heads: GatesSpace = _help("heads of the gates selector: phase1_lr, l0, phase2_lr (+ epochs)",
                                    factory=GatesSpace)
    grad_heads: OffsetSpace = _help("heads of the grad selector: phase2_lr (+ epochs)", factory=OffsetSpace)
    grad_x_act_heads: OffsetSpace = _help("heads of the grad_x_act selector: phase2_lr (+ epochs)",
                                          factory=OffsetSpace)
    iti: ItiSpace = _help("ITI: alpha", factory=ItiSpace)
    lora: LoraSpace = _help("LoRA: lr, rank (+ epochs)", factory=LoraSpace)
    reft: ReftSpace = _help("ReFT: lr, depth (+ epochs)", factory=ReftSpace)


@dataclass
class ReproduceSearchConfig:
    """One search per model x task x method x K, all of the same size on the same selection split: Optuna TPE
    proposes, ASHA (Optuna's successive-halving pruner) stops weak trials after an epoch, the selection metric
    picks. The chosen setting is then trained once per seed and scored once on the report split."""

    SECTION: typing.ClassVar[str] = "search"

    num_trials: int = _help("trials per search: the same for every method", 6)
    seed: int = _help("seed of the sampler and of the training inside trials (cells then retrain with `seeds`)", 0)
    metric: str = _help("selection metric (see the search job's search.metric): auto = MC2, or the reference "
                        "answer's log-prob per token on generation tasks", "auto")
    asha: bool = _help("stop weak trials early (successive halving on the per-epoch selection metric)", True)
    reduction_factor: int = _help("ASHA: keep 1 in this many at each rung", 2)
    spaces: MethodSpaces = _help("what each method searches", factory=MethodSpaces)

    def __post_init__(self):
        _at_least(self.num_trials, 1, "search.num_trials")
        _at_least(self.reduction_factor, 2, "search.reduction_factor")
        if self.metric not in SELECTION_METRICS:
            raise ConfigError(f"search.metric: '{self.metric}' is not one of {', '.join(SELECTION_METRICS)}")


@dataclass
class ReproduceMLflowConfig(MLflowConfig):
    experiment: str = _help("MLflow experiment name", "lofit-reproduce")


@dataclass
class ReproduceConfig:
    """`jobs/reproduce.py`: every model x task x method x K x seed cell, scored once on the report split."""

    name: str = _help("job name: the parent MLflow run and the record's title", "reproduce")
    models: list[str] = _help("model specs, run one after another", factory=lambda: ["smollm2-135m", "gemma3-270m"])
    dtype: str = _help("float32 on CPU; bfloat16 on GPU", "float32")
    device: str = _help("auto (cuda when available) | cpu | cuda", "auto")
    threads: int | None = _help("torch threads; default all cores", None)
    data_dir: str | None = _help("task data folder of tasks without their own; default as task.data_dir",
                                 None)
    tasks: dict[str, TaskConfig] = _help(f"task name ({', '.join(REPRODUCE_TASKS)}) -> its splits",
                                         factory=lambda: {t: TaskConfig(name=t) for t in REPRODUCE_TASKS})
    transfer: dict[str, str] | None = _help("task -> the task whose phase-1 heads transfer_heads borrows; default "
                                            "the next task, cyclic", None)
    methods: list[str] = _help(f"methods to run, of {', '.join(REPRODUCE_METHODS)}",
                               factory=lambda: list(PAPER_METHODS))
    k_fractions: list[float] = _help("K as shares of the model's heads (rounded half up, at least 1)",
                                     factory=lambda: [0.03, 0.10])
    seeds: list[int] = _help("seeds; each cell but zero_shot runs once per seed", factory=lambda: [0, 1])
    training: TrainingConfig = _help("batching and DPO beta of every training loop; its seed is replaced by each "
                                     "cell's seed", factory=TrainingConfig)
    eval_batch_size: int = _help("batch size of every evaluation", 8)
    phase1: Phase1Config = _help("phase 1 (epochs; lr and l1 are searched, and are what transfer_heads' source "
                                 "ranking uses when lofit is not run)", factory=Phase1Config)
    phase2: Phase2Config = _help("phase 2 of lofit, random_heads and transfer_heads: epochs is the most a trial "
                                 "trains; lr is searched", factory=Phase2Config)
    search: ReproduceSearchConfig = _help("the per-method searches", factory=ReproduceSearchConfig)
    iti: ItiConfig = _help("the ITI baseline (val_fraction; alpha is searched)", factory=ItiConfig)
    lora: LoraConfig = _help("the LoRA baseline: epochs is the most a trial trains; lr and rank are searched",
                             factory=LoraConfig)
    reft: ReftConfig = _help("the ReFT baseline: epochs is the most a trial trains; lr and depth are searched",
                             factory=ReftConfig)
    mlflow: ReproduceMLflowConfig = _help("MLflow: a parent run per job, a nested run per cell",
                                          factory=ReproduceMLflowConfig)

    def __post_init__(self):
        _listed_once(self.models, "models", "[smollm2-135m]")
        if not all(self.models):
            raise ConfigError("models: a model spec is empty; remove it or name a model")
        _check_dtype(self.dtype)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        _at_least(self.threads, 1, "threads", "or null for all cores")
        if not self.tasks:
            raise ConfigError(f"tasks: list at least one of {', '.join(REPRODUCE_TASKS)}")
        for name, task in self.tasks.items():
            if name not in REPRODUCE_TASKS:
                raise ConfigError(f"tasks.{name}: unknown task; choose from {', '.join(REPRODUCE_TASKS)}")
            if task.name not in (name, TaskConfig.name):
                raise ConfigError(f"tasks.{name}.name: {task.name!r} differs from its key; leave `name` out, "
                                  f"the key names the task")
            task.name = name
        _listed_once(self.methods, "methods", list(REPRODUCE_METHODS))
        for m in self.methods:
            if m not in REPRODUCE_METHODS:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(REPRODUCE_METHODS)}")
        _listed_once(self.k_fractions, "k_fractions", "[0.03, 0.10]")
        for i, f in enumerate(self.k_fractions):
            if not 0 < f <= 1:
                raise ConfigError(f"k_fractions[{i}]: {f} must be in (0, 1] (a share of the model's heads)")
        _listed_once(self.seeds, "seeds", "[0, 1]")
        for task, source in (self.transfer or {}).items():
            if task not in self.tasks:
                raise ConfigError(f"transfer.{task}: not one of the configured tasks ({', '.join(self.tasks)})")
            if source not in self.tasks:
                raise ConfigError(f"transfer.{task}: {source!r} is not one of the configured tasks "
                                  f"({', '.join(self.tasks)}); its phase-1 heads must be computed here")
            if source == task:
                raise ConfigError(f"transfer.{task}: a task cannot borrow its own heads; name a different task")
        if "transfer_heads" in self.methods and len(self.tasks) < 2:
            raise ConfigError("methods: transfer_heads needs at least two tasks (heads come from a different "
                              "task); add a task or drop transfer_heads")
        _at_least(self.eval_batch_size, 1, "eval_batch_size")

    def transfer_source(self, task: str) -> str:
        """The task whose phase-1 heads `task`'s transfer_heads cells train: `transfer`, else the next task."""
        if self.transfer and task in self.transfer:
            return self.transfer[task]
        names = list(self.tasks)
        return names[(names.index(task) + 1) % len(names)]
