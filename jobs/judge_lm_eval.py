"""lm-evaluation-harness as an outside judge of one adapter: export the merged checkpoint, score it with lm-eval's
own HF model class on the shipped lofit_truthfulqa_* tasks, score the adapter with `lofit-ray eval` on the same
items, and write both side by side (JSON in jobs/results/).

    python jobs/judge_lm_eval.py --model smollm2-135m --adapter models:/lofit-smollm2-135m-truthfulqa@champion
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

try:  # prefer the installed package
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "lofit_ray" / "lm_eval_tasks"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="adapter directory or models:/NAME@ALIAS")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=str(REPO / "jobs" / "results" / "judge_lm_eval.json"))
    args = p.parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    work = Path(tempfile.mkdtemp(prefix="lofit-judge-"))
    limit = ["--limit", str(args.limit)] if args.limit else []
    start = time.time()
    if cli(["export", "--model", args.model, "--adapter", args.adapter, "--out", str(work / "merged")]) != 0:
        return 1
    if cli(["eval", "--model", args.model, "--task", "truthfulqa", "--eval-split", args.split, "--adapter", args.adapter,
            "--out", str(work / "ours.json"), *limit]) != 0:
        return 1
    ours = json.loads((work / "ours.json").read_text())
    ours_s = time.time() - start
    metadata = {"split": args.split, **({"limit": args.limit} if args.limit else {})}
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(work / "merged"), "dtype": "float32"},
                                  tasks=["lofit_truthfulqa_mc1", "lofit_truthfulqa_mc2"], device="cpu", batch_size=8,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), metadata=metadata),
                                  bootstrap_iters=0)
    theirs = {m: out["results"][f"lofit_truthfulqa_{m}"]["acc,none"] for m in ("mc1", "mc2")}
    result = {"model": args.model, "adapter": args.adapter, "split": args.split,
              "n": len(out["samples"]["lofit_truthfulqa_mc2"]), "lofit_ray_eval": {m: ours[m] for m in ("mc1", "mc2")},
              "lm_eval": theirs, "abs_diff": {m: abs(theirs[m] - ours[m]) for m in ("mc1", "mc2")},
              "lm_eval_version": lm_eval.__version__, "export_and_eval_s": round(ours_s, 1),
              "lm_eval_s": round(time.time() - start - ours_s, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
