"""`lofit-ray heads ...`: read head sets and adapters recorded in MLflow.

    lofit-ray heads list     [--model M] [--task T]          runs with a head set, metrics, versions, champion
    lofit-ray heads show     REF [--k K] [--limit N]          ranked heads, top K marked, per-layer histogram
    lofit-ray heads overlap  REF REF [REF ...] [--k K]        overlap, Jaccard, per-layer histograms
    lofit-ray heads promote  NAME VERSION                     move alias @champion

REF is a run id, runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION or a local head set JSON.
Every sub-command takes --tracking-uri (default $MLFLOW_TRACKING_URI, else sqlite:///$LOFIT_HOME/mlflow.db
with LOFIT_HOME defaulting to ~/.lofit-ray) and --experiment. MLflow is optional (`pip install
'lofit-ray[service]'`): it is imported only when a heads command runs. The text formatting of these
listings lives here, not in `lofit_ray.tracking`.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from .common import TRACKING_URI_HELP, require


def _tracking():
    """lofit_ray.tracking, or MissingExtra (one line, exit 2) when MLflow is not installed."""
    require("mlflow", "service")
    from .. import tracking

    return tracking


def _table(headers: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> str:
    """Plain aligned text; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _bar(count: int, scale: float = 1.0) -> str:
    return "#" * int(round(count * scale))


