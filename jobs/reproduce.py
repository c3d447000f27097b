"""Reproduce LoFiT's comparison (paper Table 1 and the Figure 2 head-transfer ablation) at small scale.

For every model x task (truthfulqa, mquake, clutrr) x K (fractions of the model's heads) x seed:

    zero_shot       the base model (once per model x task)
    iti             Inference-Time Intervention on the top-K probed heads, alpha chosen on the selection split
    random_heads    phase-2 bias tuning on K seeded random heads
    transfer_heads  phase-2 bias tuning on the top-K heads phase 1 chose for a DIFFERENT task
    lofit           phase 1 (scales + L1, head ranking) then phase 2 (offsets) on the top-K heads
    lora            LoRA (peft) on the attention projections (once per model x task x seed: it has no K)

Hyperparameters (phase-2 lr, ITI alpha, LoRA lr) are chosen on a selection split carved from train;
the report split (default val; any split name or file, e.g. a test file) is scored once per cell.
Each phase-1 ranking is computed once per (model, task, seed) and reused across K and for transfer.

    python jobs/reproduce.py --config configs/reproduce.yaml                  # writes jobs/results/
    python jobs/reproduce.py --config configs/reproduce_tiny.yaml --out-dir /tmp/rep   # CI, minutes
    python jobs/reproduce.py --config configs/reproduce.yaml --resume         # after a crash: done cells stay
    python jobs/reproduce.py --sync-mlflow        # log the committed record into this machine's MLflow store
    python jobs/reproduce.py --config configs/reproduce.yaml --set models=[smollm2-135m] --set methods=[zero_shot,lofit]
    ray job submit --working-dir . -- python jobs/reproduce.py --config configs/reproduce.yaml --out-dir /abs/dir

Cells run one after another in this process (torch only; Ray is just the job launcher). Results go to
<out-dir>/reproduce.json (rewritten after every cell) and <out-dir>/reproduce.md; MLflow gets one
parent run for the job and a nested run per cell (a store that lacks some recorded cells, e.g. on
another machine, gets them from the record on --resume or --sync-mlflow, tagged lofit.source=record).
Under `ray job submit` the working directory is a temporary copy, so without --out-dir the results go
to $LOFIT_HOME/reproduce instead of jobs/results.
"""
import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

try:  # prefer the installed package; `ray job submit --working-dir .` runs this file from a temporary copy
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.config import ConfigError, build

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "reproduce.yaml"
DEFAULT_OUT = REPO / "jobs" / "results"
JSON_NAME = "reproduce.json"
MD_NAME = "reproduce.md"
HEADS_DIR = "heads"  # <out-dir>/heads/: phase-1 rankings, reused by --resume

METHODS = ("zero_shot", "iti", "random_heads", "transfer_heads", "lofit", "lora")
TASKS = ("truthfulqa", "mquake", "clutrr")
PER_K = ("lofit", "iti", "random_heads", "transfer_heads")  # one cell per K and seed, in run order
LR_CHOICES = ("per_cell", "per_task")
METRICS = {"mc": ("mc1", "mc2"), "generation": ("em", "em_lenient")}
TIE = 1e-9  # selection scores closer than this are a tie: the first value in grid order wins
METRIC_LABEL = {"mc1": "MC1", "mc2": "MC2", "em": "EM", "em_lenient": "EM (lenient)"}


# -- config -------------------------------------------------------------------------------------

@dataclass
class TaskSection:
    train: str = "train"  # split name or file; the selection split is carved from it
    report: str = "val"  # split name or file scored once per cell (e.g. "test" or a path)
    select: str | None = None  # a separate selection split/file instead of the carve
    select_fraction: float = 0.2
    carve_seed: int = 0
    limit_train: int | None = None
    limit_select: int | None = None
    limit_report: int | None = None
    data_dir: str | None = None  # default: the top-level data_dir


@dataclass
class TrainingSection:
    batch_size: int = 8
    max_length: int = 128
    dpo_beta: float = 0.5
    eval_batch_size: int = 8


@dataclass
class LofitSection:
    phase1_epochs: int = 5
    phase1_lr: float = 5e-3
    l1: float = 1e-3  # fixed: one phase-1 ranking per (model, task, seed)
    phase2_epochs: int = 5
    phase2_lr: list[float] = field(default_factory=lambda: [5e-3, 1e-2, 2e-2])  # chosen on the selection split
    # per_cell: every phase-2 cell tries the whole grid. per_task: the first phase-2 cell of a model x task
    # (LoFiT, first seed, smallest K) chooses, and every later phase-2 cell of that model x task (LoFiT,
    # random_heads, transfer_heads) trains once with that lr: cheaper, and the head choice is the only difference.
    phase2_lr_choice: str = "per_cell"


@dataclass
class ItiSection:
    alphas: list[float] = field(default_factory=lambda: [1.0, 2.5, 5.0, 10.0, 15.0, 20.0])
    val_fraction: float = 0.2  # share of probing statements held out to rank the probes


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.0
    epochs: int = 5
    lr: list[float] = field(default_factory=lambda: [5e-4])  # more than one value: chosen on the selection split
    max_grad_norm: float = 1.0


@dataclass
class MlflowSection:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///$LOFIT_HOME/mlflow.db
    experiment: str = "lofit-reproduce"
    artifact_root: str | None = None


