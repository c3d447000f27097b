"""Ray job entry point: search LoFiT hyperparameters and record everything in MLflow.

    python jobs/search.py                                   # embedded default: local Ray, SQLite MLflow,
                                                            # smollm2-135m on TruthfulQA, minutes on 2 cores
    python jobs/search.py --config configs/smoke.yaml
    ray job submit --working-dir . -- python jobs/search.py --config configs/truthfulqa_smollm2.yaml
    python jobs/search.py --config ... --resume             # after a killed driver: finished trials stay done

The summary (champion per model, report-split metrics vs 0-shot, trials) is printed and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:  # prefer the installed package; `ray job submit --working-dir .` runs this file from a temporary copy
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value (e.g. search.num_trials=2), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue a search whose driver was killed")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (overrides the config and $MLFLOW_TRACKING_URI)")
    parser.add_argument("--data-dir", default=None, help="task data folder (overrides task.data_dir and $LOFIT_DATA_DIR)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set search.num_trials=2")
    parser.add_argument("--summary-out", default=None, help="write the summary JSON here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from lofit_ray.config import ConfigError, load_config
    from lofit_ray.models import ModelSpecError
    from lofit_ray.search import run_search
    from lofit_ray.tasks import TaskDataError

    overrides = parse_overrides(args.set)
    if args.tracking_uri:
        overrides["mlflow.tracking_uri"] = args.tracking_uri
    if args.data_dir:
        overrides["task.data_dir"] = str(Path(args.data_dir).resolve())
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"search: config error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_search(cfg, resume=args.resume)
    except (TaskDataError, ModelSpecError) as exc:  # raised by check_inputs, before MLflow or Ray is touched
        print(f"search: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=1, default=str)
    out = Path(args.summary_out) if args.summary_out else Path(summary["tracking_uri"].removeprefix("sqlite:///")).parent / f"{cfg.name}-summary.json" if summary["tracking_uri"].startswith("sqlite:///") else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
    print(f"[lofit-ray] search '{cfg.name}' done in {summary['wall_s']}s; results in MLflow at {summary['tracking_uri']} "
          f"(parent run {summary['parent_run_id']}){'; summary ' + str(out) if out else ''}. "
          f"Browse: lofit-ray ui  |  lofit-ray heads list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
