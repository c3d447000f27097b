"""How sure a number is: per-item records, paired bootstrap intervals and p-values.

Every evaluation keeps one row per item (evaluate.evaluate_items). A metric is the mean of
one row column, so its 95% interval is a percentile bootstrap over items; two evaluations of
the same items are compared per item (a paired bootstrap of the per-item difference), which
is far tighter than comparing two unpaired intervals. Resampling is one numpy gather:
10,000 resamples of 400 items take a few tens of milliseconds (jobs/bench_evidence.py).
Needs only numpy: no Ray, no MLflow, no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
#: the per-item columns that are metrics (the mean over items is the metric)
METRIC_COLUMNS = ("mc1", "mc2", "em", "em_lenient", "answer_logprob")


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of the rows of `values` ([n] or [n, m]): [resamples, ...]."""
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(axis=1)


def interval(values, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Mean of per-item `values` with its percentile bootstrap interval: {mean, ci_low, ci_high, n}."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"interval: need a non-empty 1-D list of per-item values (got shape {values.shape})")
    means = _resample_means(values, resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(values.mean()), "ci_low": float(low), "ci_high": float(high), "n": len(values)}


def paired(a, b, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """mean(a) - mean(b) over the same items, its percentile interval, and a two-sided p-value for "no
    difference" (twice the share of resampled differences on the far side of 0; floor 1/(resamples+1)).

    A difference whose interval contains 0 (p >= 1 - confidence) is a tie."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired: both runs must score the same non-empty list of items "
                         f"(got {a.shape} and {b.shape})")
    diffs = _resample_means(a - b, resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    far = int(min(np.sum(diffs <= 0), np.sum(diffs >= 0))) if np.any(diffs != 0) else resamples
    p = min(1.0, 2 * (far + 1) / (resamples + 1))
    return {"diff": float((a - b).mean()), "ci_low": float(low), "ci_high": float(high), "p_value": p,
            "n": len(a)}


def verdict(result: dict, alpha: float = 1 - CONFIDENCE, seeds: tuple[int, int, int] | None = None) -> str:
    """ahead / behind / tie for a paired result (p < alpha decides).

    The items bootstrap holds each method's seeds fixed. With `seeds` (from `seed_counts`), a seed on which the
    order goes the other way makes it a tie: the spread over seeds (a random-heads draw, say) covers the gap."""
    if result["p_value"] >= alpha:
        return "tie"
    if seeds is not None and seeds[2 if result["diff"] > 0 else 0] > 0:
        return "tie"
    return "ahead" if result["diff"] > 0 else "behind"


def seed_counts(a_by_seed: dict, b_by_seed: dict) -> tuple[int, int, int] | None:
    """On how many seeds a is above / equal to / below b (paired by seed), or None below 2 shared seeds."""
    shared = sorted(set(a_by_seed) & set(b_by_seed) - {None})
    if len(shared) < 2:
        return None
    diffs = [a_by_seed[s] - b_by_seed[s] for s in shared]
    return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)


def metric_columns(rows: list[dict]) -> list[str]:
    """The metric columns these per-item rows carry, in METRIC_COLUMNS order."""
    return [c for c in METRIC_COLUMNS if rows and c in rows[0]]


def with_intervals(rows: list[dict], seed: int = 0) -> dict:
    """{metric, metric_ci_low, metric_ci_high} for every metric column of the rows (the MLflow names)."""
    out = {}
    for col in metric_columns(rows):
        ci = interval([r[col] for r in rows], seed=seed)
        out.update({col: ci["mean"], f"{col}_ci_low": ci["ci_low"], f"{col}_ci_high": ci["ci_high"]})
    return out


def aligned(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The two evaluations' rows in the same item order; raises when they did not score the same items."""
    by_id = {r["id"]: r for r in rows_b}
    missing = [r["id"] for r in rows_a if r["id"] not in by_id]
    if missing or len(rows_a) != len(rows_b):
        raise ValueError(f"the two evaluations did not score the same items ({len(rows_a)} vs {len(rows_b)} rows, "
                         f"{len(missing)} ids of the first missing from the second); evaluate both on one split")
    return rows_a, [by_id[r["id"]] for r in rows_a]


def compare_rows(rows_a: list[dict], rows_b: list[dict], seed: int = 0) -> dict:
    """{metric: paired(a, b)} for every metric column both evaluations carry."""
    rows_a, rows_b = aligned(rows_a, rows_b)
    cols = [c for c in metric_columns(rows_a) if c in rows_b[0]]
    return {c: paired([r[c] for r in rows_a], [r[c] for r in rows_b], seed=seed) for c in cols}


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Per-item average over several runs of the same items (e.g. random-heads controls over seeds)."""
    first = runs[0]
    runs = [aligned(first, r)[1] for r in runs]
    return [{"id": row["id"], **{c: float(np.mean([r[i][c] for r in runs])) for c in metric_columns(first)}}
            for i, row in enumerate(first)]


def describe(name: str, ci: dict) -> str:
    """`mc2 0.478 [0.441, 0.515]` (an interval) or `mc2 +0.062 [0.021, 0.104] p=0.004` (a paired difference)."""
    if "diff" in ci:
        return f"{name} {ci['diff']:+.3f} [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}] p={ci['p_value']:.3g}"
    return f"{name} {ci['mean']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line: `lofit-ray eval --out` and the MLflow artifact share this format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    return path


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such per-item record; write one with `lofit-ray eval --out {path}`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or "id" not in rows[0]:
        raise ValueError(f"{path}: not a per-item record (JSONL rows with an 'id' and metric columns)")
    return rows