@dataclass
class ReproduceConfig:
    name: str = "reproduce"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    dtype: str = "float32"
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    threads: int | None = None  # torch threads; default: all cores
    data_dir: str | None = None  # default: $LOFIT_DATA_DIR or ../shared/data
    tasks: dict[str, TaskSection] = field(default_factory=lambda: {t: TaskSection() for t in TASKS})
    transfer: dict[str, str] | None = None  # task -> task whose heads it borrows; default: the next task, cyclic
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    k_fractions: list[float] = field(default_factory=lambda: [0.03, 0.10])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    training: TrainingSection = field(default_factory=TrainingSection)
    lofit: LofitSection = field(default_factory=LofitSection)
    iti: ItiSection = field(default_factory=ItiSection)
    lora: LoraSection = field(default_factory=LoraSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def transfer_source(self, task: str) -> str:
        if self.transfer and task in self.transfer:
            return self.transfer[task]
        names = list(self.tasks)
        return names[(names.index(task) + 1) % len(names)]


def _normalize(cls, name, hint, value):
    """`tasks: [truthfulqa, mquake]` means defaults for each; `tasks: {name: null}` too."""
    if name == "tasks" and cls is ReproduceConfig and isinstance(value, list):
        value = {t: {} for t in value}
    if name == "tasks" and isinstance(value, dict):
        value = {k: ({} if v is None else v) for k, v in value.items()}
    return value


def _build(cls, data, where: str):
    return build(cls, data, where, normalize=_normalize)


def _positive(value, where: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ConfigError(f"{where}: {value!r} must be a positive number")


def _at_least_one(value, where: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{where}: {value!r} must be at least 1 (or null for no limit)")


def _nonempty_unique(values: list, where: str, example: str) -> None:
    if not values:
        raise ConfigError(f"{where}: list at least one value, e.g. {example}")
    dup = sorted({v for v in values if values.count(v) > 1}, key=str)
    if dup:
        raise ConfigError(f"{where}: {dup[0]!r} is listed twice")


def validate(cfg: ReproduceConfig) -> ReproduceConfig:
    _nonempty_unique(cfg.models, "models", "[smollm2-135m]")
    if not all(cfg.models):
        raise ConfigError("models: a model spec is empty")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: {cfg.dtype!r} is not one of float32 (CPU), bfloat16, float16 (GPU)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not one of auto, cpu, cuda")
    _at_least_one(cfg.threads, "threads")
    if not cfg.tasks:
        raise ConfigError(f"tasks: list at least one of {', '.join(TASKS)}")
    for name, t in cfg.tasks.items():
        if name not in TASKS:
            raise ConfigError(f"tasks.{name}: unknown task; choose from {', '.join(TASKS)}")
        if not 0 < t.select_fraction < 1:
            raise ConfigError(f"tasks.{name}.select_fraction: {t.select_fraction} must be between 0 and 1")
        for key in ("limit_train", "limit_select", "limit_report"):
            _at_least_one(getattr(t, key), f"tasks.{name}.{key}")
    _nonempty_unique(cfg.methods, "methods", list(METHODS))
    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
    _nonempty_unique(cfg.k_fractions, "k_fractions", "[0.03, 0.10]")
    for i, f in enumerate(cfg.k_fractions):
        if not 0 < f <= 1:
            raise ConfigError(f"k_fractions[{i}]: {f} must be in (0, 1] (a share of the model's heads)")
    _nonempty_unique(cfg.seeds, "seeds", "[0, 1]")
    if cfg.transfer:
        for task, source in cfg.transfer.items():
            if task not in cfg.tasks:
                raise ConfigError(f"transfer.{task}: not one of the configured tasks ({', '.join(cfg.tasks)})")
            if source not in cfg.tasks:
                raise ConfigError(f"transfer.{task}: {source!r} is not one of the configured tasks "
                                  f"({', '.join(cfg.tasks)}); its phase-1 heads must be computed here")
            if source == task:
                raise ConfigError(f"transfer.{task}: a task cannot borrow its own heads; name a different task")
    if "transfer_heads" in cfg.methods and len(cfg.tasks) < 2:
        raise ConfigError("methods: transfer_heads needs at least two tasks (heads come from a different task); "
                          "add a task or drop transfer_heads")
    tr = cfg.training
    for key in ("batch_size", "max_length", "eval_batch_size"):
        _at_least_one(getattr(tr, key), f"training.{key}")
    _positive(tr.dpo_beta, "training.dpo_beta")
    lo = cfg.lofit
    _at_least_one(lo.phase1_epochs, "lofit.phase1_epochs")
    _at_least_one(lo.phase2_epochs, "lofit.phase2_epochs")
    _positive(lo.phase1_lr, "lofit.phase1_lr")
    if lo.l1 < 0:
        raise ConfigError(f"lofit.l1: {lo.l1} must be >= 0")
    _nonempty_unique(lo.phase2_lr, "lofit.phase2_lr", "[5.0e-3, 1.0e-2]")
    if lo.phase2_lr_choice not in LR_CHOICES:
        raise ConfigError(f"lofit.phase2_lr_choice: {lo.phase2_lr_choice!r} is not one of {', '.join(LR_CHOICES)}")
    for i, lr in enumerate(lo.phase2_lr):
        _positive(lr, f"lofit.phase2_lr[{i}]")
    _nonempty_unique(cfg.iti.alphas, "iti.alphas", "[1.0, 5.0, 15.0]")
    if not 0 < cfg.iti.val_fraction < 1:
        raise ConfigError(f"iti.val_fraction: {cfg.iti.val_fraction} must be between 0 and 1")
    la = cfg.lora
    _at_least_one(la.rank, "lora.rank")
    _at_least_one(la.epochs, "lora.epochs")
    _positive(la.alpha, "lora.alpha")
    if not la.targets:
        raise ConfigError("lora.targets: name at least one module, e.g. [q_proj, v_proj]")
    if not 0 <= la.dropout < 1:
        raise ConfigError(f"lora.dropout: {la.dropout} must be in [0, 1)")
    _nonempty_unique(la.lr, "lora.lr", "[5.0e-4]")
    for i, lr in enumerate(la.lr):
        _positive(lr, f"lora.lr[{i}]")
    if la.max_grad_norm < 0:
        raise ConfigError(f"lora.max_grad_norm: {la.max_grad_norm} must be >= 0 (0 turns clipping off)")
    return cfg


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. seeds=[0]), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def load_reproduce_config(path: str | Path, overrides: dict | None = None) -> ReproduceConfig:
    """Read and validate a reproduce YAML; every error names the field (ConfigError)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass configs/reproduce.yaml or configs/reproduce_tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
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
    return validate(_build(ReproduceConfig, data, ""))


# -- cells ----------------------------------------------------------------------------------------

def k_values(fractions: list[float], total_heads: int) -> list[int]:
    """K for each fraction of the heads: rounded half up, at least 1, duplicates merged, ascending."""
    return sorted({min(total_heads, max(1, math.floor(f * total_heads + 0.5))) for f in fractions})


def cell_id(model: str, task: str, method: str, k: int | None, seed: int | None) -> str:
    return f"{model}|{task}|{method}|k={'-' if k is None else k}|seed={'-' if seed is None else seed}"


def plan_cells(cfg: ReproduceConfig, model: str, ks: list[int]) -> list[dict]:
    """Every cell of one model, in run order."""
    cells = []
    methods = [m for m in METHODS if m in cfg.methods]
    per_k = [m for m in PER_K if m in methods]
    if "zero_shot" in methods:
        cells += [{"model": model, "task": t, "method": "zero_shot", "k": None, "seed": None} for t in cfg.tasks]
    for seed in cfg.seeds:
        for task in cfg.tasks:
            for k in ks:
                cells += [{"model": model, "task": task, "method": m, "k": k, "seed": seed} for m in per_k]
            if "lora" in methods:
                cells.append({"model": model, "task": task, "method": "lora", "k": None, "seed": seed})
    for c in cells:
        c["id"] = cell_id(c["model"], c["task"], c["method"], c["k"], c["seed"])
    return cells


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_setting(cfg: ReproduceConfig, cell: dict) -> str:
    """A hash of the config parts a cell's result depends on: --resume re-runs a cell when it changes."""
    def task_part(name):
        t = dataclasses.asdict(cfg.tasks[name])
        t.pop("data_dir", None)
        return t

    part = {"dtype": cfg.dtype, "task": task_part(cell["task"]), "method": cell["method"]}
    method = cell["method"]
    if method != "zero_shot":
        part["training"] = dataclasses.asdict(cfg.training)
    if method in ("lofit", "random_heads", "transfer_heads"):
        part["lofit"] = dataclasses.asdict(cfg.lofit)
    if method == "transfer_heads":
        source = cfg.transfer_source(cell["task"])
        part["source"] = {"task": source, "split": task_part(source)}
    if method == "iti":
        part["iti"] = dataclasses.asdict(cfg.iti)
    if method == "lora":
        part["lora"] = dataclasses.asdict(cfg.lora)
    return _hash(part)


# -- results file ---------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def hardware(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Results:
    """reproduce.json (the record) and reproduce.md (the table), rewritten after every cell."""

    def __init__(self, out_dir: Path, doc: dict):
        self.out_dir = out_dir
        self.doc = doc

    @property
    def json_path(self) -> Path:
        return self.out_dir / JSON_NAME

    @property
    def md_path(self) -> Path:
        return self.out_dir / MD_NAME

    def done(self, cell: dict, setting: str) -> bool:
        return any(c["id"] == cell["id"] and c.get("setting") == setting for c in self.doc["cells"])

    def add(self, record: dict) -> None:
        self.doc["cells"] = [c for c in self.doc["cells"] if c["id"] != record["id"]] + [record]
        self.doc["failed"] = [f for f in self.doc.get("failed", []) if f["id"] != record["id"]]
        self.save()

    def fail(self, cell: dict, error: str) -> None:
        self.doc["failed"] = [f for f in self.doc.get("failed", []) if f["id"] != cell["id"]]
        self.doc["failed"].append({**cell, "error": error, "at": _now()})
        self.save()

    def save(self) -> None:
        self.doc["updated"] = _now()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.json_path, json.dumps(self.doc, indent=1, default=str))
        write_atomic(self.md_path, render_markdown(self.doc))


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def _num(n) -> str:
    return "-" if n is None else f"{int(n):,}"


def _chosen(records: list[dict]) -> str:
    keys = ("phase2_lr", "alpha", "lr")
    parts = []
    for key in keys:
        vals = [r["hparams"][key] for r in records if key in r.get("hparams", {})]
        if vals:
            label = {"phase2_lr": "lr", "alpha": "alpha", "lr": "lr"}[key]
            parts.append(f"{label} " + ", ".join(f"{v:g}" for v in vals))
    return "; ".join(parts) or "-"


def render_markdown(doc: dict) -> str:
    """The results table: one section per task, a row per model x method x K, mean ± std over seeds."""
    cfg = doc.get("config", {})
    hw = doc.get("hardware", {})
    lines = [f"# LoFiT reproduction: {doc.get('name', 'reproduce')}", ""]
    status = ("finished" if doc.get("finished") else
              f"incomplete: {len(doc['failed'])} failed cells" if doc.get("failed") else "in progress (partial results)")
    lines.append(f"- Date: started {doc.get('started')}, last update {doc.get('updated')}; {status}"
                 + (f", {doc['wall_seconds']:.0f} s in all" if doc.get("wall_seconds") else ""))
    device = hw.get("device", "cpu")
    where = f"GPU {hw['gpu']}" if hw.get("gpu") else f"CPU only ({hw.get('cpu', '?')})"
    lines.append(f"- Hardware: {where}; {hw.get('cpu_count')} CPU cores, torch threads {hw.get('torch_threads')}, "
                 f"device {device}, dtype {cfg.get('dtype')}; torch {hw.get('torch')}, "
                 f"transformers {hw.get('transformers', '?')}, Python {hw.get('python')}")
    runs = [" ".join(f"--set {o}" for o in inv["set"]) or "(no overrides)" for inv in doc.get("invocations", [])]
    if len(runs) > 1:
        lines.append(f"- Built over {len(runs)} invocations (--resume): " + "; ".join(f"`{r}`" for r in runs))
    lines.append(f"- Config: `{doc.get('config_path')}`; MLflow {doc.get('tracking_uri')} (experiment "
                 f"'{doc.get('experiment')}', parent run {doc.get('parent_run_id')})")
    for model, info in doc.get("models", {}).items():
        lay = info["layout"]
        lines.append(f"- {model}: {lay['num_layers']} layers x {lay['num_heads']} heads = {info['total_heads']} heads "
                     f"(head_dim {lay['head_dim']}); K = {', '.join(map(str, info['k_values']))} "
                     f"(fractions {', '.join(f'{f:g}' for f in info['k_fractions'])}, rounded, at least 1)")
    lines.append("- Carve (selection split) and report split per task:")
    for task, s in doc.get("splits", {}).items():
        carve = s["carve"]
        if "fraction" in carve:
            sel = (f"selection = a {carve['fraction']:.0%} carve of '{carve['from']}' (carve_seed {carve['seed']}), "
                   f"n={s['n_select']}")
        else:
            sel = f"selection = '{carve.get('select')}', n={s['n_select']}"
        lines.append(f"  - {task}: train n={s['n_train']} (rest of '{s['train']}'"
                     f"{', limit ' + str(s['limit_train']) if s.get('limit_train') else ''}); {sel}; "
                     f"report = '{s['report']}', n={s['n_report']}")
    seeds = sorted({c["seed"] for c in doc.get("cells", []) if c.get("seed") is not None}) or cfg.get("seeds", [])
    lo = cfg.get("lofit", {})
    lines.append(f"- Seeds {', '.join(map(str, seeds))}: ± is the sample std over seeds (no ± with one seed). "
                 f"Each cell is scored once on the report split; hyperparameters are chosen on the selection split "
                 f"by mean(MC1, MC2) (TruthfulQA) or EM + 0.001 x EM-lenient (generation tasks).")
    lines.append(f"- LoFiT: phase 1 {lo.get('phase1_epochs')} epochs, lr {lo.get('phase1_lr')}, L1 {lo.get('l1')} "
                 f"(one ranking per model x task x seed, shared across K and by transfer_heads; its own time is the "
                 f"'phase 1 s' column; 'wall s' is all a cell ran, so the cell that first needs a ranking (or the "
                 f"lr choice) carries its time too); phase 2 {lo.get('phase2_epochs')} epochs, lr from "
                 f"{lo.get('phase2_lr')} (also for random_heads and transfer_heads).")
    if lo.get("phase2_lr_choice") == "per_task" and doc.get("phase2_lr_chosen"):
        lines.append("- Phase-2 lr chosen once per model x task on the selection split, then used by every LoFiT, "
                     "random_heads and transfer_heads cell of it: "
                     + "; ".join(f"{key.replace('|', ' / ')}: lr {c['phase2_lr']:g} (by "
                                 f"{' '.join(c['by'].split('|')[2:5])}; selection scores "
                                 + ", ".join(f"{g['phase2_lr']:g}: {g['score']:.3f}" if 'score' in g else
                                             f"{g['phase2_lr']:g}: diverged" for g in c["grid"]) + ")"
                                 for key, c in doc["phase2_lr_chosen"].items()))
    if doc.get("transfer"):
        lines.append("- transfer_heads uses the phase-1 heads of another task: "
                     + ", ".join(f"{t} <- {s}" for t, s in doc["transfer"].items()))
    lines.append("- Trainable parameters: LoFiT / random / transfer = K x head_dim offsets (phase 1 also trains "
                 "layers x heads x head_dim scales, given in brackets); ITI = K x head_dim offsets set in closed "
                 "form (no gradient training); LoRA = peft's trainable count.")
    if doc.get("failed"):
        lines.append(f"- FAILED cells ({len(doc['failed'])}; rerun with --resume): "
                     + "; ".join(f"{f['id']}: {f['error'][:120]}" for f in doc["failed"]))
    lines.append("")

    cells = doc.get("cells", [])
    order = {m: i for i, m in enumerate(METHODS)}
    for task in doc.get("task_order") or sorted({c["task"] for c in cells}):
        rows = [c for c in cells if c["task"] == task]
        if not rows:
            continue
        names = METRICS["mc" if "mc1" in rows[0]["metrics"] else "generation"]
        split = doc.get("splits", {}).get(task, {}).get("report", "?")
        lines.append(f"## {task} (report split '{split}')")
        lines.append("")
        lines.append("| model | method | K | " + " | ".join(METRIC_LABEL[n] for n in names)
                     + " | n | seeds | trainable params | wall s / cell | phase 1 s | chosen |")
        lines.append("|" + "---|" * (len(names) + 9))
        groups: dict = {}
        for c in rows:
            groups.setdefault((c["model"], c["method"], c["k"]), []).append(c)
        model_order = {m: i for i, m in enumerate(doc.get("models", {}))}
        for (model, method, k), recs in sorted(groups.items(), key=lambda kv: (
                model_order.get(kv[0][0], 99), order.get(kv[0][1], 99), kv[0][2] or 0)):
            recs = sorted(recs, key=lambda r: (r["seed"] is None, r["seed"]))
            vals = [_fmt([r["metrics"][n] for r in recs]) for n in names]
            params = _num(recs[0].get("trainable_params"))
            if recs[0].get("phase1_params"):
                params += f" [{_num(recs[0]['phase1_params'])}]"
            if method == "iti":
                params += " (closed form)"
            ns = sorted({r["n"] for r in recs})
            seeds_txt = ", ".join(str(r["seed"]) for r in recs) if recs[0]["seed"] is not None else "-"
            wall = sum(r["wall_seconds"] for r in recs) / len(recs)
            p1 = [r["phase1_seconds"] for r in recs if r.get("phase1_seconds") is not None]
            lines.append(f"| {model} | {method} | {'-' if k is None else k} | " + " | ".join(vals)
                         + f" | {'/'.join(map(str, ns))} | {seeds_txt} | {params} | {wall:.1f} | "
                         + (f"{sum(p1) / len(p1):.1f}" if p1 else "-") + f" | {_chosen(recs)} |")
        lines.append("")
    lines.extend(render_comparisons(cells, list(doc.get("models", {})), doc.get("task_order") or []))
    return "\n".join(lines) + "\n"


BASELINES = ("zero_shot", "iti", "random_heads", "transfer_heads", "lora")


def render_comparisons(cells: list[dict], models: list[str], tasks: list[str]) -> list[str]:
    """LoFiT minus each baseline, per model x task x K (means over seeds), and how often LoFiT is ahead.

    Computed from the cells so the claims in prose can be checked against the record. The tally uses the
    first metric (MC1 on TruthfulQA, strict EM on the generation tasks); zero-shot and LoRA have no K, so
    their one value is compared with LoFiT at every K.
    """
    def mean_of(model, task, method, k) -> dict | None:
        recs = [c for c in cells if (c["model"], c["task"], c["method"]) == (model, task, method)
                and (method in ("zero_shot", "lora") or c["k"] == k)]
        if not recs:
            return None
        return {"seeds": len(recs), **{m: statistics.fmean(r["metrics"][m] for r in recs) for m in recs[0]["metrics"]}}

    rows, tally = [], {b: [0, 0, 0] for b in BASELINES}  # ahead, tied, behind
    for model in models:
        for task in tasks:
            for k in sorted({c["k"] for c in cells if (c["model"], c["task"], c["method"]) == (model, task, "lofit")}):
                lofit = mean_of(model, task, "lofit", k)
                names = METRICS["mc" if "mc1" in lofit else "generation"][:2 if "mc1" in lofit else 1]
                cols = []
                for b in BASELINES:
                    other = mean_of(model, task, b, k)
                    if other is None:
                        cols.append("-")
                        continue
                    deltas = [lofit[n] - other[n] for n in names]
                    cols.append(" / ".join(f"{d:+.3f}" for d in deltas))
                    tally[b][0 if deltas[0] > TIE else 1 if deltas[0] >= -TIE else 2] += 1
                value = " / ".join(f"{lofit[n]:.3f}" for n in names)
                rows.append(f"| {model} | {task} | {k} | {value} ({lofit['seeds']} seed{'s' * (lofit['seeds'] > 1)}) | "
                            + " | ".join(cols) + " |")
    if not rows:
        return []
    lines = ["## LoFiT minus each baseline", "",
             "Means over the seeds each method has; MC1 / MC2 on TruthfulQA, strict EM on MQuAKE and CLUTRR. "
             "At n = 82-100 one standard error of a single MC1 or EM is about 0.05, so gaps under that are noise.", "",
             "| model | task | K | LoFiT | vs " + " | vs ".join(BASELINES) + " |", "|" + "---|" * (4 + len(BASELINES))]
    lines += rows
    lines.append("")
    total = len(rows)
    lines.append(f"On the first metric, over {total} model x task x K comparisons, LoFiT is ahead / tied / behind: "
                 + "; ".join(f"{b} {a} / {t} / {bh}" for b, (a, t, bh) in tally.items()) + ".")
    lines.append("")
    return lines


# -- the run --------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text).name if os.sep in text else text).strip("-")


def cell_run_name(cell: dict) -> str:
    return f"{cell['method']}-{slug(cell['model'])}-{cell['task']}" + (
        f"-k{cell['k']}" if cell["k"] is not None else "") + (f"-s{cell['seed']}" if cell["seed"] is not None else "")


def cell_params(cell: dict, report_split: str, n_train, n_select, dtype: str, device: str) -> dict:
    return {"model": cell["model"], "task": cell["task"], "method": cell["method"],
            "k": "-" if cell["k"] is None else cell["k"], "seed": "-" if cell["seed"] is None else cell["seed"],
            "report_split": report_split, "n_train": n_train, "n_select": n_select, "dtype": dtype, "device": device}


def cell_tags(cell: dict) -> dict:
    from lofit_ray import tracking as tr

    return {tr.MODEL_TAG: cell["model"], tr.TASK_TAG: cell["task"], tr.METHOD_TAG: cell["method"],
            "lofit.kind": "reproduce-cell", "lofit.cell": cell["id"]}


def cell_metrics(record: dict) -> dict:
    """What a cell's MLflow run logs as metrics, from its record (the live run and the backfill agree)."""
    logged = {**record["metrics"], "n": record["n"], "eval_seconds": record["eval_seconds"],
              "trainable_parameters": record["trainable_params"], "wall_seconds": record["wall_seconds"]}
    if record.get("phase1_seconds") is not None:
        logged["phase1_seconds"] = record["phase1_seconds"]
    chosen = [g for g in record.get("selection", []) if "score" in g and all(
        g.get(k) == v for k, v in record["hparams"].items() if k in ("phase2_lr", "alpha", "lr"))]
    if chosen:
        logged["sel_score"] = chosen[0]["score"]
    return logged


class Runner:
    def __init__(self, cfg: ReproduceConfig, config_path: str, out_dir: Path, tracking_uri: str | None,
                 resume: bool, overwrite: bool, fail_fast: bool, overrides: list[str] | None = None,
                 sync_only: bool = False):
        import torch

        from lofit_ray import tracking

        self.cfg, self.out_dir, self.resume, self.fail_fast = cfg, out_dir, resume, fail_fast
        self.tracking = tracking
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        existing = out_dir / JSON_NAME
        doc = None
        if sync_only and not existing.is_file():
            raise FileNotFoundError(f"--sync-mlflow needs a record: {existing} does not exist; pass the --out-dir "
                                    f"that holds {JSON_NAME}")
        if existing.is_file():
            old = json.loads(existing.read_text())
            if resume or sync_only:
                doc = old
            elif old.get("cells") and not overwrite:
                raise FileExistsError(f"{existing} already holds {len(old['cells'])} cells; pass --resume to "
                                      f"continue it, --overwrite to start over, or a different --out-dir")
        # resolved by run(): no MLflow store is touched before the inputs check out
        self.uri, self.experiment_id = tracking_uri or cfg.mlflow.tracking_uri, None
        if doc is None:
            doc = {"name": cfg.name, "started": _now(), "cells": [], "failed": [], "models": {}, "splits": {},
                   "phase1": {}}
        if not sync_only:  # --sync-mlflow logs the record as it stands: no new invocation, nothing to run
            doc.update(config_path=str(config_path), config=dataclasses.asdict(cfg), task_order=list(cfg.tasks),
                       hardware=hardware(self.device), experiment=cfg.mlflow.experiment, finished=None,
                       transfer=({t: cfg.transfer_source(t) for t in cfg.tasks} if "transfer_heads" in cfg.methods
                                 else doc.get("transfer", {})))  # a run without transfer cells keeps the record's
            # `config` is the latest invocation's; this list says how the record was built up across --resume runs
            doc.setdefault("invocations", []).append({"at": _now(), "config": str(config_path),
                                                      "set": list(overrides or []), "resume": resume})
        self.results = Results(out_dir, doc)
        self._splits: dict = {}
        self._rankings: dict = {}
        self.loaded = None

    # -- helpers ---------------------------------------------------------------------------------
    def splits(self, task_name: str):
        if task_name not in self._splits:
            from lofit_ray.splits import build_splits
            from lofit_ray.tasks import get_task

            t = self.cfg.tasks[task_name]
            task = get_task(task_name, data_dir=t.data_dir or self.cfg.data_dir)
            s = build_splits(task, train=t.train, report=t.report, select=t.select, select_fraction=t.select_fraction,
                             carve_seed=t.carve_seed, limit_train=t.limit_train, limit_select=t.limit_select,
                             limit_report=t.limit_report)
            self._splits[task_name] = (task, s)
            self.results.doc["splits"][task_name] = {
                "train": t.train, "report": t.report, "carve": s.carve, "limit_train": t.limit_train,
                "n_train": len(s.train), "n_select": len(s.select), "n_report": len(s.report),
                "train_hash": s.train_hash(), "objective": task.objective, "eval_kind": task.eval_kind}
        return self._splits[task_name]

    def train_cfg(self, epochs: int, lr: float, seed: int, l1: float = 0.0):
        from lofit_ray.train import TrainConfig

        tr = self.cfg.training
        return TrainConfig(epochs=epochs, lr=lr, batch_size=tr.batch_size, l1=l1, dpo_beta=tr.dpo_beta,
                           max_length=tr.max_length, seed=seed)

    def score(self, items, adapter=None) -> dict:
        from lofit_ray.evaluate import evaluate

        loaded = self.loaded
        offsets = adapter.attach(loaded.model) if adapter is not None else None
        try:
            return evaluate(loaded, items, batch_size=self.cfg.training.eval_batch_size)
        finally:
            if offsets is not None:
                offsets.detach()

    def ranking_path(self, model: str, task_name: str, seed: int) -> Path:
        return self.out_dir / HEADS_DIR / f"{slug(model)}__{task_name}__seed{seed}.json"

    def ranking(self, task_name: str, seed: int):
        """Phase 1 for (model, task, seed): computed once, saved under <out-dir>/heads/ (reused by --resume)."""
        from lofit_ray.heads import HeadSet
        from lofit_ray.train import select_heads

        loaded = self.loaded
        key = (loaded.spec, task_name, seed)
        if key in self._rankings:
            return self._rankings[key]
        _, s = self.splits(task_name)
        lo = self.cfg.lofit
        tc = self.train_cfg(lo.phase1_epochs, lo.phase1_lr, seed, l1=lo.l1)
        memo = _hash({"fp": loaded.fingerprint, "data": s.train_hash(), "task": task_name, **dataclasses.asdict(tc)})
        path = self.ranking_path(loaded.spec, task_name, seed)
        entry = None
        if self.resume and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == memo:
                entry = {**saved, "head_set": HeadSet(**saved["head_set"]), "reused": True}
        if entry is None:
            start = time.time()
            print(f"[reproduce] phase 1: {loaded.spec} / {task_name} / seed {seed} "
                  f"({len(s.train)} examples, {tc.epochs} epochs)", flush=True)
            total = loaded.layout.total_heads
            head_set = select_heads(loaded, s.train, tc, k=total, task=task_name)
            entry = {"key": memo, "seconds": round(time.time() - start, 2), "head_set": head_set,
                     "final_loss": head_set.hparams.get("final_loss"), "reused": False}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**entry, "head_set": json.loads(head_set.to_json())}, indent=1))
        self.results.doc["phase1"][f"{loaded.spec}|{task_name}|seed={seed}"] = {
            k: entry[k] for k in ("key", "seconds", "final_loss")} | {"file": str(path)}
        self._rankings[key] = entry
        return entry

    def _tune_grid(self, cell: dict, head_set):
        """Phase 2 on head_set's top K for each lr of the grid; the best on the selection split is scored.
        With lofit.phase2_lr_choice=per_task, a model x task's first phase-2 cell chooses and the rest reuse it."""
        from lofit_ray.baselines.iti import selection_score
        from lofit_ray.train import NaNLossError, tune_bias

        task_name, k, seed = cell["task"], cell["k"], cell["seed"]
        _, s = self.splits(task_name)
        lo = self.cfg.lofit
        per_task = lo.phase2_lr_choice == "per_task"
        choices = self.results.doc.setdefault("phase2_lr_chosen", {}) if per_task else {}
        key = f"{self.loaded.spec}|{task_name}"
        prior = choices.get(key)
        if prior is not None and prior.get("grid_values") != list(lo.phase2_lr):
            prior = None  # chosen from a different grid: choose again
        lrs = [prior["phase2_lr"]] if prior else lo.phase2_lr
        grid, best = [], None
        for lr in lrs:
            tc = self.train_cfg(lo.phase2_epochs, lr, seed)
            try:
                adapter = tune_bias(self.loaded, head_set, s.train, tc, k=k, task=task_name)
            except NaNLossError as exc:
                grid.append({"phase2_lr": lr, "error": str(exc)})
                continue
            entry = {"phase2_lr": lr, "final_loss": adapter.config.hparams.get("final_loss")}
            if len(lrs) > 1:
                sel = self.score(s.select, adapter)
                entry.update(score=selection_score(sel), **_metric_part(sel))
            grid.append(entry)
            if best is None or entry.get("score", 0) > best[0].get("score", 0) + TIE:
                best = (entry, adapter)
        if best is None:
            raise RuntimeError(f"phase 2 diverged for every lr in lofit.phase2_lr={lo.phase2_lr}; lower them")
        entry, adapter = best
        if per_task and prior is None:
            choices[key] = {"phase2_lr": entry["phase2_lr"], "by": cell["id"], "grid_values": list(lo.phase2_lr),
                            "grid": grid}
        report = self.score(s.report, adapter)
        hparams = {"phase2_lr": entry["phase2_lr"], "phase2_epochs": lo.phase2_epochs}
        if prior:
            hparams["phase2_lr_chosen_by"] = prior["by"]
        return report, adapter, hparams, grid if len(lrs) > 1 else []

    # -- methods ---------------------------------------------------------------------------------
    def run_zero_shot(self, cell: dict) -> dict:
        _, s = self.splits(cell["task"])
        return {"metrics": self.score(s.report), "trainable_params": 0, "hparams": {}}

    def run_lofit(self, cell: dict) -> dict:
        entry = self.ranking(cell["task"], cell["seed"])
        head_set = entry["head_set"].with_k(cell["k"])
        report, adapter, hparams, grid = self._tune_grid(cell, head_set)
        lo = self.cfg.lofit
        hparams.update(l1=lo.l1, phase1_lr=lo.phase1_lr, phase1_epochs=lo.phase1_epochs)
        lay = self.loaded.layout
        return {"metrics": report, "trainable_params": adapter.num_parameters, "hparams": hparams,
                "selection": grid, "heads": head_set.top(cell["k"]), "phase1_seconds": entry["seconds"],
                "phase1_reused": entry["reused"], "phase1_params": lay.num_layers * lay.num_heads * lay.head_dim,
                "artifacts": {"head_set": head_set, "adapter": adapter}}

    def run_transfer_heads(self, cell: dict) -> dict:
        from lofit_ray.heads import HeadSet

        source = self.cfg.transfer_source(cell["task"])
        entry = self.ranking(source, cell["seed"])
        base = entry["head_set"]
        head_set = HeadSet(**{**dataclasses.asdict(base), "k": cell["k"], "method": "transfer",
                              "hparams": {**base.hparams, "transferred_from": source}})
        report, adapter, hparams, grid = self._tune_grid(cell, head_set)
        hparams["heads_from"] = source
        return {"metrics": report, "trainable_params": adapter.num_parameters, "hparams": hparams,
                "selection": grid, "heads": head_set.top(cell["k"]), "phase1_seconds": entry["seconds"],
                "phase1_reused": entry["reused"], "artifacts": {"adapter": adapter}}

    def run_random_heads(self, cell: dict) -> dict:
        from lofit_ray.heads import HeadSet, random_ranking

        loaded = self.loaded
        head_set = HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=dataclasses.asdict(loaded.layout),
                           ranking=random_ranking(loaded.layout, cell["seed"]), k=cell["k"], method="random",
                           task=cell["task"], seed=cell["seed"])
        report, adapter, hparams, grid = self._tune_grid(cell, head_set)
        return {"metrics": report, "trainable_params": adapter.num_parameters, "hparams": hparams,
                "selection": grid, "heads": head_set.top(cell["k"]), "artifacts": {"adapter": adapter}}

    def run_iti(self, cell: dict) -> dict:
        from lofit_ray.baselines.iti import fit_iti

        task, s = self.splits(cell["task"])
        t = self.cfg.tasks[cell["task"]]
        # Probe only on the rows phase 2 trains on: never on the selection carve or the report split.
        prompts = [ex.prompt for ex in s.train]
        statements = [st for st in task.labelled_statements(t.train) if any(st[0].startswith(p) for p in prompts)]
        adapter, info = fit_iti(self.loaded, task.name, cell["k"], selection_items=s.select,
                                alphas=self.cfg.iti.alphas, statements=statements,
                                batch_size=self.cfg.training.eval_batch_size, val_fraction=self.cfg.iti.val_fraction,
                                seed=cell["seed"], score_base=False)
        report = self.score(s.report, adapter)
        grid = [{"alpha": g["alpha"], "score": g["score"], **_metric_part(g)} for g in info["alpha_grid"]]
        return {"metrics": report, "trainable_params": adapter.num_parameters,
                "hparams": {"alpha": info["alpha"], "n_statements": info["n_statements"]},
                "selection": grid, "heads": [list(h) for h in info["heads"]],
                "probe_accuracy": info["probe_accuracy"], "artifacts": {"adapter": adapter}}

    def run_lora(self, cell: dict) -> dict:
        from lofit_ray.baselines import lora
        from lofit_ray.baselines.iti import selection_score
        from lofit_ray.train import NaNLossError

        _, s = self.splits(cell["task"])
        la = self.cfg.lora
        loaded = self.loaded
        kw = {"rank": la.rank, "alpha": la.alpha, "targets": la.targets, "dropout": la.dropout}
        grid, best, report, info_best = [], None, None, None
        for lr in la.lr:
            tc = self.train_cfg(la.epochs, lr, cell["seed"])
            peft_model = None
            try:
                peft_model, info = lora.train_lora(loaded, s.train, tc, max_grad_norm=la.max_grad_norm or None, **kw)
                entry = {"lr": lr, "final_loss": info["final_loss"]}
                if len(la.lr) == 1:  # nothing to choose: score the report split right away
                    report, info_best, best = lora.evaluate_lora(loaded, peft_model, s.report,
                                                                 batch_size=self.cfg.training.eval_batch_size), info, entry
                else:
                    sel = lora.evaluate_lora(loaded, peft_model, s.select, batch_size=self.cfg.training.eval_batch_size)
                    entry.update(score=selection_score(sel), **_metric_part(sel))
                    if best is None or entry["score"] > best["score"] + TIE:
                        best, info_best = entry, info
                        state = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
                grid.append(entry)
            except NaNLossError as exc:
                grid.append({"lr": lr, "error": str(exc)})
            finally:
                if peft_model is not None:
                    peft_model.unload()  # take the LoRA layers out of loaded.model again
        if best is None:
            raise RuntimeError(f"LoRA diverged for every lr in lora.lr={la.lr}; lower them")
        if report is None:  # rebuild the chosen adapter and score it once on the report split
            import torch

            peft_model = lora.wrap_lora(loaded, **kw)
            try:
                with torch.no_grad():
                    params = dict(peft_model.named_parameters())
                    for name, value in state.items():
                        params[name].copy_(value)
                report = lora.evaluate_lora(loaded, peft_model, s.report, batch_size=self.cfg.training.eval_batch_size)
            finally:
                peft_model.unload()
        return {"metrics": report, "trainable_params": info_best["trainable_parameters"],
                "hparams": {"lr": best["lr"], "epochs": la.epochs, "rank": la.rank, "alpha": la.alpha,
                            "targets": list(la.targets)},
                "selection": grid if len(la.lr) > 1 else [], "total_params": info_best["total_parameters"]}

    # -- one cell ------------------------------------------------------------------------------------
    def run_cell(self, cell: dict, setting: str, parent: str, index: str) -> bool:
        tr = self.tracking
        _, s = self.splits(cell["task"])
        params = cell_params(cell, self.cfg.tasks[cell["task"]].report, len(s.train), len(s.select),
                             self.cfg.dtype, self.device)
        run_id = tr.start_run(self.uri, self.experiment_id, cell_run_name(cell), params=params, tags=cell_tags(cell),
                              parent_run_id=parent)
        start = time.time()
        try:
            out = getattr(self, f"run_{cell['method']}")(cell)
            wall = round(time.time() - start, 2)
            metrics = out["metrics"]
            artifacts = out.pop("artifacts", {})
            record = {k: cell[k] for k in ("id", "model", "task", "method", "k", "seed")}
            record.update(setting=setting, split=self.cfg.tasks[cell["task"]].report,
                          metrics=_metric_part(metrics), n=metrics["n"], eval_seconds=metrics["seconds"],
                          trainable_params=out["trainable_params"], wall_seconds=wall, hparams=out["hparams"],
                          selection=out.get("selection", []), mlflow_run_id=run_id, finished_at=_now())
            for key in ("heads", "phase1_seconds", "phase1_reused", "phase1_params", "probe_accuracy",
                        "total_params"):
                if key in out:
                    record[key] = out[key]
            self.log_record(run_id, record)
            if "head_set" in artifacts:
                tr.log_head_set(self.uri, run_id, artifacts["head_set"], k=cell["k"])
            if "adapter" in artifacts:
                tr.log_adapter(self.uri, run_id, artifacts["adapter"])
            tr.end_run(self.uri, run_id)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            tr.end_run(self.uri, run_id, "FAILED", reason=reason)
            print(f"[reproduce] {index} {cell['id']} FAILED after {time.time() - start:.0f}s: {reason}", flush=True)
            traceback.print_exc()
            self.tick()
            self.results.fail(cell, reason)
            if self.fail_fast:
                raise
            return False
        except BaseException:
            tr.end_run(self.uri, run_id, "KILLED", reason="interrupted")
            raise
        self.tick()
        self.results.add(record)
        scores = " ".join(f"{k}={v:.3f}" for k, v in record["metrics"].items())
        chosen_txt = " ".join(f"{k}={v:g}" for k, v in out["hparams"].items() if k in ("phase2_lr", "alpha", "lr"))
        print(f"[reproduce] {index} {cell['id']}: {scores} (n={record['n']}) {chosen_txt} "
              f"params={record['trainable_params']} [{wall:.1f}s]", flush=True)
        return True

    def log_record(self, run_id: str, record: dict) -> None:
        """A cell run's chosen hyperparameters (params chosen.*) and metrics, from its record."""
        if record.get("hparams"):
            self.tracking.log_params(self.uri, run_id, {f"chosen.{k}": v for k, v in record["hparams"].items()})
        self.tracking.log_metrics(self.uri, run_id, cell_metrics(record))

    def sync_mlflow(self, parent: str) -> int:
        """Log each recorded cell that this MLflow store lacks as a child run of ``parent``, from the record.

        The record (reproduce.json, committed) outlives any one MLflow store: after --resume on a new machine,
        or with a different --tracking-uri, the cells an earlier store holds would otherwise be missing from
        the parent run. Each backfilled run carries the cell's params, chosen hyperparameters and metrics, the
        LoFiT head set when the ranking file is there, and tag lofit.source=record; adapters are not in the
        record, so those runs have none. Returns how many cells it logged; the caller saves the record.
        """
        tr, doc = self.tracking, self.results.doc
        present = {r.info.run_id for r in tr.child_runs(self.uri, parent)}
        missing = [c for c in doc["cells"] if c.get("mlflow_run_id") not in present]
        dtype, device = doc.get("config", {}).get("dtype", ""), doc.get("hardware", {}).get("device", "")
        for record in missing:
            split = doc.get("splits", {}).get(record["task"], {})
            params = cell_params(record, record.get("split", ""), split.get("n_train", ""), split.get("n_select", ""),
                                 dtype, device)
            tags = {**cell_tags(record), "lofit.source": "record", "lofit.record_file": str(self.results.json_path),
                    "lofit.recorded_run_id": record.get("mlflow_run_id") or "",
                    "lofit.finished_at": record.get("finished_at", "")}
            run_id = tr.start_run(self.uri, self.experiment_id, cell_run_name(record), params=params, tags=tags,
                                  parent_run_id=parent)
            self.log_record(run_id, record)
            head_set = self.recorded_head_set(record)
            if head_set is not None:
                tr.log_head_set(self.uri, run_id, head_set, k=record["k"])
            tr.end_run(self.uri, run_id)
            record["mlflow_run_id"] = run_id
        if missing:
            print(f"[reproduce] logged {len(missing)} recorded cell(s) this MLflow store lacked under parent run "
                  f"{parent} (tag lofit.source=record)", flush=True)
        return len(missing)

    def recorded_head_set(self, record: dict):
        """The phase-1 ranking a recorded LoFiT cell used, from <out-dir>/heads/ (None if absent or another)."""
        from lofit_ray.heads import HeadSet

        if record["method"] != "lofit":
            return None
        path = self.ranking_path(record["model"], record["task"], record["seed"])
        if not path.is_file():
            return None
        head_set = HeadSet(**json.loads(path.read_text())["head_set"])
        top = [list(h) for h in head_set.top(record["k"])]
        return head_set if top == [list(h) for h in record.get("heads", top)] else None

    # -- the job ---------------------------------------------------------------------------------
    def model_info(self, model: str) -> list[int]:
        """K values of a model: from the record (no load needed on --resume) or by loading it."""
        info = self.results.doc["models"].get(model)
        if info and info.get("k_fractions") == list(self.cfg.k_fractions):
            return info["k_values"]
        self.load(model)
        return self.results.doc["models"][model]["k_values"]

    def load(self, model: str) -> None:
        from lofit_ray.models import load_model

        if self.loaded is not None and self.loaded.spec == model:
            return
        self.loaded = None
        self._rankings.clear()
        start = time.time()
        self.loaded = load_model(model, dtype=self.cfg.dtype, device=self.device)
        lay = self.loaded.layout
        self.results.doc["models"][model] = {
            "layout": dataclasses.asdict(lay), "total_heads": lay.total_heads, "fingerprint": self.loaded.fingerprint,
            "k_fractions": list(self.cfg.k_fractions), "k_values": k_values(self.cfg.k_fractions, lay.total_heads),
            "parameters": sum(p.numel() for p in self.loaded.model.parameters())}
        print(f"[reproduce] loaded {model} ({lay.num_layers} layers x {lay.num_heads} heads, "
              f"{time.time() - start:.1f}s)", flush=True)

    def parent_run(self, reopen: bool = True) -> str:
        """The record's parent run in this store (reopened as RUNNING when ``reopen``), else a new one."""
        from mlflow.exceptions import MlflowException

        tr, doc = self.tracking, self.results.doc
        self.uri = tr.resolve_tracking_uri(self.uri)
        self.experiment_id = tr.ensure_experiment(self.cfg.mlflow.experiment, self.uri, self.cfg.mlflow.artifact_root)
        parent = doc.get("parent_run_id") if doc.get("tracking_uri") == self.uri else None
        if parent:
            try:
                if not reopen:
                    tr.client(self.uri).get_run(parent)
                    return parent
                tr.client(self.uri).update_run(parent, status="RUNNING")
                # cells a killed driver left RUNNING: closed here, re-run below
                closed = tr.close_dangling_runs(self.uri, parent, reason="driver stopped; cell re-run by --resume")
                if closed:
                    print(f"[reproduce] closed {len(closed)} cell run(s) a stopped driver left open", flush=True)
                return parent
            except MlflowException as exc:  # deleted or unknown: start a new parent
                print(f"[reproduce] parent run {parent} not reusable ({exc}); starting a new one", flush=True)
        cfg = dataclasses.asdict(self.cfg)
        parent = tr.start_run(self.uri, self.experiment_id, self.cfg.name, params=cfg,
                              tags={"lofit.kind": "reproduce", "lofit.out_dir": str(self.out_dir)})
        doc.update(parent_run_id=parent, tracking_uri=self.uri)
        return parent

    def tick(self) -> None:
        """Total wall time of the job so far, across --resume runs."""
        self.results.doc["wall_seconds"] = round(self.wall_base + time.time() - self.started, 1)

    def check_inputs(self) -> None:
        """Read every task's splits and resolve every model spec now, so a missing file or a wrong spec
        fails in seconds rather than hours into the run (raises TaskDataError / ModelSpecError)."""
        from lofit_ray.models import check_spec

        for task_name in self.cfg.tasks:
            self.splits(task_name)
        for model in self.cfg.models:
            check_spec(model)

    def sync(self) -> int:
        """--sync-mlflow: put the record into this MLflow store (one parent run, a run per cell); runs nothing."""
        doc = self.results.doc
        before = doc.get("parent_run_id")  # parent_run() records a new id when it has to start one
        parent = self.parent_run(reopen=False)
        self.sync_mlflow(parent)
        self.results.save()
        if parent != before:  # a parent made here: close it the way the record stands
            self.tracking.log_metrics(self.uri, parent, {"cells": len(doc["cells"]),
                                                         "wall_seconds": doc.get("wall_seconds")})
            partial = None if doc.get("finished") else (f"record is partial ({len(doc['cells'])} cells); "
                                                         f"--resume runs the rest")
            self.tracking.end_run(self.uri, parent, "FINISHED" if not partial else "KILLED", reason=partial)
        print(f"[reproduce] MLflow: {self.uri} (experiment '{self.cfg.mlflow.experiment}', parent run {parent}) "
              f"holds the record's {len(doc['cells'])} cells", flush=True)
        return 0

    def run(self) -> int:
        started = self.started = time.time()
        self.wall_base = self.results.doc.get("wall_seconds") or 0.0 if self.resume else 0.0
        parent = self.parent_run()
        doc = self.results.doc
        self.sync_mlflow(parent)
        self.results.save()
        print(f"[reproduce] MLflow: {self.uri} (experiment '{self.cfg.mlflow.experiment}', parent run {parent}); "
              f"results: {self.results.json_path}", flush=True)
        failed = skipped = ran = 0
        try:
            for model in self.cfg.models:
                ks = self.model_info(model)
                cells = plan_cells(self.cfg, model, ks)
                todo = []
                for c in cells:
                    setting = cell_setting(self.cfg, c)
                    if self.resume and self.results.done(c, setting):
                        skipped += 1
                    else:
                        todo.append((c, setting))
                print(f"[reproduce] {model}: K = {ks}; {len(cells)} cells, {len(cells) - len(todo)} already done",
                      flush=True)
                if not todo:
                    continue
                self.load(model)
                for i, (cell, setting) in enumerate(todo, 1):
                    ok = self.run_cell(cell, setting, parent, f"[{model} {i}/{len(todo)}]")
                    ran += ok
                    failed += not ok
                self.loaded = None
                self._rankings.clear()
        except BaseException as exc:
            self.tick()
            self.results.save()
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.tracking.end_run(self.uri, parent, status, reason=f"{type(exc).__name__}: {exc}")
            raise
        self.tick()
        doc["finished"] = None if failed else _now()
        self.results.save()
        self.tracking.log_metrics(self.uri, parent, {"cells": len(doc["cells"]), "failed_cells": failed,
                                                     "wall_seconds": doc["wall_seconds"]})
        self.tracking.end_run(self.uri, parent, "FAILED" if failed else "FINISHED",
                              reason=f"{failed} cells failed" if failed else None)
        print(f"[reproduce] done: {ran} cells run, {skipped} already done, {failed} failed, "
              f"{time.time() - started:.0f}s; {self.results.json_path} and {self.results.md_path}", flush=True)
        return 1 if failed else 0


