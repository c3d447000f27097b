"""Reproduce LoFiT's comparison (paper Table 1 and the Figure 2 head-transfer ablation) at small scale.

For every model x task (truthfulqa, mquake, clutrr) x K (fractions of the model's heads) x seed:

    zero_shot       the base model (once per model x task)
    iti             Inference-Time Intervention on the top-K probed heads, alpha chosen on the selection split
    random_heads    phase 2 (offsets) on K seeded random heads
    transfer_heads  phase 2 (offsets) on the top-K heads phase 1 chose for a DIFFERENT task
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

The config is `lofit_ray.config.ReproduceConfig`; the cells, the record and the Runner are in
`lofit_ray.experiments`. This file only parses arguments.
"""
import argparse
import json
import os
import sys
from pathlib import Path

try:  # prefer the installed package; `ray job submit --working-dir .` runs this file from a temporary copy
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.config import ConfigError, ReproduceConfig, load_config, parse_set
from lofit_ray.experiments import JSON_NAME, MD_NAME, Runner, default_out_dir, render_markdown, write_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "reproduce.yaml"
DEFAULT_OUT = REPO / "jobs" / "results"


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
    out_dir = Path(args.out_dir).expanduser().resolve() if args.out_dir else default_out_dir(DEFAULT_OUT)
    if args.render:
        doc = json.loads((out_dir / JSON_NAME).read_text())
        write_atomic(out_dir / MD_NAME, render_markdown(doc, out_dir))
        print(out_dir / MD_NAME)
        return 0
    from lofit_ray.models import ModelSpecError
    from lofit_ray.tasks import TaskDataError

    try:
        cfg = load_config(args.config, parse_set(args.set), schema=ReproduceConfig)
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
