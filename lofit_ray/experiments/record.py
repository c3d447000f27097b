"""The record of a reproduce run: reproduce.json (every cell, rewritten after each) and the reproduce.md table.

The record is the source of truth (committed with its phase-1 rankings); the table and any MLflow
store are rebuilt from it. `render_markdown` also reads records written before the config had
its phase1/phase2/grid sections (their `config.lofit`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path

from .cells import METHODS

JSON_NAME = "reproduce.json"
MD_NAME = "reproduce.md"
ITEMS_DIR = "items"  # per-cell report rows, beside the record
METRICS = {"mc": ("mc1", "mc2"), "generation": ("em", "em_lenient")}
METRIC_LABEL = {"mc1": "MC1", "mc2": "MC2", "em": "EM", "em_lenient": "EM (lenient)"}
BASELINES = ("zero_shot", "iti", "random_heads", "transfer_heads", "lora", "reft")
TIE = 1e-9  # selection scores closer than this are a tie: the first value in grid order wins


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def hardware(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def metric_part(metrics: dict) -> dict:
    """The scores of an evaluation, without its n and seconds."""
    return {k: metrics[k] for k in ("mc1", "mc2", "em", "em_lenient") if k in metrics}


class Results:
    """reproduce.json (the record) and reproduce.md (the table), rewritten after every cell."""

    def __init__(self, out_dir: Path, doc: dict):
        self.out_dir = out_dir
        self.doc = doc

    @property
    def json_path(self) -> Path:
        return self.out_dir / JSON_NAME

    @property
    def md_path(self) -> Path:
        return self.out_dir / MD_NAME

    def done(self, cell: dict, setting: str) -> bool:
        return any(c["id"] == cell["id"] and c.get("setting") == setting for c in self.doc["cells"])

    def add(self, record: dict) -> None:
        self.doc["cells"] = [c for c in self.doc["cells"] if c["id"] != record["id"]] + [record]
        self.doc["failed"] = [f for f in self.doc.get("failed", []) if f["id"] != record["id"]]
        self.save()

    def fail(self, cell: dict, error: str) -> None:
        self.doc["failed"] = [f for f in self.doc.get("failed", []) if f["id"] != cell["id"]]
        self.doc["failed"].append({**cell, "error": error, "at": now()})
        self.save()

    def save_rows(self, cell_id: str, rows: list[dict]) -> str:
        """A cell's per-item report scores (id + metric columns: small enough to commit with the record)
        under items/; returns the path relative to the record, which the tables pair item by item."""
        from ..evidence import metric_columns, write_rows

        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell_id) + ".jsonl"
        cols = metric_columns(rows)
        write_rows(self.out_dir / ITEMS_DIR / name, [{"id": r["id"], **{c: r[c] for c in cols}} for r in rows])
        return f"{ITEMS_DIR}/{name}"

    def save(self) -> None:
        self.doc["updated"] = now()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.json_path, json.dumps(self.doc, indent=1, default=str))
        write_atomic(self.md_path, render_markdown(self.doc, self.out_dir))


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def _num(n) -> str:
    return "-" if n is None else f"{int(n):,}"


def _chosen(records: list[dict]) -> str:
    """The hyperparameters the cells trained with (one search serves every seed, so usually one setting)."""
    shown = []
    for r in records:
        text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in r.get("hparams", {}).items() if isinstance(v, (int, float)))
        if text not in shown:
            shown.append(text)
    return "; ".join(t for t in shown if t) or "-"


def _paired_vs(recs: list[dict], refs_by_k: dict, base: Path | None, name: str) -> str:
    """This method minus a reference method (LoFiT, random heads) at the same K (every K for methods without
    one), paired over items; "-" for the reference itself."""
    from ..evidence import compare_rows

    if not refs_by_k or any(recs[0]["method"] == r[0]["method"] for r in refs_by_k.values()):
        return "-"
    mine = _seed_rows(recs, base)
    parts = []
    for k, ref_recs in sorted(refs_by_k.items()):
        if recs[0]["k"] is not None and k != recs[0]["k"]:
            continue
        theirs = _seed_rows(ref_recs, base)
        if not (mine and theirs):
            continue
        paired = compare_rows(mine, theirs)[name]
        parts.append(("" if recs[0]["k"] is not None else f"K={k}: ")
                     + f"{paired['diff']:+.3f} (p={paired['p_value']:.2g})")
    return "; ".join(parts) or "-"


def _lofit_settings(cfg: dict) -> dict:
    """Phase 1/2 settings of a record's config, in the `lofit:` names older records hold them under."""
    if "lofit" in cfg:
        return cfg["lofit"]
    p1, p2, grid = cfg.get("phase1", {}), cfg.get("phase2", {}), cfg.get("grid", {})
    return {"phase1_epochs": p1.get("epochs"), "phase1_lr": p1.get("lr"), "l1": p1.get("l1"),
            "phase2_epochs": p2.get("epochs"), "phase2_lr": grid.get("phase2_lr"),
            "phase2_lr_choice": grid.get("phase2_lr_choice")}


