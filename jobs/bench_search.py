"""Benchmark the search against the naive pipeline: the same search with the service's levers on and off.

    python jobs/bench_search.py [--config configs/smoke.yaml] [--out jobs/results/bench_search.json]

Both runs use the same config, trials and seeds, each in a fresh local Ray and its own MLflow store.
"on" memoizes phase 1 (precomputed in one Ray Train job), caches DPO reference log-probs, keeps models
loaded in reused trial actors and skips the frozen layers below the lowest head in phase 2; the naive run
("off", search.cost_aware=false plus --naive-set, default phase2.skip_frozen_layers=false) recomputes all
of it in every trial. Packed training batches and the packed MC scorer are in both (they have no switch).
Reported: trials per hour, the split of time (phase 1, phase 2, evaluation, overhead) and whether both
chose the same champion heads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(config: str, cost_aware: bool, extra: list[str]) -> dict:
    """One search in a fresh LOFIT_HOME and local Ray; its wall time and where the time went."""
    home = Path(tempfile.mkdtemp(prefix=f"lofit-bench-{'on' if cost_aware else 'off'}-"))
    summary_path = home / "summary.json"
    env = {**os.environ, "LOFIT_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(REPO / "jobs" / "search.py"), "--config", config, "--summary-out", str(summary_path),
           "--tracking-uri", f"sqlite:///{home}/mlflow.db", "--set", f"search.cost_aware={str(cost_aware).lower()}",
           *extra]
    start = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode:
        raise SystemExit(f"search with cost_aware={cost_aware} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    from lofit_ray import tracking

    out = {"cost_aware": cost_aware, "wall_s": wall, "models": {}}
    for model, m in summary["models"].items():
        trials = [t for t in m["trials"] if t.get("total_s")]
        parts = {k: sum(t.get(k) or 0.0 for t in trials) for k in ("phase1_s", "phase2_s", "eval_s")}
        heads = None
        if m.get("champion_version"):
            uri = summary["tracking_uri"]
            head_set = tracking.load_head_set(uri, m["champion_run_id"])
            heads = [list(h) for h in head_set.top()]
        out["models"][model] = {
            "trials": len(m["trials"]), "trials_finished": sum(1 for t in m["trials"] if t.get("error") is None),
            "champion_heads": heads, "champion_config": next((t["config"] for t in m["trials"]
                                                               if t.get("mlflow_run_id") == m.get("champion_run_id")), None),
            "report": m.get("report", {}).get("champion"), **parts}
    n_trials = sum(v["trials"] for v in out["models"].values())
    accounted = sum(v[k] for v in out["models"].values() for k in ("phase1_s", "phase2_s", "eval_s"))
    precompute = summary.get("precompute_s") or 0.0
    out.update(trials=n_trials, trials_per_hour=3600 * n_trials / wall, precompute_phase1_s=precompute,
               overhead_s=wall - accounted - precompute)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    parser.add_argument("--set", action="append", default=None,
                        help="config overrides for both runs (default: search.controls=0: the random-heads controls "
                             "score the champion after the search and are no trials)")
    parser.add_argument("--naive-set", action="append", default=None,
                        help="overrides for the naive run only (default: phase2.skip_frozen_layers=false)")
    parser.add_argument("--out", default=str(REPO / "jobs" / "results" / "bench_search.json"))
    args = parser.parse_args(argv)
    args.set = args.set if args.set is not None else ["search.controls=0"]
    extra = [a for kv in args.set for a in ("--set", kv)]
    naive = args.naive_set if args.naive_set is not None else ["phase2.skip_frozen_layers=false"]
    on = run(args.config, True, extra)
    off = run(args.config, False, extra + [a for kv in naive for a in ("--set", kv)])
    same = all(on["models"][m]["champion_heads"] == off["models"][m]["champion_heads"] for m in on["models"])
    result = {"config": os.path.relpath(args.config, REPO), "overrides": args.set, "naive_overrides": naive,
              "cost_aware_on": on,
              "cost_aware_off": off, "speedup_trials_per_hour": on["trials_per_hour"] / off["trials_per_hour"],
              "same_champion_heads": same, "machine": f"{os.cpu_count()} CPU cores",
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
