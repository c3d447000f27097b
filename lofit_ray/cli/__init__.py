"""The `lofit-ray` command line: thin wrappers over the core, one sub-command per step.

    lofit-ray prepare-model smollm2-135m
    lofit-ray select  --model smollm2-135m --task truthfulqa --out heads.json [--k 16] [--selector l1|gates|grad|grad_x_act|random]
    lofit-ray train   --model smollm2-135m --task truthfulqa --heads heads.json --k 16 --out adapter/
    lofit-ray eval    --model smollm2-135m --task truthfulqa [--adapter adapter/ | models:/NAME@champion]
    lofit-ray compare A B                            (paired difference of two recorded evaluations)
    lofit-ray export  --model smollm2-135m --adapter adapter/ --out merged/
    lofit-ray search  [--config configs/smoke.yaml] [--set KEY=VALUE] [--resume]   (Ray + MLflow)
    lofit-ray study   --config my_task.yaml          (LoFiT vs random heads, LoRA, ReFT, ITI on your task)
    lofit-ray heads   list | show | compare | promote   (reads MLflow)
    lofit-ray ui                                     (MLflow UI on the default store, 127.0.0.1)
    lofit-ray iti | lora | lora-eval                 (baselines)
    lofit-ray data fetch [--to DIR]                  (the paper's splits of the three tasks; needs a network once)

Modules: common (shared flags, loading, errors), core, baselines, heads, search, study, data. Each imports
only `common`; this file imports them inside `build_parser`, so any one imports alone.
Ray, MLflow and peft are optional: a command that needs a missing one says which extra to install.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import baselines, core, data, heads, search, study

    parser = argparse.ArgumentParser(prog="lofit-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (core, search, study, heads, baselines, data):
        module.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    from ..config import ConfigError
    from .common import MissingExtra, quiet_mlflow

    quiet_mlflow()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except MissingExtra as exc:
        print(f"lofit-ray {args.command} {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError, ConfigError) as exc:
        print(f"lofit-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