def _space_text(name: str, space: dict) -> str:
    if space.get("values") is not None:
        return f"{name} in {{{', '.join(f'{v:g}' for v in space['values'])}}}"
    return f"{name} {space['low']:g}-{space['high']:g}{' (log)' if space.get('log') else ''}"


def _seed_rows(recs: list[dict], base: Path | None) -> list[dict] | None:
    """The cells' per-item report rows averaged over their seeds, or None when any cell has none on disk."""
    from ..evidence import mean_rows, read_rows

    if base is None or not all(r.get("items") and (base / r["items"]).is_file() for r in recs):
        return None
    return mean_rows([read_rows(base / r["items"]) for r in recs])


def _fmt_ci(values: list[float], rows: list[dict] | None, name: str) -> str:
    """mean ± std over seeds, then the 95% interval over items of the seed-averaged scores."""
    from ..evidence import interval

    text = _fmt(values)
    if rows:
        ci = interval([r[name] for r in rows])
        text += f" [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
    return text


def render_markdown(doc: dict, base: Path | None = None) -> str:
    """The results table: one section per task, a row per model x method x K, mean ± std over seeds and,
    where the cells' per-item rows are under `base`, the 95% interval over items."""
    cfg = doc.get("config", {})
    hw = doc.get("hardware", {})
    lines = [f"# LoFiT reproduction: {doc.get('name', 'reproduce')}", ""]
    status = ("finished" if doc.get("finished") else
              f"incomplete: {len(doc['failed'])} failed cells" if doc.get("failed") else "in progress (partial results)")
    lines.append(f"- Date: started {doc.get('started')}, last update {doc.get('updated')}; {status}"
                 + (f", {doc['wall_seconds']:.0f} s in all" if doc.get("wall_seconds") else ""))
    device = hw.get("device", "cpu")
    where = f"GPU {hw['gpu']}" if hw.get("gpu") else f"CPU only ({hw.get('cpu', '?')})"
    lines.append(f"- Hardware: {where}; {hw.get('cpu_count')} CPU cores, torch threads {hw.get('torch_threads')}, "
                 f"device {device}, dtype {cfg.get('dtype')}; torch {hw.get('torch')}, "
                 f"transformers {hw.get('transformers', '?')}, Python {hw.get('python')}")
    runs = [" ".join(f"--set {o}" for o in inv["set"]) or "(no overrides)" for inv in doc.get("invocations", [])]
    if len(runs) > 1:
        lines.append(f"- Built over {len(runs)} invocations (--resume): " + "; ".join(f"`{r}`" for r in runs))
    lines.append(f"- Config: `{doc.get('config_path')}`; MLflow {doc.get('tracking_uri')} (experiment "
                 f"'{doc.get('experiment')}', parent run {doc.get('parent_run_id')})")
    for model, info in doc.get("models", {}).items():
        lay = info["layout"]
        lines.append(f"- {model}: {lay['num_layers']} layers x {lay['num_heads']} heads = {info['total_heads']} heads "
                     f"(head_dim {lay['head_dim']}); K = {', '.join(map(str, info['k_values']))} "
                     f"(fractions {', '.join(f'{f:g}' for f in info['k_fractions'])}, rounded, at least 1)")
    lines.append("- Carve (selection split) and report split per task:")
    for task, s in doc.get("splits", {}).items():
        carve = s["carve"]
        if carve.get("fraction") == 0:
            sel = "no selection split (nothing is searched)"
        elif "fraction" in carve:
            sel = (f"selection = a {carve['fraction']:.0%} carve of '{carve['from']}' (carve_seed {carve['seed']}), "
                   f"n={s['n_select']}")
        else:
            sel = f"selection = '{carve.get('select')}', n={s['n_select']}"
        lines.append(f"  - {task}: train n={s['n_train']} (rest of '{s['train']}'"
                     f"{', limit ' + str(s['limit_train']) if s.get('limit_train') else ''}); {sel}; "
                     f"report = {s['report'] if 'carve of' in str(s['report']) else repr(s['report'])}, "
                     f"n={s['n_report']}")
    seeds = sorted({c["seed"] for c in doc.get("cells", []) if c.get("seed") is not None}) or cfg.get("seeds", [])
    searched = "search" in cfg  # records before the per-method searches chose from fixed grids
    lines.append(f"- Seeds {', '.join(map(str, seeds))}: ± is the sample std over seeds (no ± with one seed); "
                 f"[low, high] is the 95% bootstrap interval over items (10,000 resamples) of the seed-averaged "
                 f"per-item scores, where the record has them. Each cell is scored once on the report split.")
    if searched and cfg["search"]["num_trials"] == 0:
        p1, p2 = cfg["phase1"], cfg["phase2"]

        def optimizer(p):
            return (f"lr {p.get('lr_schedule', 'constant')}"
                    + (f", gradient norm clipped at {p['max_grad_norm']:g}" if p.get("max_grad_norm") else ""))
        lines.append(f"- No search (search.num_trials: 0): every method trains at the config's values, once per seed. "
                     f"LoFiT phase 1: {p1['epochs']} epochs, lr {p1['lr']:g}, L1 {p1['l1']:g}, {optimizer(p1)}; "
                     f"phase 2 (also random_heads and transfer_heads): {p2['epochs']} epochs, lr {p2['lr']:g}, "
                     f"{optimizer(p2)}.")
    elif searched:
        sc = cfg["search"]
        spaces = "; ".join(f"{m}: " + ", ".join(_space_text(n, v) for n, v in space.items())
                           + (" (+ epochs)" if m != "iti" else "")
                           for m, space in sc["spaces"].items() if m in cfg.get("methods", []))
        lines.append(f"- Every method is tuned by the same search: per model x task x method x K, "
                     f"{sc['num_trials']} trials of Optuna TPE (seed {sc['seed']}) with ASHA "
                     f"({'reduction factor ' + str(sc['reduction_factor']) if sc['asha'] else 'off'}) on the "
                     f"selection split, by the selection metric '{sc['metric']}' (auto: MC2, or the reference "
                     f"answer's log-prob per token on generation tasks). The best setting is then trained once per "
                     f"seed. Spaces: {spaces}. Epochs: a trial trains up to {cfg['phase2']['epochs']} epochs "
                     f"(LoRA {cfg['lora']['epochs']}) and its best epoch on the selection split is its count.")
        lines.append("- 'vs LoFiT' and 'vs random heads' are this method minus LoFiT (minus random heads) at the "
                     "same K (zero-shot, LoRA and ReFT: at each K), paired item by item over the seed-averaged report "
                     "scores, with the p-value of no difference. gates_heads, grad_heads and grad_x_act_heads are "
                     "LoFiT's phase 2 on the heads of the other selectors (lofit_ray/selectors.py). "
                     "'search s' is the method's whole search (phase 1 included); 's / seed' trains the chosen "
                     "setting once and scores the report split.")
    else:
        lo = _lofit_settings(cfg)
        lines.append(f"- LoFiT: phase 1 {lo.get('phase1_epochs')} epochs, lr {lo.get('phase1_lr')}, L1 {lo.get('l1')}; "
                     f"phase 2 {lo.get('phase2_epochs')} epochs, lr from {lo.get('phase2_lr')} (also for random_heads "
                     f"and transfer_heads); fixed grids, not a search (this record predates the per-method searches).")
    if doc.get("transfer"):
        lines.append("- transfer_heads uses the phase-1 heads of another task: "
                     + ", ".join(f"{t} <- {s}" for t, s in doc["transfer"].items()))
    lines.append("- Trainable parameters: LoFiT / random / transfer = K x head_dim offsets (phase 1 also trains "
                 "layers x heads x head_dim scales, given in brackets); ITI = K x head_dim offsets set in closed "
                 "form (no gradient training); LoRA = peft's trainable count; ReFT = LoReFT's R, W and b (2 x rank x "
                 "hidden + rank) on one layer.")
    if doc.get("failed"):
        lines.append(f"- FAILED cells ({len(doc['failed'])}; rerun with --resume): "
                     + "; ".join(f"{f['id']}: {f['error'][:120]}" for f in doc["failed"]))
    lines.append("")

    cells = doc.get("cells", [])
    order = {m: i for i, m in enumerate(METHODS)}
    for task in doc.get("task_order") or sorted({c["task"] for c in cells}):
        rows = [c for c in cells if c["task"] == task]
        if not rows:
            continue
        names = METRICS["mc" if "mc1" in rows[0]["metrics"] else "generation"]
        split = doc.get("splits", {}).get(task, {}).get("report", "?")
        lines.append(f"## {task} (report split '{split}')")
        lines.append("")
        lines.append("| model | method | K | " + " | ".join(METRIC_LABEL[n] for n in names)
                     + f" | vs LoFiT ({METRIC_LABEL[names[0]]}) | vs random heads | n | seeds | trainable params "
                       "| search s | s / seed | chosen |")
        lines.append("|" + "---|" * (len(names) + 11))
        groups: dict = {}
        for c in rows:
            groups.setdefault((c["model"], c["method"], c["k"]), []).append(c)
        model_order = {m: i for i, m in enumerate(doc.get("models", {}))}
        for (model, method, k), recs in sorted(groups.items(), key=lambda kv: (
                model_order.get(kv[0][0], 99), order.get(kv[0][1], 99), kv[0][2] or 0)):
            recs = sorted(recs, key=lambda r: (r["seed"] is None, r["seed"]))
            item_rows = _seed_rows(recs, base)
            vals = [_fmt_ci([r["metrics"][n] for r in recs], item_rows, n) for n in names]
            params = _num(recs[0].get("trainable_params"))
            if recs[0].get("phase1_params"):
                params += f" [{_num(recs[0]['phase1_params'])}]"
            if method == "iti":
                params += " (closed form)"
            ns = sorted({r["n"] for r in recs})
            seeds_txt = ", ".join(str(r["seed"]) for r in recs) if recs[0]["seed"] is not None else "-"
            wall = sum(r["wall_seconds"] for r in recs) / len(recs)
            search_s = recs[0].get("search_seconds")
            lofit_by_k = {key[2]: g for key, g in groups.items() if key[:2] == (model, "lofit")}
            random_by_k = {key[2]: g for key, g in groups.items() if key[:2] == (model, "random_heads")}
            lines.append(f"| {model} | {method} | {'-' if k is None else k} | " + " | ".join(vals)
                         + f" | {_paired_vs(recs, lofit_by_k, base, names[0])}"
                         + f" | {_paired_vs(recs, random_by_k, base, names[0])}"
                         + f" | {'/'.join(map(str, ns))} | {seeds_txt} | {params} | "
                         + ("-" if search_s is None else f"{search_s:.0f}") + f" | {wall:.1f} | {_chosen(recs)} |")
        lines.append("")
    lines.extend(render_comparisons(cells, list(doc.get("models", {})), doc.get("task_order") or [], base))
    lines.extend(render_selectors(cells))
    lines.extend(render_searches(doc.get("searches", {})))
    return "\n".join(lines) + "\n"