def _metric_part(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("mc1", "mc2", "em", "em_lenient") if k in metrics}


def default_out_dir() -> Path:
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # `ray job submit`: the working dir is a temporary copy
        from lofit_ray.tracking import lofit_home

        return lofit_home() / "reproduce"
    return DEFAULT_OUT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (configs/reproduce*.yaml)")
    parser.add_argument("--out-dir", default=None,
                        help=f"where {JSON_NAME} and {MD_NAME} go (default: jobs/results; $LOFIT_HOME/reproduce "
                             f"under `ray job submit`)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (overrides the config and $MLFLOW_TRACKING_URI)")
    parser.add_argument("--resume", action="store_true", help="keep the cells already in <out-dir>/reproduce.json "
                                                              "and run only the missing (or failed) ones")
    parser.add_argument("--overwrite", action="store_true", help="start over even if <out-dir> holds results")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell (default: record "
                                                                 "it, go on, exit 1 at the end)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set seeds=[0] --set tasks.clutrr.limit_train=64")
    parser.add_argument("--render", action="store_true", help="only rewrite reproduce.md from reproduce.json")
    parser.add_argument("--sync-mlflow", action="store_true",
                        help="only log reproduce.json into the MLflow store (a parent run and a run per cell, for "
                             "the cells the store lacks, e.g. on a new machine); runs no cell")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    out_dir = Path(args.out_dir).expanduser().resolve() if args.out_dir else default_out_dir()
    if args.render:
        doc = json.loads((out_dir / JSON_NAME).read_text())
        write_atomic(out_dir / MD_NAME, render_markdown(doc))
        print(out_dir / MD_NAME)
        return 0
    from lofit_ray.models import ModelSpecError
    from lofit_ray.tasks import TaskDataError

    try:
        cfg = load_reproduce_config(args.config, parse_overrides(args.set))
        runner = Runner(cfg, args.config, out_dir, args.tracking_uri, args.resume, args.overwrite, args.fail_fast,
                        overrides=args.set, sync_only=args.sync_mlflow)
        if args.sync_mlflow:
            return runner.sync()
        runner.check_inputs()
    except ConfigError as exc:
        print(f"reproduce: config error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, TaskDataError, ModelSpecError) as exc:
        print(f"reproduce: {exc}", file=sys.stderr)
        return 2
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
