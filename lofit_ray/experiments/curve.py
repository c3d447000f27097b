"""The learning curve: val score against training-set size, per method, read from reproduce records.

Each record (a reproduce run at one `limit_train`) gives one point per method: the mean over its seeds and
the 95% bootstrap interval over items of the seed-averaged per-item scores, the same numbers as the
record's table. Records at different sizes share the selection and report splits (the carve comes before
the limit), so the points differ only in how much the methods trained on.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .record import JSON_NAME, METRIC_LABEL, _seed_rows

COLORS = {"zero_shot": "#888888", "random_heads": "#e08a2c", "transfer_heads": "#b5a03a", "iti": "#8a5bb0",
          "lofit": "#2a6fb0", "lora": "#3a9a52"}


def curve_points(record_dirs: list[Path], task: str, metric: str) -> list[dict]:
    """One point per (record, method, K) of `task`: n_train, mean over seeds, seed sd, interval over items."""
    from ..evidence import interval

    points = []
    for base in record_dirs:
        doc = json.loads((base / JSON_NAME).read_text())
        split = doc.get("splits", {}).get(task)
        if split is None:
            continue
        groups: dict = {}
        for c in doc["cells"]:
            if c["task"] == task:
                groups.setdefault((c["model"], c["method"], c["k"]), []).append(c)
        for (model, method, k), recs in groups.items():
            values = [r["metrics"][metric] for r in recs]
            rows = _seed_rows(recs, base)
            ci = interval([r[metric] for r in rows]) if rows else {"ci_low": None, "ci_high": None}
            points.append({"record": str(base), "model": model, "method": method, "k": k,
                           "n_train": split["n_train"], "n_report": split["n_report"], "seeds": len(recs),
                           "mean": statistics.fmean(values),
                           "seed_sd": statistics.stdev(values) if len(values) > 1 else None,
                           "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                           "trainable_params": recs[0].get("trainable_params")})
    return sorted(points, key=lambda p: (p["model"], p["method"], p["n_train"]))


def plot_curve(points: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Score against training examples (log x): a panel per metric, a line per method with its 95% intervals
    as error bars, 0-shot as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(6.5 * len(points), 4.8), squeeze=False)
    for ax, (metric, pts_all) in zip(axes[0], points.items()):
        lines = sorted({(p["method"], p["k"] or 0) for p in pts_all},
                       key=lambda mk: (list(COLORS).index(mk[0]) if mk[0] in COLORS else 99, mk[1]))
        for i, (method, k) in enumerate(lines):
            pts = sorted((p for p in pts_all if (p["method"], p["k"] or 0) == (method, k)), key=lambda p: p["n_train"])
            if method == "zero_shot":  # no training: one value, drawn across
                ax.axhline(pts[0]["mean"], color=COLORS[method], ls="--", lw=1, label=f"0-shot ({pts[0]['mean']:.3f})")
                continue
            xs = [p["n_train"] * (1 + 0.03 * (i - len(lines) / 2)) for p in pts]  # nudged so bars don't overlap
            err = [[p["mean"] - p["ci_low"] if p["ci_low"] is not None else 0 for p in pts],
                   [p["ci_high"] - p["mean"] if p["ci_high"] is not None else 0 for p in pts]]
            params = pts[0]["trainable_params"]
            label = method + (f" K={k}" if k else "") + (f" ({params:,} params)" if params else "")
            ax.errorbar(xs, [p["mean"] for p in pts], yerr=err, marker="o", capsize=3, color=COLORS.get(method),
                        lw=1.5, label=label)
        sizes = sorted({p["n_train"] for p in pts_all})
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training examples")
        ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)} on the report split (mean over seeds, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