# The methods whose heads come from a selector (lofit_ray/selectors.py), in the order the selectors section lists
# them; random heads are the chance level of the Jaccard column.
SELECTOR_METHODS = {"lofit": "l1", "gates_heads": "gates", "grad_heads": "grad", "grad_x_act_heads": "grad_x_act",
                    "random_heads": "random"}
BASELINE_SELECTORS = {"lofit", "random_heads"}  # the section needs another selector to compare with these


def render_selectors(cells: list[dict]) -> list[str]:
    """Per model x task x K, what each selector's ranking cost and how far its top K is from l1's (LoFiT's):
    the ranking's seconds (mean over seeds), that over l1's, the Jaccard overlap of the heads each seed's cell
    trained, and the layers those heads sit in (where a selector looks is often what it gets wrong). Only
    records with a selector besides l1 and random get this section."""
    if not any(c["method"] in SELECTOR_METHODS and c["method"] not in BASELINE_SELECTORS for c in cells):
        return []
    lines = ["## Selectors (phase 1)", "",
             "Each selector ranks every head once per seed on the training split (lofit_ray/selectors.py); phase 2 "
             "then trains the top K exactly as for LoFiT. 'x l1' is the ranking's time over l1's on the same "
             "data and seed; Jaccard compares the K heads with l1's, seed by seed (random heads give its chance "
             "level); layers are those of the K heads over all seeds: lowest-highest (median).", "",
             "| model | task | K | selector | seeds | ranking s | x l1 | Jaccard vs l1 | layers |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for c in cells:
        if c["method"] in SELECTOR_METHODS and c.get("heads"):
            groups.setdefault((c["model"], c["task"], c["k"]), {}).setdefault(c["method"], {})[c["seed"]] = c
    for (model, task, k), by_method in groups.items():
        if set(by_method) <= BASELINE_SELECTORS:
            continue  # no other selector ran on this task
        l1 = by_method.get("lofit", {})
        for method in SELECTOR_METHODS:
            recs = by_method.get(method)
            if not recs:
                continue
            seconds = [c["phase1_seconds"] for c in recs.values() if c.get("phase1_seconds") is not None]
            mean_s = statistics.fmean(seconds) if seconds else None
            ratios = [c["phase1_seconds"] / l1[seed]["phase1_seconds"] for seed, c in recs.items()
                      if c.get("phase1_seconds") is not None and l1.get(seed, {}).get("phase1_seconds")]
            ratio = f"{statistics.fmean(ratios):.3f}" if ratios else "-"  # seed by seed, as the header says
            overlaps = []
            for seed, c in recs.items():
                if seed in l1:
                    mine, theirs = {tuple(h) for h in c["heads"]}, {tuple(h) for h in l1[seed]["heads"]}
                    overlaps.append(len(mine & theirs) / len(mine | theirs))
            layers = sorted(h[0] for c in recs.values() for h in c["heads"])
            lines.append(f"| {model} | {task} | {k} | {SELECTOR_METHODS[method]} | {len(recs)} | "
                         + ("-" if mean_s is None else f"{mean_s:.1f}") + f" | {ratio} | "
                         + (f"{statistics.fmean(overlaps):.2f}" if overlaps else "-")
                         + f" | {layers[0]}-{layers[-1]} ({statistics.median(layers):g}) |")
    lines.append("")
    return lines


def render_searches(searches: dict) -> list[str]:
    """One row per search: how its trials ended, the best selection score and the setting the cells train."""
    if not searches:
        return []
    lines = ["## Searches (selection split)", "",
             "| search | n select | trials complete / pruned / failed | best selection score | chosen | search s |",
             "|---|---|---|---|---|---|"]
    for sid, found in searches.items():
        states = [t["state"] for t in found["trials"]]
        counts = " / ".join(str(states.count(x)) for x in ("complete", "pruned", "fail"))
        lines.append(f"| {sid.replace('|', ' ')} | {found.get('n_select', '-')} | {counts} | {found['score']:.4f} | "
                     f"{_chosen([{'hparams': found['chosen']}])} | {found['seconds']:.0f} |")
    lines.append("")
    return lines


def render_comparisons(cells: list[dict], models: list[str], tasks: list[str], base: Path | None = None) -> list[str]:
    """LoFiT minus each baseline, per model x task x K (means over seeds), and how often LoFiT is ahead.

    Computed from the cells so the claims in prose can be checked against the record. The tally uses the
    first metric (MC1 on TruthfulQA, strict EM on the generation tasks); zero-shot, LoRA and ReFT have no K, so
    their one value is compared with LoFiT at every K. Where both methods' per-item rows are under `base`,
    the difference is paired item by item (seed-averaged rows) and ahead / tied / behind is p < 0.05 with no
    seed going the other way (`evidence.verdict`); otherwise a difference counts as ahead or behind whatever
    its size.
    """
    from ..evidence import compare_rows, seed_counts, verdict

    def group(model, task, method, k) -> list[dict]:
        return [c for c in cells if (c["model"], c["task"], c["method"]) == (model, task, method)
                and (method in ("zero_shot", "lora", "reft") or c["k"] == k)]

    def mean_of(recs) -> dict:
        return {"seeds": len(recs), **{m: statistics.fmean(r["metrics"][m] for r in recs) for m in recs[0]["metrics"]}}

    baselines = [b for b in BASELINES if any(c["method"] == b for c in cells)]
    rows, tally, paired_all = [], {b: [0, 0, 0] for b in baselines}, True  # ahead, tied, behind
    for model in models:
        for task in tasks:
            for k in sorted({c["k"] for c in cells if (c["model"], c["task"], c["method"]) == (model, task, "lofit")}):
                lofit_recs = group(model, task, "lofit", k)
                lofit, lofit_rows = mean_of(lofit_recs), _seed_rows(lofit_recs, base)
                names = METRICS["mc" if "mc1" in lofit else "generation"][:2 if "mc1" in lofit else 1]
                cols = []
                for b in baselines:
                    recs = group(model, task, b, k)
                    if not recs:
                        cols.append("-")
                        continue
                    other, other_rows = mean_of(recs), _seed_rows(recs, base)
                    deltas = [lofit[n] - other[n] for n in names]
                    if lofit_rows and other_rows:
                        paired = compare_rows(lofit_rows, other_rows)
                        seeds = seed_counts({r["seed"]: r["metrics"][names[0]] for r in lofit_recs},
                                            {r["seed"]: r["metrics"][names[0]] for r in recs})
                        texts = [f"{paired[n]['diff']:+.3f} (p={paired[n]['p_value']:.2g}" for n in names]
                        texts[0] += "" if seeds is None else "; seeds {}/{}/{}".format(*seeds)
                        cols.append(" / ".join(t + ")" for t in texts))
                        tally[b][("ahead", "tie", "behind").index(verdict(paired[names[0]], seeds=seeds))] += 1
                    else:
                        paired_all = False
                        cols.append(" / ".join(f"{d:+.3f}" for d in deltas))
                        tally[b][0 if deltas[0] > TIE else 1 if deltas[0] >= -TIE else 2] += 1
                value = " / ".join(f"{lofit[n]:.3f}" for n in names)
                rows.append(f"| {model} | {task} | {k} | {value} ({lofit['seeds']} seed{'s' * (lofit['seeds'] > 1)}) | "
                            + " | ".join(cols) + " |")
    if not rows:
        return []
    how = ("paired item by item over the seed-averaged report scores, with the p-value of no difference (paired "
           "bootstrap, 10,000 resamples); seeds a/t/b counts the seeds on which LoFiT is above / equal to / below "
           "the baseline on the first metric (paired by seed number); ahead / behind means p < 0.05 with no seed "
           "going the other way, anything else is a tie" if paired_all else
           "At n = 82-100 one standard error of a single MC1 or EM is about 0.05, so gaps under that are noise; "
           "this record has no per-item rows, so the tally counts any nonzero gap")
    lines = ["## LoFiT minus each baseline", "",
             f"Means over the seeds each method has; MC1 / MC2 on multiple-choice tasks (TruthfulQA), strict EM on "
             f"generation tasks (MQuAKE, CLUTRR); {how}.",
             "", "| model | task | K | LoFiT | vs " + " | vs ".join(baselines) + " |", "|" + "---|" * (4 + len(baselines))]
    lines += rows
    lines.append("")
    total = len(rows)
    lines.append(f"On the first metric, over {total} model x task x K comparisons, LoFiT is ahead / tied / behind: "
                 + "; ".join(f"{b} {a} / {t} / {bh}" for b, (a, t, bh) in tally.items()) + ".")
    lines.append("")
    return lines