def format_metric(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


# -- list --------------------------------------------------------------------------------------

def cmd_list(args) -> None:
    tracking = _tracking()
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    rows = tracking.list_head_sets(uri, args.experiment, args.model, args.task)
    if not rows:
        where = f" in experiment {args.experiment!r}" if args.experiment else ""
        which = " ".join(f"{k}={v}" for k, v in (("model", args.model), ("task", args.task)) if v)
        raise ValueError(f"no head sets recorded at {uri}{where}{' for ' + which if which else ''}; run "
                         f"`lofit-ray search` first, or point --tracking-uri/--experiment at the store it used")
    rankings = [r for r in rows if r["kind"] == "phase1" or r["k"] is None]
    adapters = [r for r in rows if r not in rankings]
    present = {k for r in adapters for k in r["metrics"]}
    metric_cols = [m for m in tracking.MAIN_METRICS if m in present]
    hparams = [h for h in tracking.HPARAM_COLUMNS if any(h in r["params"] for r in adapters)]
    headers = ["RUN", "VERSION", "KIND", "MODEL", "TASK", "METHOD", "K", *hparams, *metric_cols, "STATUS", "CHAMPION"]
    table, champions, versions = [], [], 0
    for r in adapters:
        regs = r["registered"]
        versions += len(regs)
        version = ", ".join(f"{v['name']}/{v['version']}" for v in regs) or "-"
        champ = [f"{v['name']}/{v['version']}" for v in regs if "champion" in v["aliases"]]
        champions += champ
        table.append([r["run_id"], version, r["kind"] or "-", r["model"] or "-", r["task"] or "-", r["method"] or "-",
                      r["k"] if r["k"] is not None else "-", *[_short(r["params"].get(h)) for h in hparams],
                      *[format_metric(r["metrics"].get(m)) for m in metric_cols], r["status"], "*" if champ else ""])
    if table:
        first_number = 6
        print(_table(headers, table, right=list(range(first_number, first_number + 1 + len(hparams) + len(metric_cols)))))
        if metric_cols and any(m.startswith("val_") for m in metric_cols):
            print("(val_* is scored once, on the report split, for the champion and the controls only; trials are "
                  "ranked by sel_metric on the selection split)")
    if rankings:
        print("\nphase-1 rankings (every head ranked; trials take their top K from one of these):")
        print(_table(["RUN", "MODEL", "TASK", "SELECTOR", "L1", "LR", "EPOCHS", "STATUS"],
                     [[r["run_id"], r["model"] or "-", r["task"] or "-",
                       r["params"].get("phase1.selector") or r["method"] or "-",
                       *[_short(r["params"].get(f"phase1.{p}")) for p in ("l1", "lr", "epochs")], r["status"]]
                      for r in rankings], right=[4, 5, 6]))
    experiments = sorted({r["experiment"] for r in rows})
    print(f"{len(adapters)} head set{'s' * (len(adapters) != 1)} and {len(rankings)} ranking"
          f"{'s' * (len(rankings) != 1)} in {len(experiments)} experiment{'s' * (len(experiments) != 1)} "
          f"({', '.join(experiments)}), {versions} registered version{'s' * (versions != 1)}; champion: "
          f"{', '.join(champions) or 'none'}")


def _short(value) -> str:
    """A param as the table shows it: numbers to 3 significant digits."""
    if value is None:
        return "-"
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return str(value)


# -- show --------------------------------------------------------------------------------------

def _describe(head_set, k: int) -> str:
    L, H = head_set.layout["num_layers"], head_set.layout["num_heads"]
    return (f"model {head_set.model} (fingerprint {head_set.fingerprint}), task {head_set.task or '-'}, "
            f"method {head_set.method}, training seed {head_set.seed}, K={k} of {L * H} heads "
            f"({L} layers x {H} heads)")


def _histogram(counts_by_set: dict[str, list[int]]) -> str:
    """Per-layer counts; one bar column when there is a single set, a count column per set otherwise."""
    names = list(counts_by_set)
    layers = len(next(iter(counts_by_set.values())))
    if len(names) == 1:
        counts = counts_by_set[names[0]]
        peak = max(counts) or 1
        scale = min(1.0, 40 / peak)
        rows = [[f"L{l}", counts[l], _bar(counts[l], scale)] for l in range(layers)]
        return _table(["LAYER", "COUNT", ""], rows, right=[1])
    rows = [[f"L{l}", *[counts_by_set[n][l] for n in names]] for l in range(layers)]
    return _table(["LAYER", *names], rows, right=list(range(1, len(names) + 1)))


def _k(head_set, k: int | None, ref: str) -> int:
    """--k, else the head set's own K (a ranking from `lofit-ray select` without --k has none)."""
    if k is None and head_set.k is None:
        raise ValueError(f"{ref} is a ranking without K; pass --k to take its top K heads")
    return k if k is not None else head_set.k


def cmd_show(args) -> None:
    from ..heads import per_layer_counts

    tracking = _tracking()
    head_set = tracking.load_head_set(tracking.resolve_tracking_uri(args.tracking_uri), args.ref)
    k = _k(head_set, args.k, args.ref)
    top = head_set.top(k)  # validates K
    limit = args.limit if args.limit is not None else max(2 * k, 10)
    ranking = head_set.ranking if limit <= 0 else head_set.ranking[:limit]
    print(f"head set {args.ref}: {_describe(head_set, k)}")
    rows = [[rank, int(l), int(h), f"{float(s):.4f}", "*" if rank <= k else ""]
            for rank, (l, h, s) in enumerate(ranking, 1)]
    print(_table(["RANK", "LAYER", "HEAD", "SCORE", "TOP"], rows, right=[0, 1, 2, 3]))
    if len(ranking) < len(head_set.ranking):
        print(f"... {len(head_set.ranking) - len(ranking)} more (--limit 0 shows all)")
    counts = per_layer_counts(head_set, k)
    print(f"per-layer count of the top {k}:")
    print(_histogram({"top": counts}))
    layers = sorted({l for l, _ in top})
    busiest = max(range(len(counts)), key=lambda l: counts[l])
    print(f"top {k} heads span {len(layers)} layer{'s' * (len(layers) != 1)} (L{layers[0]}-L{layers[-1]}); "
          f"most in L{busiest} ({counts[busiest]}); best L{top[0][0]}H{top[0][1]}")


# -- overlap -----------------------------------------------------------------------------------

def _labels(refs: Sequence[str]) -> list[str]:
    labels = []
    for ref in refs:
        label = ref
        if len(ref) == 32 and ref.isalnum():
            label = ref[:8]
        elif ref.startswith("runs:/"):
            label = ref[len("runs:/"):].split("/")[0][:8]
        elif ref.startswith("models:/"):
            label = ref[len("models:/"):]
        elif ref.endswith(".json"):
            label = ref.rsplit("/", 1)[-1][:-5]
        base, n = label, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def cmd_overlap(args) -> None:
    from ..heads import compare

    if len(args.refs) < 2:
        raise ValueError("overlap needs at least two head sets: lofit-ray heads overlap REF REF [REF ...]")
    tracking = _tracking()
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    labels = _labels(args.refs)
    sets = {label: tracking.load_head_set(uri, ref) for label, ref in zip(labels, args.refs)}
    shapes = {label: (s.layout["num_layers"], s.layout["num_heads"]) for label, s in sets.items()}
    if len(set(shapes.values())) > 1:
        described = "; ".join(f"{label} ({sets[label].model}) has {L} layers x {H} heads"
                              for label, (L, H) in shapes.items())
        raise ValueError(f"cannot compare head sets of different shapes: {described}. Only sets from models "
                         f"with equal layers x heads compare; pick refs of one model (see `lofit-ray heads list`)")
    ks = {label: _k(sets[label], args.k, ref) for label, ref in zip(labels, args.refs)}
    for label, ref in zip(labels, args.refs):
        s = sets[label]
        print(f"{label}: {ref} -> {_describe(s, ks[label])}")
    models = sorted({s.model for s in sets.values()})
    if len(models) > 1:
        print(f"note: different models of equal shape ({', '.join(models)}): layer/head indices are compared as is")
    result = compare(sets, args.k)
    rows = [[p["a"], p["b"], p["overlap"], f"{p['jaccard']:.3f}"] for p in result["pairs"]]
    print(_table(["A", "B", "OVERLAP", "JACCARD"], rows, right=[2, 3]))
    print("per-layer count of each set's top K:")
    print(_histogram(result["per_layer"]))
    shared = set.intersection(*(set(s.top(args.k)) for s in sets.values()))
    print(f"in every set: {', '.join(f'L{l}H{h}' for l, h in sorted(shared)) or 'none'}")
    jac = [p["jaccard"] for p in result["pairs"]]
    print(f"{len(sets)} head sets, K={'/'.join(map(str, sorted(set(ks.values()))))}: mean Jaccard {sum(jac) / len(jac):.3f} "
          f"(min {min(jac):.3f}, max {max(jac):.3f}) over {len(jac)} pair{'s' * (len(jac) != 1)}, "
          f"{len(shared)} head{'s' * (len(shared) != 1)} shared by all")


# -- promote -----------------------------------------------------------------------------------

def cmd_promote(args) -> None:
    tracking = _tracking()
    done = tracking.promote(tracking.resolve_tracking_uri(args.tracking_uri), args.name, args.version)
    name, old, new = done["name"], done["old_version"], done["version"]
    metrics = " ".join(f"{k}={format_metric(v)}" for k, v in sorted(done["metrics"].items()))
    print(f"old champion: {f'{name}/{old}' if old else 'none'}")
    print(f"new champion: {name}/{new} (run {done['run_id'] or '-'}{', ' + metrics if metrics else ''})")
    if old == new:
        print(f"{name}@champion already pointed at version {old}; nothing changed")
    else:
        print(f"promoted {name}/{new} to @champion (was {old or 'unset'}); serve it as models:/{name}@champion")


def add_parsers(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    common.add_argument("--experiment", default=None, help="MLflow experiment name that `list` searches (default: all); "
                             "refs to show/overlap/promote are global")

    p = subparsers.add_parser("heads", help="list, show and overlap head sets recorded in MLflow; promote a champion",
                              description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="heads_command", required=True)

    q = sub.add_parser("list", parents=[common], help="runs with a head set: model, task, K, metrics, versions")
    q.add_argument("--model", default=None, help="only this model spec (tag lofit.model)")
    q.add_argument("--task", default=None, help="only this task (tag lofit.task)")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("show", parents=[common], help="one head set: ranked heads, top K, per-layer histogram")
    q.add_argument("ref", help="run id, runs:/ID, models:/NAME@ALIAS, models:/NAME/VERSION or a head set JSON")
    q.add_argument("--k", type=int, default=None, help="mark the top K (default: the set's own K)")
    q.add_argument("--limit", type=int, default=None, help="rows of the ranking to print (default 2K; 0: all)")
    q.set_defaults(func=cmd_show)

    q = sub.add_parser("overlap", parents=[common], help="overlap and Jaccard of the top K between head sets "
                                                        "(`lofit-ray compare` compares two evaluations)")
    q.add_argument("refs", nargs="+", metavar="REF", help="two or more refs (as for show)")
    q.add_argument("--k", type=int, default=None, help="compare the top K of every set (default: each set's K)")
    q.set_defaults(func=cmd_overlap)

    q = sub.add_parser("promote", parents=[common], help="point alias @champion of a registered adapter at VERSION")
    q.add_argument("name", help="registered model name, e.g. lofit-smollm2-135m-truthfulqa")
    q.add_argument("version", help="version number to promote")
    q.set_defaults(func=cmd_promote)
