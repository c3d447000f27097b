"""What every `lofit-ray` sub-command shares: model/task flags, config-dataclass flags, loading, errors.

Nothing here imports Ray, MLflow or peft (`require` does, when a command needs one), and nothing
imports `lofit_ray.cli` itself: the sub-command modules import from here, never from each other or
from the package.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import types
import typing
from pathlib import Path

from ..config import ConfigError, TaskConfig, TrainingConfig
from ..config.fields import ATTN_HELP, ATTN_IMPLEMENTATIONS
from ..evidence import METRIC_COLUMNS

SCORE_KEYS = METRIC_COLUMNS  # the metrics a summary line shows


class MissingExtra(ImportError):
    """An optional dependency of one sub-command is not installed; `main` prints one line and exits 2."""

    def __init__(self, module: str, extra: str):
        self.module, self.extra = module, extra
        super().__init__(f"needs {module}: pip install 'lofit-ray[{extra}]'")


def require(module: str, extra: str):
    """Import an optional dependency, or raise MissingExtra naming the pip extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(module, extra) from exc


def quiet_mlflow() -> None:
    """No telemetry, no artifact progress bars (set before MLflow is imported; the user's values win)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


TRACKING_URI_HELP = ("MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///$LOFIT_HOME/mlflow.db; "
                     "LOFIT_HOME defaults to ~/.lofit-ray)")


# -- flags from config dataclasses -----------------------------------------------------------------

# Knobs that several sections have carry their section in the flag, as in search.space (phase1_lr, phase2_lr):
# --phase1-lr, --phase2-epochs, --lora-lr, --phase1-lr-schedule, --lora-max-grad-norm. Every other flag is its
# field's own name (--l1, --selector, --k).
SECTIONED = ("lr", "epochs", "lr_schedule", "max_grad_norm")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(cls, name: str) -> str:
    """The parsed-argument name of field `name` of config `cls`: phase1_lr for Phase1Config.lr, else the name."""
    section = getattr(cls, "SECTION", None)
    return f"{section}_{name}" if name in SECTIONED and section else name


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _scalar(hint):
    """int/float/str (None for a list or anything else), unwrapping `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return hint if hint in (int, float, str) else None


def add_config_flags(parser: argparse.ArgumentParser, cls, fields: tuple[str, ...] | None = None) -> None:
    """One flag per field of config dataclass `cls` (or of `fields`): --field-name, its metadata help,
    its dataclass default. Lists take space- or comma-separated values; booleans --x / --no-x."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{getattr(cls, 'SECTION', cls.__name__)} ({cls.__name__})")
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        hint, default, dest = hints[f.name], _default(f), _dest(cls, f.name)
        text = f.metadata.get("help", "").replace("%", "%%")
        if hint is bool:
            group.add_argument(_flag(dest), dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{text} (default: {'on' if default else 'off'})")
        elif typing.get_origin(hint) is list:
            group.add_argument(_flag(dest), dest=dest, nargs="+", default=default, metavar="VALUE",
                               help=f"{text}; space- or comma-separated (default: {_show(default)})")
        else:
            group.add_argument(_flag(dest), dest=dest, type=_scalar(hint) or str, default=default,
                               help=f"{text} (default: {_show(default)})")


def config_from_args(cls, args: argparse.Namespace, fields: tuple[str, ...] | None = None):
    """Build `cls` back from the parsed flags (fields not on the command line keep their defaults).

    Errors are ConfigError naming the flag and the config field, e.g. "--phase1-lr (phase1.lr): ...".
    """
    hints = typing.get_type_hints(cls)
    section = getattr(cls, "SECTION", None)
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = _dest(cls, f.name)
        if (fields is not None and f.name not in fields) or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if typing.get_origin(hint := hints[f.name]) is list and isinstance(value, list):
            item = typing.get_args(hint)[0]
            parts = [p for v in value for p in str(v).replace(" ", "").split(",") if p]
            try:
                value = [item(p) for p in parts] if item in (int, float) else parts
            except ValueError:
                raise ConfigError(f"{_flag(dest)} {' '.join(map(str, getattr(args, dest)))!r}: give "
                                  f"{item.__name__} values, e.g. {_show(_default(f))}") from None
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        text = str(exc)
        for name in kwargs:
            prefix = f"{section}.{name}:" if section else f"{name}:"
            if text.startswith(prefix):
                text = f"{_flag(_dest(cls, name))} ({prefix[:-1]}):{text[len(prefix):]}"
                break
        raise ConfigError(text) from None


def field_help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name).replace("%", "%%")


def field_default(cls, name: str):
    return _default(next(f for f in dataclasses.fields(cls) if f.name == name))


# -- model and task ----------------------------------------------------------------------------------

DEFAULT_MODEL = "smollm2-135m"


def add_model_args(p: argparse.ArgumentParser, default_from_adapter: bool = False) -> None:
    p.add_argument("--model", default=None,
                   help="bundled name (smollm2-135m, gemma3-270m), local checkpoint dir, .gguf file, Hugging Face "
                        "hub id (owner/name or owner/name@revision: downloaded once into the HF cache; "
                        "HF_HUB_OFFLINE=1 reads only the cache), or tiny-<family> (default: "
                        + ("the base model the adapter records" if default_from_adapter else DEFAULT_MODEL) + ")")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="float32 on CPU; bfloat16 on GPU")
    p.add_argument("--attn-implementation", default="auto", choices=ATTN_IMPLEMENTATIONS,
                   help=ATTN_HELP.replace("%", "%%"))
    p.add_argument("--device", default="cpu")


# The splits a command reads, by role; every command names a split by what it does with it.
SPLIT_HELP = {
    "train": "split name or file to train on (default: train)",
    "select": "split name or file a setting is chosen on, e.g. ITI's alpha (default: val)",
    "eval": "split name or file to score (default: val)",
}


def add_task_args(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    p.add_argument("--task", default=field_default(TaskConfig, "name"),
                   help=field_help(TaskConfig, "name") + "; or a search YAML whose task section describes your own task")
    p.add_argument("--data-dir", default=None, help=field_help(TaskConfig, "data_dir"))
    p.add_argument("--source", default=None, help=field_help(TaskConfig, "source"))
    for role in splits:
        p.add_argument(f"--{role}-split", default=None, help=SPLIT_HELP[role])
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples of each split")


def add_eval_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=field_default(TrainingConfig, "batch_size"),
                   help="items scored per forward pass (default: %(default)s)")


def add_allow_base_mismatch(p: argparse.ArgumentParser) -> None:
    """For commands that apply an adapter to --model: an adapter trained on other weights is an error."""
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="apply the adapter even though --model's weights differ from those it was trained on "
                        "(fingerprints differ); default: exit 2 naming both models")


def add_model_command(sub, name: str, help: str, func, splits: tuple[str, ...] = (), configs: tuple = (),
                      default_from_adapter: bool = False) -> argparse.ArgumentParser:
    """A sub-command on one model: --model/--dtype/--device, the task flags and one --ROLE-split per role in
    `splits` (none: no task), and the flags of each config dataclass in `configs`."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    add_model_args(p, default_from_adapter)
    if splits:
        add_task_args(p, splits)
    for cls in configs:
        add_config_flags(p, cls)
    return p


def task_from_args(args, train: str | None = None, eval: str | None = None):
    """The task of --task; a jsonl task reads its training and/or evaluation file from `train` / `eval`."""
    from ..tasks import get_task, make_task

    if args.task.endswith((".yaml", ".yml")):  # your own task: the task section of a search config
        from ..config import load_config

        return make_task(load_config(args.task).task, model=getattr(args, "model", None))
    if args.task == "jsonl":
        return get_task("jsonl", train_path=train, eval_path=eval)
    return get_task(args.task, data_dir=args.data_dir, source=args.source)


def load(args, base_model: str | None = None):
    """The model of --model; without it, `base_model` (the one an adapter records), else the default."""
    from ..models import load_model

    args.model = args.model or base_model or DEFAULT_MODEL
    return load_model(args.model, dtype=args.dtype, device=args.device,
                      attn_implementation=getattr(args, "attn_implementation", "auto"))


def check_k(k: int | None) -> None:
    """--k counts heads: reject K < 1 before any model is loaded."""
    if k is not None and k < 1:
        raise ValueError(f"--k {k}: K counts heads, so it must be at least 1 (about 3-10% of the model's heads)")


def resolve_adapter(ref: str):
    """A local adapter directory, or an MLflow registry URI such as models:/NAME@champion."""
    from ..adapter import Adapter

    if ref.startswith(("models:/", "runs:/")):
        require("mlflow", "service")
        from ..tracking import download_adapter

        return Adapter.from_pretrained(download_adapter(ref))
    return Adapter.from_pretrained(ref)


# -- output --------------------------------------------------------------------------------------------

def format_scores(metrics: dict | None) -> str:
    if not metrics:
        return ""
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k in SCORE_KEYS)


def format_intervals(metrics: dict) -> str:
    """`mc1 0.171 [0.098, 0.256] mc2 ...`: each score with its interval when the metrics carry one."""
    parts = []
    for k in SCORE_KEYS:
        if k in metrics:
            ci = f" [{metrics[k + '_ci_low']:.3f}, {metrics[k + '_ci_high']:.3f}]" if k + "_ci_low" in metrics else ""
            parts.append(f"{k} {metrics[k]:.3f}{ci}")
    return " ".join(parts)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))
