"""The search job (`jobs/search.py`, `lofit-ray search`): its searched spaces, Tune/ASHA settings, Ray resources."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from .fields import ATTN_HELP, ConfigError, _at_least, _check_attn_implementation, _check_dtype, _help
from .sections import (SELECTION_METRICS, SELECTORS, MLflowConfig, Phase1Config, Phase2Config, TaskConfig,
                       TrainingConfig)


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
        """This space's value for an Optuna trial (lofit_ray.tuning draws every search's trials with it)."""
        if self.values is not None:
            return trial.suggest_categorical(name, list(self.values))
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass
class SearchSpaceConfig:
    """LoFiT's search space, the one definition: the search job searches it, and the study's LoFiT and phase-2
    spaces (lofit_ray.config.reproduce_job) take their defaults from it. Per trial, k cuts the phase-1 ranking; selector, l1 and phase1_lr set phase1's; phase2_lr sets phase2.lr."""

    SECTION: typing.ClassVar[str] = "search.space"

    k: Space = _help("heads phase 2 trains (about 3-10% of the model's heads)", factory=lambda: Space(values=[8, 16]))
    l1: Space = _help("phase1.l1 per trial", factory=lambda: Space(values=[5e-4, 2e-3]))
    phase1_lr: Space = _help("phase1.lr per trial", factory=lambda: Space(values=[5e-3]))
    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: Space(low=3e-3, high=1e-1, log=True))
    selector: list[str] = _help("phase1.selector per trial, a categorical dimension: any of l1, gates, grad, "
                                "grad_x_act, random (l1 and phase1_lr matter only to selectors that read them)",
                                factory=lambda: ["l1"])

    def searched(self) -> dict[str, Space]:
        """Every searched dimension as a Space, in the order trials draw them: K as an integer, the selector
        as a categorical."""
        k = Space(values=[int(v) for v in self.k.values]) if self.k.values is not None else \
            Space(low=self.k.low, high=self.k.high, log=self.k.log, integer=True)
        return {"k": k, "selector": Space(values=list(self.selector)), "l1": self.l1, "phase1_lr": self.phase1_lr,
                "phase2_lr": self.phase2_lr}

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
class SearchPolicy:
    """How one search runs, for the service and the study alike (lofit_ray.tuning): how many trials Optuna's
    TPE proposes from which seed, the selection metric that ranks them, and ASHA's early stopping."""

    num_trials: int = _help("trials Optuna proposes", 4)
    seed: int = _help("Optuna's seed", 0)
    metric: str = _help("selection metric: auto (MC2 for multiple choice, the reference answer's log-prob per "
                        "token for generation: continuous, so a small selection split still ranks trials), "
                        "score (mean of MC1 and MC2; EM + 1e-3 lenient EM), mc1, mc2, em, em_lenient, "
                        "answer_logprob", "auto")
    asha: bool = _help("stop weak trials early (ASHA on the per-epoch selection metric); off, a trial is "
                       "evaluated once, after its last epoch: cheaper when an evaluation costs more than an epoch", True)
    grace_period: int = _help("ASHA: epochs every trial gets", 1)
    reduction_factor: int = _help("ASHA: keep 1 in this many at each rung", 2)

    MIN_TRIALS: typing.ClassVar[int] = 1

    def __post_init__(self):
        _at_least(self.num_trials, self.MIN_TRIALS, "search.num_trials")
        _at_least(self.grace_period, 1, "search.grace_period")
        _at_least(self.reduction_factor, 2, "search.reduction_factor")
        if self.metric not in SELECTION_METRICS:
            raise ConfigError(f"search.metric: '{self.metric}' is not one of {', '.join(SELECTION_METRICS)}")


@dataclass
class SearchConfig(SearchPolicy):
    SECTION: typing.ClassVar[str] = "search"

    max_concurrent: int = _help("trials running at once", 1)
    space: SearchSpaceConfig = _help("what is searched", factory=SearchSpaceConfig)
    cost_aware: bool = _help("memoize phase 1, share reference log-probs, reuse loaded models", True)
    study_storage: str | None = _help("Optuna storage URL that keeps each model's study (history, importances: "
                                      "optuna-dashboard reads it; --resume continues it); default "
                                      "sqlite:///$LOFIT_HOME/optuna.db", None)
    controls: int = _help("random-heads controls after the search: the champion's K and settings on this many "
                          "random head sets (seeds 0..N-1), scored on the report split beside it; 0 = none", 3)

    def __post_init__(self):
        super().__post_init__()
        _at_least(self.controls, 0, "search.controls")
        _at_least(self.max_concurrent, 1, "search.max_concurrent")


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
    attn_implementation: str = _help(ATTN_HELP, "auto")
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
    storage_path: str | None = _help("Ray results (Tune state for --resume); default $LOFIT_HOME/ray_results",
                                     None)

    def __post_init__(self):
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError("models: list at least one model spec, e.g. [smollm2-135m]")
        _check_dtype(self.dtype)
        _check_attn_implementation(self.attn_implementation)
        if self.training.batch_size % self.scaling.num_workers:
            raise ConfigError(f"training.batch_size ({self.training.batch_size}) must be divisible by "
                              f"scaling.num_workers ({self.scaling.num_workers})")
        if self.task.select_fraction == 0 and self.task.select is None:
            raise ConfigError("task.select_fraction: 0 leaves no selection split, and the search chooses its trials "
                              "on one; set it above 0 (e.g. 0.2) or name task.select")
        if self.task.kind is not None and self.mlflow.experiment == MLflowConfig.experiment:
            self.mlflow.experiment = f"lofit-{self.task.name}"  # your task's runs apart from every other task's
