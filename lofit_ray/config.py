"""The YAML run/search configuration as dataclasses, validated on load.

Every error names the field (dotted path) and what to write instead. Unknown keys
are errors too, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range."""


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


@dataclass
class TaskConfig:
    name: str = "truthfulqa"  # truthfulqa | mquake | clutrr | jsonl
    data_dir: str | None = None  # default: $LOFIT_DATA_DIR or ../shared/data
    train: str = "train"  # split name or file; trials train on it minus the selection carve
    report: str = "val"  # held-out split (name or file) the champion is scored on once
    select: str | None = None  # a separate selection split/file instead of carving train
    select_fraction: float = 0.2  # share of `train` carved off to select hyperparameters on
    carve_seed: int = 0
    limit_train: int | None = None
    limit_select: int | None = None
    limit_report: int | None = None


@dataclass
class TrainingConfig:
    phase1_epochs: int = 3
    phase2_epochs: int = 3
    batch_size: int = 8
    max_length: int = 128
    dpo_beta: float = 0.5
    seed: int = 42


@dataclass
class SearchSpaceConfig:
    k: Space = field(default_factory=lambda: Space(values=[8, 16]))
    l1: Space = field(default_factory=lambda: Space(values=[5e-4, 2e-3]))
    phase1_lr: Space = field(default_factory=lambda: Space(values=[5e-3]))
    phase2_lr: Space = field(default_factory=lambda: Space(low=3e-3, high=3e-2, log=True))


@dataclass
class SearchConfig:
    num_trials: int = 4
    max_concurrent: int = 1
    seed: int = 0
    metric: str | None = None  # default: mc2 for MC tasks, em_lenient for generation tasks
    asha: bool = True
    grace_period: int = 1
    reduction_factor: int = 2
    space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    cost_aware: bool = True  # memoize phase 1, share reference log-probs, reuse loaded models


@dataclass
class ScalingSection:
    num_workers: int = 2
    cpus_per_worker: float = 0.49
    use_gpu: bool = False
    trial_cpus: float = 1.0  # the trial process runs phase 2 and evaluation itself
    trial_threads: int | None = None  # torch threads in a trial; default: CPU cores / max_concurrent
    max_failures: int = 1  # Ray Train retries a killed worker this many times


@dataclass
class DeepSpeedSection:
    enabled: bool = True
    zero_stage: int = 2


@dataclass
class MLflowSection:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "lofit"
    artifact_root: str | None = None


@dataclass
class RunConfig:
    name: str = "lofit-search"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    dtype: str = "float32"
    task: TaskConfig = field(default_factory=TaskConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    mlflow: MLflowSection = field(default_factory=MLflowSection)
    storage_path: str | None = None  # Ray results (Tune state for --resume); default ./ray_results

    def __post_init__(self):
        validate(self)

    def metric(self, eval_kind: str) -> str:
        return self.search.metric or ("mc2" if eval_kind == "mc" else "em_lenient")


def validate(cfg: RunConfig) -> None:
    if not cfg.models or not all(isinstance(m, str) and m for m in cfg.models):
        raise ConfigError("models: list at least one model spec, e.g. [smollm2-135m]")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: '{cfg.dtype}' is not one of float32 (CPU), bfloat16, float16 (GPU)")
    if not 0 < cfg.task.select_fraction < 1:
        raise ConfigError(f"task.select_fraction: {cfg.task.select_fraction} must be between 0 and 1")
    for name in ("phase1_epochs", "phase2_epochs", "batch_size", "max_length"):
        if getattr(cfg.training, name) < 1:
            raise ConfigError(f"training.{name}: must be at least 1")
    s = cfg.search
    if s.num_trials < 1 or s.max_concurrent < 1:
        raise ConfigError("search.num_trials and search.max_concurrent must be at least 1")
    for name in ("k", "l1", "phase1_lr", "phase2_lr"):
        getattr(s.space, name).check(f"search.space.{name}")
    k_low, _ = s.space.k.bounds()
    if k_low < 1:
        raise ConfigError(f"search.space.k: K must be at least 1 (got {k_low})")
    if s.metric not in (None, "mc1", "mc2", "em", "em_lenient"):
        raise ConfigError(f"search.metric: '{s.metric}' is not one of mc1, mc2, em, em_lenient")
    sc = cfg.scaling
    if sc.num_workers < 1 or sc.cpus_per_worker <= 0:
        raise ConfigError("scaling.num_workers must be >= 1 and scaling.cpus_per_worker > 0")
    if cfg.training.batch_size % sc.num_workers:
        raise ConfigError(f"training.batch_size ({cfg.training.batch_size}) must be divisible by "
                          f"scaling.num_workers ({sc.num_workers})")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]", normalize) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): coerce(v, args[1], f"{where}.{k}", normalize) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls, data, where: str = "", normalize=None):
    """Build dataclass `cls` from YAML data, checking every value against its type hint.

    Unknown keys and wrongly typed values raise ConfigError naming the dotted field.
    `normalize(cls, name, hint, value)` may rewrite a value first (shorthands).
    """
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key; known keys here: "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        if normalize:
            value = normalize(cls, name, hints[name], value)
        kwargs[name] = coerce(value, hints[name], path, normalize)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _space_shorthand(cls, name, hint, value):
    """`k: [8, 16]` or `k: 8` means `k: {values: [...]}`."""
    if hint is Space and not isinstance(value, dict):
        return {"values": value if isinstance(value, list) else [value]}
    return value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML config (or the embedded default when path is None) and validate it."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; pass one of the files in configs/")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build(RunConfig, data, "", normalize=_space_shorthand)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
