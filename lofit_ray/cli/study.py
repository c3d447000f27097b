"""`lofit-ray study`: the comparison `jobs/reproduce.py` runs for the paper's tasks, on your task config.

    lofit-ray study --config configs/bbh_sports.yaml                       # LoFiT vs random heads, LoRA, ReFT, ITI
    lofit-ray study --config my_task.yaml --set seeds=[0,1,2] --set search.num_trials=4
    lofit-ray study --config my_task.yaml --resume                         # after a crash: done cells stay

It reads the same YAML as `lofit-ray search` (models, dtype, task, training, phase1, phase2, mlflow) and runs,
for each model: 0-shot, LoFiT, random heads, LoRA, ReFT, and ITI where the task has right and wrong answers
(mc, dpo, truthfulqa), each method tuned by the same search on the selection split (lofit_ray.tuning, the one
`lofit-ray search` runs: its search section's trials, seed, metric and ASHA settings apply here too), then
trained with every seed and scored once on the report split, with paired intervals against LoFiT. The record
goes to --out-dir (reproduce.json and reproduce.md); MLflow gets a parent run and a run per cell. `--set`
overrides any field of the study (lofit_ray.config.ReproduceConfig): seeds, k_fractions, methods, search.*.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, fields
from pathlib import Path

from .common import TRACKING_URI_HELP

STUDY_METHODS = ["zero_shot", "lofit", "random_heads", "lora", "reft"]
STUDY_DEFAULTS = {"seeds": [0, 1, 2], "k_fractions": [0.03]}


def study_config(search_cfg, overrides: dict | None = None):
    """The study (a ReproduceConfig) of a search config: its models, task, training settings and LoFiT search
    space (search.space: l1, phase1_lr, phase2_lr; the baselines keep their own spaces), the methods that apply
    to the task, 3 seeds and K = 3% of the heads; then `overrides` ({"a.b": value})."""
    from ..config import ReproduceConfig, SearchPolicy
    from ..config.loading import _shorthands, apply_overrides, build

    space = search_cfg.search.space  # LoFiT is tuned over the same space as in `lofit-ray search`
    phase2 = {"phase2_lr": asdict(space.phase2_lr)}
    spaces = {"lofit": {"phase1_lr": asdict(space.phase1_lr), "l1": asdict(space.l1), **phase2},
              "random_heads": phase2, "transfer_heads": phase2}
    task = asdict(search_cfg.task)
    name = task.pop("name")
    probes = search_cfg.task.kind in ("mc", "dpo") or (search_cfg.task.kind is None and name == "truthfulqa")
    data = {
        "name": f"study-{name}", "models": list(search_cfg.models), "dtype": search_cfg.dtype,
        "tasks": {name: task}, "methods": STUDY_METHODS + (["iti"] if probes else []), **STUDY_DEFAULTS,
        "training": asdict(search_cfg.training), "phase1": asdict(search_cfg.phase1),
        "phase2": asdict(search_cfg.phase2),
        # the search policy (trials, seed, metric, ASHA) as `lofit-ray search` runs it: one search (lofit_ray.tuning)
        "search": {**{f.name: getattr(search_cfg.search, f.name) for f in fields(SearchPolicy)}, "spaces": spaces},
        "mlflow": {"tracking_uri": search_cfg.mlflow.tracking_uri, "experiment": f"lofit-study-{name}"},
    }
    return build(ReproduceConfig, apply_overrides(data, overrides), "", normalize=_shorthands)


def cmd_study(args) -> int:
    from ..config import ConfigError, load_config, parse_set
    from ..experiments import Runner
    from ..models import ModelSpecError
    from ..paths import lofit_home
    from ..tasks import TaskDataError

    try:
        search_cfg = load_config(args.config)
        cfg = study_config(search_cfg, parse_set(args.set))
        out_dir = Path(args.out_dir or lofit_home() / "studies" / cfg.name).expanduser().resolve()
        runner = Runner(cfg, args.config, out_dir, args.tracking_uri, args.resume, args.overwrite, args.fail_fast,
                        overrides=args.set)
        runner.check_inputs()
    except ConfigError as exc:
        print(f"study: config error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, TaskDataError, ModelSpecError) as exc:
        print(f"study: {exc}", file=sys.stderr)
        return 2
    print(f"[lofit-ray] study '{cfg.name}': {', '.join(cfg.methods)} on {', '.join(cfg.models)}, seeds {cfg.seeds}, "
          f"K = {', '.join(f'{f:.0%}' for f in cfg.k_fractions)} of the heads; record in {out_dir}", flush=True)
    return runner.run()


def add_parsers(sub) -> None:
    p = sub.add_parser("study", help="LoFiT vs random heads, LoRA, ReFT and ITI on your task config, each tuned by "
                                     "the same search, over seeds, with paired intervals",
                       description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the search YAML of your task (models, task, training)")
    p.add_argument("--out-dir", default=None, help="where reproduce.json and reproduce.md go (default "
                                                   "$LOFIT_HOME/studies/study-<task>)")
    p.add_argument("--tracking-uri", default=None, help=f"MLflow URI. {TRACKING_URI_HELP}")
    p.add_argument("--resume", action="store_true", help="keep the cells already recorded, run the rest")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out-dir holds results")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study field (VALUE read as YAML), e.g. --set seeds=[0] --set search.num_trials=2")
    p.set_defaults(func=cmd_study)
