"""Agreement with the paper's own code (issue 27, steps 1-3): run reference/lo-fit's lofit_trainer.py (phase A,
then phase v on its top-K heads) on SmolLM2-135M, replay its exact batches and initial values in lofit-ray,
and compare rankings, step losses, offsets and paired val scores.

    bash scripts/reference_env.sh                       # once: the reference's own virtualenv
    python jobs/agree_reference.py --task truthfulqa    # then --task clutrr; --stage summary to re-summarise

Heavy stages take /tmp/lofit-heavy.lock (COORDINATION.md), in GROUPS of stages per hold; each writes a JSON under
jobs/results/agreement/<task>/ when done; a rerun skips finished stages (delete a JSON to redo it).
Large artifacts (the reference's saved models, traces) go to --work (default ~/.cache/lofit-ray/agreement).
Logic lives in lofit_ray.bench.agreement (conversion, replay, statistics) and agreement_run (the stages).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOCK = "/tmp/lofit-heavy.lock"
STAGES = ("ref_A", "lofit_A", "ref_v", "lofit_v", "eval", "cross", "summary")


_HELD = [0]
# Stages that run under one hold of the lock (each group well under COORDINATION.md's ~15 minutes at this scale):
# waiting for the shared lock between every stage cost more than the stages themselves.
GROUPS = (("ref_A", "lofit_A"), ("ref_v", "lofit_v", "eval"), ("cross",), ("summary",))


@contextlib.contextmanager
def heavy(name: str):
    """The shared heavy-job lock; re-entrant, and a no-op under LOFIT_AGREE_LOCK_HELD=1 (an outer flock holds it)."""
    if _HELD[0] or os.environ.get("LOFIT_AGREE_LOCK_HELD") == "1":
        _HELD[0] += 1
        try:
            yield
        finally:
            _HELD[0] -= 1
        return
    with open(LOCK, "a") as f:
        t = time.time()
        fcntl.flock(f, fcntl.LOCK_EX)
        print(f"[agree] {name}: lock after {time.time() - t:.0f}s", flush=True)
        _HELD[0] += 1
        try:
            yield
        finally:
            _HELD[0] -= 1
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("truthfulqa", "clutrr"), required=True)
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--train-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--val-limit", type=int, default=0, help="0 = the whole val split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference", default=str(ROOT.parent / "shared" / "reference" / "lo-fit"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--venv", default=os.path.expanduser("~/.cache/lofit-ray/reference-venv"))
    p.add_argument("--work", default=os.path.expanduser("~/.cache/lofit-ray/agreement"))
    p.add_argument("--out", default=str(ROOT / "jobs" / "results" / "agreement"))
    args = p.parse_args(argv)

    import torch

    from lofit_ray.bench import agreement as ag, agreement_run

    torch.set_num_threads(args.threads)
    scale = ag.Scale(train_size=args.train_size, epochs=args.epochs, k=args.k, val_limit=args.val_limit,
                     threads=args.threads)
    out = Path(args.out) / args.task
    work = Path(args.work) / args.task
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LOFIT_REFERENCE_CACHE", str(work / "dpo-reference-cache"))
    groups = GROUPS if args.stage == "all" else ((args.stage,),)
    for group in groups:
        todo = [s for s in group if args.stage != "all" or not (out / f"{s}.json").exists()]
        for stage in set(group) - set(todo):
            print(f"[agree] {args.task} {stage}: done ({out / f'{stage}.json'})")
        if not todo:
            continue
        with (heavy(" + ".join(todo)) if todo != ["summary"] else contextlib.nullcontext()):
            for stage in todo:
                path = out / f"{stage}.json"
                print(f"[agree] {args.task} {stage} ...", flush=True)
                result = agreement_run.run_stage(stage, args, scale, out, work, heavy)
                result = {"stage": stage, "task": args.task, "scale": asdict(scale), **result}
                path.write_text(json.dumps(result, indent=1))
                print(f"[agree] {args.task} {stage}: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
