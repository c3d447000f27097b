"""`lofit-ray search` (and `python jobs/search.py`): search LoFiT hyperparameters with Ray, record in MLflow.

    lofit-ray search                                        # configs/quickstart.yaml: local Ray, SQLite MLflow
    lofit-ray search --config configs/smoke.yaml --set search.num_trials=2
    lofit-ray search --config ... --resume                  # after a killed driver: finished trials stay done

The config is read and checked before Ray or MLflow is imported: a bad field exits 2 with one line
naming it. The summary (champion per model, report-split metrics vs 0-shot, trials) is printed and
written as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import MissingExtra, TRACKING_URI_HELP, quiet_mlflow, require

DEFAULT_CONFIG = "quickstart"  # configs/quickstart.yaml, found in a checkout or an installed wheel (config_file)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file, or the name of a shipped one "
                                                            "(see configs/; default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue a search whose driver was killed")
    p.add_argument("--tracking-uri", default=None, help=f"overrides mlflow.tracking_uri of the config. "
                                                        f"{TRACKING_URI_HELP}")
    p.add_argument("--model", action="append", default=None, metavar="MODEL",
                   help="search this model instead of the config's `models` (repeat for several); any --model of "
                        "the other commands")
    p.add_argument("--task", default=None, help="search this bundled task (truthfulqa, mquake, clutrr) instead of "
                                                "the config's task.name; your own task is a config's task section")
    p.add_argument("--data-dir", default=None, help="task data folder (overrides task.data_dir and $LOFIT_DATA_DIR)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (VALUE read as YAML), e.g. --set search.num_trials=2")
    p.add_argument("--summary-out", default=None, help="write the summary JSON here too")


def _summary_path(args, summary: dict, name: str) -> Path | None:
    """--summary-out, else <name>-summary.json beside a SQLite store, else nowhere."""
    if args.summary_out:
        return Path(args.summary_out)
    uri = summary["tracking_uri"]
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / f"{name}-summary.json"
    return None


def cmd_search(args) -> int:
    from ..config import ConfigError, load_config, parse_set
    from ..models import ModelSpecError
    from ..tasks import TaskDataError

    quiet_mlflow()
    try:
        overrides = parse_set(args.set)
        if args.tracking_uri:
            overrides["mlflow.tracking_uri"] = args.tracking_uri
        if args.model:
            overrides["models"] = list(args.model)
        if args.task:
            overrides["task.name"] = args.task
        if args.data_dir:
            overrides["task.data_dir"] = str(Path(args.data_dir).resolve())
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"search: config error: {exc}", file=sys.stderr)
        return 2
    try:
        require("ray", "service")
        require("mlflow", "service")
    except MissingExtra as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 2
    from ..service import run_search_job
    from ..tracking import StoreError

    try:
        summary = run_search_job(cfg, resume=args.resume)
    except (TaskDataError, ModelSpecError, ConfigError, StoreError) as exc:  # inputs, the Ray plan, MLflow access
        print(f"search: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=1, default=str)
    out = _summary_path(args, summary, cfg.name)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(end_of_search(summary) if out else text)
    print(f"[lofit-ray] search '{cfg.name}' done in {summary['wall_s']}s; results in MLflow at {summary['tracking_uri']} "
          f"(parent run {summary['parent_run_id']}){'; summary ' + str(out) if out else ''}. "
          f"Browse: lofit-ray ui  |  lofit-ray heads list")
    return 0


def end_of_search(summary: dict) -> str:
    """What a person reads when the search ends: per model its trials, then the champion's report
    (the full summary is in the JSON file)."""
    lines = []
    for model, result in summary["models"].items():
        champion = result.get("champion_run_id")
        lines.append(f"\n{model}: {len(result['trials'])} trials, selection metric {result['metric']}")
        lines.append(f"  {'trial':<10}{'K':>4}{'phase2_lr':>11}{'epochs':>8}{'sel_metric':>12}")
        for t in sorted(result["trials"], key=lambda t: -(t["sel_metric"] if t["sel_metric"] is not None else -1e9)):
            mark = "  <- champion" if champion and t["mlflow_run_id"] == champion else (
                "  failed" if t["error"] else "")
            sel = f"{t['sel_metric']:.4f}" if t["sel_metric"] is not None else "-"
            lines.append(f"  {str(t['trial_id']):<10}{int(t['config']['k']):>4}{t['config']['phase2_lr']:>11.3g}"
                         f"{t['epochs'] or '-':>8}{sel:>12}{mark}")
        lines.append(result.get("report_text") or f"  {result.get('error', 'no report')}")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    p = sub.add_parser("search", help="Ray Tune + Optuna search over K, L1 and learning rates, recorded in MLflow "
                                      "(same as python jobs/search.py)", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_search)


def main(argv=None) -> int:
    """`python jobs/search.py ...`: the same as `lofit-ray search ...`."""
    parser = argparse.ArgumentParser(prog="search", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return cmd_search(parser.parse_args(argv))
