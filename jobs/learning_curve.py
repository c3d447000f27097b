"""The learning curve: LoFiT, random heads and LoRA trained on 32, 96 and all training examples, each tuned
by the reproduction's search (the same trials for every method), scored on the report split with intervals.

Each size is a reproduce run of its own (record under <out-dir>/n<size>/, resumable); the plot reads every
record and draws val score against training examples, a panel per metric.

    python jobs/learning_curve.py                        # sizes 32 96 all -> jobs/results/learning_curve/
    python jobs/learning_curve.py --sizes 32 all --also jobs/results/reproduce_tuned   # 96 from the main record
    python jobs/learning_curve.py --resume               # after a crash: finished trials and cells stay
    python jobs/learning_curve.py --plot-only            # redraw from the records
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

try:  # prefer the installed package; `ray job submit --working-dir .` runs this file from a temporary copy
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.config import ConfigError, ReproduceConfig, load_config, parse_set
from lofit_ray.experiments import JSON_NAME, Runner, write_atomic
from lofit_ray.experiments.curve import curve_points, plot_curve
from lofit_ray.experiments.record import METRICS

REPO = Path(__file__).resolve().parents[1]


def size_config(cfg: ReproduceConfig, model: str, task: str, methods: list[str], size: int | None) -> ReproduceConfig:
    """The reproduce config of one point: one model, one task, these methods, `size` training examples."""
    task_cfg = dataclasses.replace(cfg.tasks[task], limit_train=size)
    return dataclasses.replace(cfg, name=f"learning-curve-n{size or 'all'}", models=[model], tasks={task: task_cfg},
                               methods=methods, transfer=None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "reproduce.yaml"),
                        help="the reproduce config whose search, spaces and seeds every point uses")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="truthfulqa")
    parser.add_argument("--methods", default="zero_shot,random_heads,lofit,lora")
    parser.add_argument("--sizes", nargs="+", default=["32", "96", "all"], help="training examples per point")
    parser.add_argument("--out-dir", default=str(REPO / "jobs" / "results" / "learning_curve"))
    parser.add_argument("--also", nargs="*", default=[], help="more record dirs to plot (e.g. the main record)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    out = Path(args.out_dir).resolve()
    try:
        cfg = load_config(args.config, parse_set(args.set), schema=ReproduceConfig)
        if args.task not in cfg.tasks:
            raise ConfigError(f"--task {args.task}: not in {args.config}'s tasks ({', '.join(cfg.tasks)})")
        sizes = [None if s == "all" else int(s) for s in args.sizes]
        configs = [size_config(cfg, args.model, args.task, args.methods.split(","), s) for s in sizes]
    except (ConfigError, ValueError) as exc:
        print(f"learning_curve: {exc}", file=sys.stderr)
        return 2
    status = 0
    dirs = []
    for size, point_cfg in zip(args.sizes, configs):
        point_dir = out / f"n{size}"
        dirs.append(point_dir)
        if args.plot_only:
            continue
        runner = Runner(point_cfg, args.config, point_dir, args.tracking_uri, resume=args.resume or
                        (point_dir / JSON_NAME).is_file(), overwrite=False, fail_fast=False, overrides=args.set)
        runner.check_inputs()
        status |= runner.run()
    dirs = [d for d in dirs + [Path(a).resolve() for a in args.also] if (d / JSON_NAME).is_file()]
    kind = "mc" if args.task == "truthfulqa" else "generation"
    methods = args.methods.split(",")  # a record given with --also may hold more methods than the curve draws
    points = {m: [p for p in curve_points(dirs, args.task, m) if p["model"] == args.model and p["method"] in methods]
              for m in METRICS[kind]}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "learning_curve.json", json.dumps({"task": args.task, "model": args.model,
                                                          "records": [str(d) for d in dirs], "points": points},
                                                         indent=1))
    n_seeds = sorted({p["seeds"] for pts in points.values() for p in pts if p["method"] != "zero_shot"})
    png = plot_curve(points, out / "learning_curve.png",
                     f"{args.model} on {args.task}: each method tuned by the same search, "
                     f"{'/'.join(map(str, n_seeds))} seed(s), n={points[METRICS[kind][0]][0]['n_report']} report items")
    print(f"[learning-curve] {png} and {out / 'learning_curve.json'} from {len(dirs)} record(s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
