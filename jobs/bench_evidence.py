"""Benchmark the paired bootstrap behind every interval: 10,000 resamples of n items, best of 5.

    python jobs/bench_evidence.py [--out jobs/results/bench_evidence.json]

The goal (issue 12): 10k resamples of 400 items well under a second, so every metric and every
difference the service prints can carry its interval at no noticeable cost.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from lofit_ray import evidence


def timed(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_evidence.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (82, 400, 1000):
        a, b = rng.random(n), rng.random(n)
        rows.append({"items": n, "resamples": evidence.RESAMPLES,
                     "interval_s": round(timed(lambda: evidence.interval(a)), 4),
                     "paired_s": round(timed(lambda: evidence.paired(a, b)), 4)})
        print(f"n={n}: interval {rows[-1]['interval_s'] * 1000:.0f} ms, paired {rows[-1]['paired_s'] * 1000:.0f} ms "
              f"({evidence.RESAMPLES} resamples, best of 5)", flush=True)
    doc = {"benchmark": "bench_evidence", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                       "numpy": np.__version__},
           "goal": "10k resamples of 400 items well under 1 s", "results": rows,
           "goal_met": next(r for r in rows if r["items"] == 400)["paired_s"] < 0.5}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
