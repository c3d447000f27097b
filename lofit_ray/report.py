"""The search's closing report: the champion on the held-out report split beside the 0-shot model and
random-heads controls, each metric with its 95% interval and each difference paired item by item
(lofit_ray/evidence.py); printed, logged to the parent run as metrics and a bar plot, rows kept as records.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import evidence, tracking
from .adapter import Adapter
from .config import Phase2Config, SearchJobConfig, TrainingConfig
from .evaluate import evaluate_items
from .evidence import METRIC_COLUMNS
from .heads import HeadSet, random_ranking
from .models import spec_slug
from .process_cache import get_model, get_splits, task_spec
from .train import train_offsets


def score_report(cfg: SearchJobConfig, model: str, uri: str, name: str, run_id: str, parent: str) -> dict:
    """Score the champion once on the held-out report split beside the 0-shot model and the random-heads
    controls, every metric with its 95% interval and every difference paired item by item."""
    loaded = get_model(model, cfg.dtype, attn_implementation=cfg.attn_implementation)
    _, splits = get_splits(task_spec(cfg, model))
    slug = spec_slug(model)
    rows = {}
    zero, rows["zero-shot"] = evaluate_items(loaded, splits.report)
    adapter = Adapter.from_pretrained(tracking.download_adapter(f"models:/{name}@{tracking.CHAMPION}", uri))
    offsets = adapter.attach(loaded.model, loaded.fingerprint)
    try:
        champ, rows["champion"] = evaluate_items(loaded, splits.report)
    finally:
        offsets.detach()
    tracking.log_item_rows(uri, run_id, rows["champion"], "report")
    tracking.log_item_rows(uri, parent, rows["zero-shot"], f"report_zero_shot-{slug}")
    controls = [_random_control(cfg, loaded, splits, adapter, seed, uri, parent, run_id)
                for seed in range(cfg.search.controls)]
    if controls:
        rows["random heads"] = evidence.mean_rows(controls)
    columns = evidence.metric_columns(rows["champion"])
    split = cfg.task.report or f"{cfg.task.report_fraction:.0%} of {cfg.task.train}, carved"
    report = {"split": split, "n": champ["n"], "k": len(adapter.config.heads), "controls": len(controls),
              "champion": champ, "zero_shot": zero,
              "intervals": {label: evidence.with_intervals(r) for label, r in rows.items()},
              "vs_zero_shot": evidence.compare_rows(rows["champion"], rows["zero-shot"])}
    if controls:
        report["vs_random"] = evidence.compare_rows(rows["champion"], rows["random heads"])
        report["random_each"] = {c: [float(np.mean([r[c] for r in seed_rows])) for seed_rows in controls]
                                 for c in columns}
        report["random_seed_sd"] = {c: float(np.std(v, ddof=1)) if len(v) > 1 else None
                                    for c, v in report["random_each"].items()}
    tracking.log_metrics(uri, run_id, {f"val_{k}": v for k, v in report["intervals"]["champion"].items()})
    logged = {f"{slug}.val_{k}": v for k, v in report["intervals"]["champion"].items()}
    logged |= {f"{slug}.val_zero_shot_{k}": v for k, v in report["intervals"]["zero-shot"].items()}
    logged |= {f"{slug}.val_random_{k}": v for k, v in report["intervals"].get("random heads", {}).items()}
    for against in ("vs_zero_shot", "vs_random"):
        for col, diff in report.get(against, {}).items():
            logged |= {f"{slug}.{against}_{col}_{part}": diff[part] for part in ("diff", "ci_low", "ci_high", "p_value")}
    tracking.log_metrics(uri, parent, {k: v for k, v in logged.items() if v is not None})
    _log_report_plot(uri, parent, slug, report)
    return report


def _random_control(cfg: SearchJobConfig, loaded, splits, champion: Adapter, seed: int, uri: str, parent: str,
                    key: str) -> list[dict]:
    """Per-item report rows of one random-heads control: `seed`'s random K heads, trained exactly like the
    champion (its K, training and phase-2 settings). A child run of the search keeps them, so --resume
    reuses a finished control."""
    slug, control_key = spec_slug(loaded.spec), f"{key}/random/{seed}"
    done = tracking.finished_child_run(uri, parent, "lofit.control_key", control_key)
    if done:
        return tracking.load_item_rows(uri, f"{done}#report")[0]
    hp = champion.config.hparams
    training, phase2 = TrainingConfig(**hp["training"]), Phase2Config(**hp["phase2"])
    experiment_id = tracking.client(uri).get_run(parent).info.experiment_id
    run_id = tracking.start_run(uri, experiment_id, f"control-random-{slug}-seed{seed}",
                                params={"k": len(champion.config.heads), "seed": seed, "phase2_lr": phase2.lr,
                                        "phase2_epochs": phase2.epochs},
                                tags={tracking.KIND_TAG: "control", "lofit.control_key": control_key,
                                      tracking.MODEL_TAG: loaded.spec, tracking.TASK_TAG: cfg.task.name,
                                      tracking.METHOD_TAG: "random"}, parent_run_id=parent)
    try:
        head_set = HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(loaded.layout),
                           ranking=random_ranking(loaded.layout, seed), k=len(champion.config.heads), method="random",
                           task=cfg.task.name, seed=seed)
        adapter = train_offsets(loaded, head_set, None, splits.train, training, phase2, task=cfg.task.name)
        offsets = adapter.attach(loaded.model, loaded.fingerprint)
        try:
            metrics, rows = evaluate_items(loaded, splits.report)
        finally:
            offsets.detach()
        tracking.log_head_set(uri, run_id, head_set)
        tracking.log_item_rows(uri, run_id, rows, "report")
        tracking.log_metrics(uri, run_id, {f"val_{k}": v for k, v in metrics.items() if k in METRIC_COLUMNS})
        tracking.end_run(uri, run_id)
    except BaseException as exc:
        tracking.end_run(uri, run_id, "FAILED", reason=f"{type(exc).__name__}: {exc}")
        raise
    return rows


def report_text(model: str, name: str, version: str, report: dict) -> str:
    """The search's closing lines for one model: each method with its intervals, then the paired differences."""
    from .evidence import describe, verdict

    def line(label: str, cis: dict) -> str:
        cols = [c for c in METRIC_COLUMNS if c in cis]
        return f"  {label:<14}" + "  ".join(describe(c, {"mean": cis[c], "ci_low": cis[f"{c}_ci_low"],
                                                         "ci_high": cis[f"{c}_ci_high"]}) for c in cols)

    out = [f"[lofit-ray] {model}: champion {name} v{version} (K={report['k']}); report split "
           f"{report['split']}, n={report['n']}, 95% intervals over items (paired bootstrap, 10,000 resamples)"]
    data = report.get("data")
    if data:
        dropped = data.get("dropped_in_report", 0) + data.get("dropped_select_in_report", 0) + \
            data.get("dropped_train_in_select", 0)  # the last two: records written before task.on_overlap
        overlap = " and ".join(f"{data[f'overlap_{s}']} {label}" for s, label in
                               (("select", "selection"), ("report", "report")) if data.get(f"overlap_{s}"))
        overlap = f"; task.on_overlap: drop removed {overlap} items also in an earlier split" if overlap else ""
        out.append(f"  data: {data['n_train']} train / {data['n_select']} selection / {data['n_report']} report; "
                   f"{dropped} rows dropped so that no prompt is in two splits{overlap}; {data['truncated_train']} "
                   f"training examples cut to training.max_length={data['max_length']}")
        if data.get("truncation_warning"):
            out.append(f"  warning: {data['truncation_warning']}")
    labels = {"champion": "champion", "zero-shot": "0-shot", "random heads": "random heads"}
    for key, label in labels.items():
        if key in report["intervals"]:
            out.append(line(label, report["intervals"][key]))
    if report.get("controls"):
        sd = ", ".join(f"{c} {v:.3f}" for c, v in report["random_seed_sd"].items() if v is not None)
        out.append(f"                (random heads: mean of {report['controls']} seeds at K={report['k']}"
                   + (f"; seed-to-seed sd {sd})" if sd else ")"))
    for key, label in (("vs_zero_shot", "champion - 0-shot"), ("vs_random", "champion - random heads")):
        for col, diff in report.get(key, {}).items():
            each = report.get("random_each", {}).get(col, []) if key == "vs_random" else []
            champ = report.get("champion", {}).get(col)  # one run against each control: the seed guard
            seeds = evidence.seed_counts(dict.fromkeys(range(len(each)), champ), dict(enumerate(each))) \
                if each and champ is not None else None
            call = verdict(diff, seeds=seeds)
            if seeds is not None and call != verdict(diff):
                side = "above" if diff["diff"] > 0 else "below"
                call += f" (a control is {side} the champion: the random draws cover the gap)"
            out.append(f"  {label:<24} {describe(col, diff)}  {call}")
    return "\n".join(out)


def _log_report_plot(uri: str, parent: str, slug: str, report: dict) -> None:
    """report/<model>_report.png on the parent run: a bar per method and metric with its 95% interval."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = report["intervals"]
    cols = [c for c in METRIC_COLUMNS if c in intervals["champion"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        labels = [m for m in ("champion", "zero-shot", "random heads") if m in intervals]
        means = [intervals[m][col] for m in labels]
        err = [[mu - intervals[m][f"{col}_ci_low"] for m, mu in zip(labels, means)],
               [intervals[m][f"{col}_ci_high"] - mu for m, mu in zip(labels, means)]]
        ax.bar(labels, means, yerr=err, capsize=4, color=["#4c72b0", "#999999", "#dd8452"][: len(labels)])
        ax.set_title(col)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{slug}: report split {report['split']} (n={report['n']}, K={report['k']}), 95% intervals",
                 fontsize=9)
    fig.tight_layout()
    with tempfile.TemporaryDirectory(prefix="lofit-report-") as tmp:
        path = Path(tmp) / f"{slug}_report.png"
        fig.savefig(path, dpi=110)
        tracking.log_file(uri, parent, path, "report")
    plt.close(fig)
