"""The `lofit-ray` command line: thin wrappers over the core, one sub-command per step.

    lofit-ray prepare-model smollm2-135m
    lofit-ray select  --model smollm2-135m --task truthfulqa --out heads.json [--k 16] [--selector l1|gates|grad|grad_x_act|random]
    lofit-ray train   --task truthfulqa --heads heads.json --k 16 --out adapter/
    lofit-ray fit     --model smollm2-135m --task truthfulqa --k 16 --out adapter/     (select + train, no Ray)
    lofit-ray eval    --task truthfulqa [--adapter adapter/ | lora-adapter/ | models:/NAME@champion]
    lofit-ray compare A B                            (paired difference of two recorded evaluations)
    lofit-ray export  --adapter adapter/ --out merged/
    lofit-ray search  [--config configs/smoke.yaml] [--model M] [--task T] [--set KEY=VALUE] [--resume]   (Ray + MLflow)
    lofit-ray study   --config my_task.yaml          (LoFiT vs random heads, LoRA, ReFT, ITI on your task)
    lofit-ray heads   list | show | overlap | promote   (reads MLflow)
    lofit-ray ui                                     (MLflow UI on the default store, 127.0.0.1)
    lofit-ray iti | lora                             (baselines; `eval --adapter` scores their adapters)
    lofit-ray data fetch [--to DIR]                  (the paper's splits of the three tasks; needs a network once)

One grammar: a split is named by its role (--train-split, --eval-split, --select-split); a knob that several
config sections have carries its section, as in search.space (--phase1-lr, --phase2-epochs, --lora-lr); every
other flag is its config field's name. --model defaults to the model a head set or adapter records.
The spellings before this grammar still work for one release, each with a line naming the new one
(old_spellings).

Modules: common (shared flags, loading, errors), core, baselines, head_sets (`heads`), search, study, data. Each imports
only `common`; this file imports them inside `build_parser`, so any one imports alone.
Ray, MLflow and peft are optional: a command that needs a missing one says which extra to install.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import baselines, core, data, head_sets, search, study

    parser = argparse.ArgumentParser(prog="lofit-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (core, search, study, head_sets, baselines, data):
        module.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    from ..config import ConfigError
    from .common import MissingExtra, quiet_mlflow
    from .old_spellings import translate

    quiet_mlflow()
    argv, notes = translate(sys.argv[1:] if argv is None else list(argv))
    for line in notes:
        print(line, file=sys.stderr)
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
