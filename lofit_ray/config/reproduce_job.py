"""The reproduce job (`jobs/reproduce.py`): models x tasks x methods, each method's search space, seeds."""
from __future__ import annotations

import typing
from dataclasses import dataclass

from .fields import ATTN_HELP, ConfigError, _at_least, _check_attn_implementation, _check_dtype, _help
from .search_job import SearchPolicy, SearchSpaceConfig, Space
from .sections import (ItiConfig, LoraConfig, MLflowConfig, Phase1Config, Phase2Config, ReftConfig,
                       TaskConfig, TrainingConfig)


REPRODUCE_TASKS = ("truthfulqa", "mquake", "clutrr")
# every method of the comparison, in the order cells run and the tables list them
REPRODUCE_METHODS = ("zero_shot", "iti", "random_heads", "transfer_heads", "lofit", "gates_heads", "grad_heads",
                     "grad_x_act_heads", "lora", "reft")
# The paper's comparison (the default); gates_heads, grad_heads and grad_x_act_heads are LoFiT's phase 2 on the
# heads of the other selectors (phase1.selector), for comparing selectors; reft is the LoReFT baseline.
PAPER_METHODS = ("zero_shot", "iti", "random_heads", "transfer_heads", "lofit", "lora")


def _searched(name: str) -> Space:
    """The search job's default for a LoFiT dimension (config.search_job.SearchSpaceConfig): one definition."""
    return getattr(SearchSpaceConfig(), name)


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

    phase1_lr: Space = _help("phase1.lr per trial", factory=lambda: _searched("phase1_lr"))
    l1: Space = _help("phase1.l1 per trial", factory=lambda: _searched("l1"))
    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: _searched("phase2_lr"))

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
    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: _searched("phase2_lr"))

    def __post_init__(self):
        _positive_space(self.phase1_lr, "search.spaces.gates_heads.phase1_lr")
        _penalty_space(self.l0, "search.spaces.gates_heads.l0")
        _positive_space(self.phase2_lr, "search.spaces.gates_heads.phase2_lr")


@dataclass
class OffsetSpace:
    """random_heads / transfer_heads / grad_heads / grad_x_act_heads: the heads are given (or need no
    training to find), so only phase 2's lr is searched."""

    SECTION: typing.ClassVar[str] = "search.spaces.random_heads"

    phase2_lr: Space = _help("phase2.lr per trial", factory=lambda: _searched("phase2_lr"))

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
class ReproduceSearchConfig(SearchPolicy):
    """One search per model x task x method x K, all of the same size on the same selection split, run the way
    the search service runs its searches (lofit_ray.tuning: Optuna TPE proposes, ASHA stops weak trials after
    an epoch, the selection metric picks). The chosen setting is then trained once per seed and scored once on
    the report split."""

    SECTION: typing.ClassVar[str] = "search"

    num_trials: int = _help("trials per search: the same for every method; 0: no search, every method trains at "
                            "its config values (phase1.lr, phase1.l1, phase2.lr, lora.lr, lora.rank, ...) for all "
                            "its epochs, as a paper's fixed protocol does", 6)
    seed: int = _help("seed of the sampler and of the training inside trials (cells then retrain with `seeds`)", 0)
    spaces: MethodSpaces = _help("what each method searches", factory=MethodSpaces)

    MIN_TRIALS: typing.ClassVar[int] = 0  # 0: no search (num_trials' help)


@dataclass
class ReproduceMLflowConfig(MLflowConfig):
    experiment: str = _help("MLflow experiment name", "lofit-reproduce")


@dataclass
class ReproduceConfig:
    """`jobs/reproduce.py`: every model x task x method x K x seed cell, scored once on the report split."""

    name: str = _help("job name: the parent MLflow run and the record's title", "reproduce")
    models: list[str] = _help("model specs, run one after another", factory=lambda: ["smollm2-135m", "gemma3-270m"])
    dtype: str = _help("float32 on CPU; bfloat16 on GPU", "float32")
    attn_implementation: str = _help(ATTN_HELP, "auto")
    device: str = _help("auto (cuda when available) | cpu | cuda", "auto")
    threads: int | None = _help("torch threads; default all cores", None)
    data_dir: str | None = _help("task data folder of tasks without their own; default as task.data_dir",
                                 None)
    tasks: dict[str, TaskConfig] = _help(f"task name ({', '.join(REPRODUCE_TASKS)}, or your own with `kind` set) "
                                         f"-> its splits",
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
        _check_attn_implementation(self.attn_implementation)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        _at_least(self.threads, 1, "threads", "or null for all cores")
        if not self.tasks:
            raise ConfigError(f"tasks: list at least one of {', '.join(REPRODUCE_TASKS)}")
        for name, task in self.tasks.items():
            if name not in REPRODUCE_TASKS and task.kind is None:
                raise ConfigError(f"tasks.{name}: unknown task; choose from {', '.join(REPRODUCE_TASKS)}, or describe "
                                  f"your own (tasks.{name}.kind, .source, .columns: see docs/data.md)")
            if task.name not in (name, TaskConfig.name):
                raise ConfigError(f"tasks.{name}.name: {task.name!r} differs from its key; leave `name` out, "
                                  f"the key names the task")
            task.name = name
            if task.select_fraction == 0 and task.select is None and self.search.num_trials:
                raise ConfigError(f"tasks.{name}.select_fraction: 0 leaves no selection split, and search.num_trials "
                                  f"({self.search.num_trials}) searches on one; set it above 0 (e.g. 0.2), name "
                                  f"tasks.{name}.select, or set search.num_trials: 0 (no search)")
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
