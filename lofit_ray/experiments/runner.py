"""The Runner: plans a reproduce job's cells, runs those the record lacks, and keeps the record and MLflow current.

Cells run one after another in this process (torch only). Each method is a `run_<method>` returning the
cell's metrics, trainable parameters and chosen hyperparameters; `run_cell` turns that into a record and a
nested MLflow run. Phase 1 runs once per (model, task, seed), is saved under <out-dir>/heads/ with its
`train.phase1_key`, and serves every K and the transfer_heads cells of other tasks. MLflow is reached only
through `lofit_ray.tracking`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path

import torch

from .. import faults, tracking
from ..baselines import lora
from ..baselines.iti import fit_iti
from ..config import ReproduceConfig
from ..evaluate import evaluate_items, selection_score
from ..evidence import with_intervals
from ..heads import HeadSet, random_ranking
from ..models import check_spec, load_model, spec_slug
from ..splits import build_splits
from ..tasks import get_task
from ..train import NaNLossError, phase1_key, select_heads, train_offsets
from .cells import cell_setting, k_values, plan_cells
from .record import CHOSEN, JSON_NAME, TIE, Results, hardware, metric_part, now, write_atomic

HEADS_DIR = "heads"  # <out-dir>/heads/: phase-1 rankings, reused by --resume


def default_out_dir(local: Path) -> Path:
    """`local` (e.g. the job's jobs/results), except under `ray job submit`, whose working directory is a
    temporary copy: there $LOFIT_HOME/reproduce."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return tracking.lofit_home() / "reproduce"
    return local


def cell_run_name(cell: dict) -> str:
    return f"{cell['method']}-{spec_slug(cell['model'])}-{cell['task']}" + (
        f"-k{cell['k']}" if cell["k"] is not None else "") + (f"-s{cell['seed']}" if cell["seed"] is not None else "")


def cell_params(cell: dict, report_split: str, n_train, n_select, dtype: str, device: str) -> dict:
    return {"model": cell["model"], "task": cell["task"], "method": cell["method"],
            "k": "-" if cell["k"] is None else cell["k"], "seed": "-" if cell["seed"] is None else cell["seed"],
            "report_split": report_split, "n_train": n_train, "n_select": n_select, "dtype": dtype, "device": device}


def cell_tags(cell: dict) -> dict:
    return {tracking.MODEL_TAG: cell["model"], tracking.TASK_TAG: cell["task"], tracking.METHOD_TAG: cell["method"],
            "lofit.kind": "reproduce-cell", "lofit.cell": cell["id"]}


def cell_metrics(record: dict) -> dict:
    """What a cell's MLflow run logs as metrics, from its record (the live run and the backfill agree)."""
    logged = {**record["metrics"], "n": record["n"], "eval_seconds": record["eval_seconds"],
              "trainable_parameters": record["trainable_params"], "wall_seconds": record["wall_seconds"]}
    if record.get("phase1_seconds") is not None:
        logged["phase1_seconds"] = record["phase1_seconds"]
    chosen = [g for g in record.get("selection", []) if "score" in g and all(
        g.get(k) == v for k, v in record["hparams"].items() if k in CHOSEN)]
    if chosen:
        logged["sel_score"] = chosen[0]["score"]
    return logged


class Runner:
    def __init__(self, cfg: ReproduceConfig, config_path: str, out_dir: Path, tracking_uri: str | None,
                 resume: bool, overwrite: bool, fail_fast: bool, overrides: list[str] | None = None,
                 sync_only: bool = False):
        self.cfg, self.out_dir, self.resume, self.fail_fast = cfg, out_dir, resume, fail_fast
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        existing = out_dir / JSON_NAME
        doc = None
        if sync_only and not existing.is_file():
            raise FileNotFoundError(f"--sync-mlflow needs a record: {existing} does not exist; pass the --out-dir "
                                    f"that holds {JSON_NAME}")
        if existing.is_file():
            old = json.loads(existing.read_text())
            if resume or sync_only:
                doc = old
            elif old.get("cells") and not overwrite:
                raise FileExistsError(f"{existing} already holds {len(old['cells'])} cells; pass --resume to "
                                      f"continue it, --overwrite to start over, or a different --out-dir")
        # resolved by run(): no MLflow store is touched before the inputs check out
        self.uri, self.experiment_id = tracking_uri or cfg.mlflow.tracking_uri, None
        if doc is None:
            doc = {"name": cfg.name, "started": now(), "cells": [], "failed": [], "models": {}, "splits": {},
                   "phase1": {}}
        if not sync_only:  # --sync-mlflow logs the record as it stands: no new invocation, nothing to run
            doc.update(config_path=str(config_path), config=dataclasses.asdict(cfg), task_order=list(cfg.tasks),
                       hardware=hardware(self.device), experiment=cfg.mlflow.experiment, finished=None,
                       transfer=({t: cfg.transfer_source(t) for t in cfg.tasks} if "transfer_heads" in cfg.methods
                                 else doc.get("transfer", {})))  # a run without transfer cells keeps the record's
            # `config` is the latest invocation's; this list says how the record was built up across --resume runs
            doc.setdefault("invocations", []).append({"at": now(), "config": str(config_path),
                                                      "set": list(overrides or []), "resume": resume})
        self.results = Results(out_dir, doc)
        self._splits: dict = {}
        self._rankings: dict = {}
        self.loaded = None

    # -- helpers ---------------------------------------------------------------------------------
    def splits(self, task_name: str):
        if task_name not in self._splits:
            t = self.cfg.tasks[task_name]
            task = get_task(task_name, data_dir=t.data_dir or self.cfg.data_dir)
            s = build_splits(task, train=t.train, report=t.report, select=t.select, select_fraction=t.select_fraction,
                             carve_seed=t.carve_seed, limit_train=t.limit_train, limit_select=t.limit_select,
                             limit_report=t.limit_report)
            self._splits[task_name] = (task, s)
            self.results.doc["splits"][task_name] = {
                "train": t.train, "report": t.report, "carve": s.carve, "limit_train": t.limit_train,
                "n_train": len(s.train), "n_select": len(s.select), "n_report": len(s.report),
                "train_hash": s.train_hash(), "objective": task.objective, "eval_kind": task.eval_kind}
        return self._splits[task_name]

    def training(self, seed: int):
        """The shared training settings with the cell's seed."""
        return dataclasses.replace(self.cfg.training, seed=seed)

    def score(self, items, adapter=None, rows: bool = False) -> dict:
        """Metrics of `items` (with `adapter` attached); rows=True adds the per-item rows under "rows"."""
        offsets = adapter.attach(self.loaded.model) if adapter is not None else None
        try:
            metrics, item_rows = evaluate_items(self.loaded, items, batch_size=self.cfg.eval_batch_size)
            return {**metrics, "rows": item_rows} if rows else metrics
        finally:
            if offsets is not None:
                offsets.detach()

    def ranking_path(self, model: str, task_name: str, seed: int) -> Path:
        return self.out_dir / HEADS_DIR / f"{spec_slug(model)}__{task_name}__seed{seed}.json"

    def ranking(self, task_name: str, seed: int):
        """Phase 1 for (model, task, seed): computed once, saved under <out-dir>/heads/ (reused by --resume)."""
        loaded = self.loaded
        key = (loaded.spec, task_name, seed)
        if key in self._rankings:
            return self._rankings[key]
        _, s = self.splits(task_name)
        training, phase1 = self.training(seed), self.cfg.phase1
        memo = phase1_key(loaded.fingerprint, s.train_hash(), task_name, training, phase1)
        path = self.ranking_path(loaded.spec, task_name, seed)
        entry = None
        if self.resume and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == memo:
                entry = {**saved, "head_set": HeadSet(**saved["head_set"]), "reused": True}
        if entry is None:
            start = time.time()
            print(f"[reproduce] phase 1: {loaded.spec} / {task_name} / seed {seed} "
                  f"({len(s.train)} examples, {phase1.epochs} epochs)", flush=True)
            head_set = select_heads(loaded, s.train, training, phase1, task=task_name)
            entry = {"key": memo, "seconds": round(time.time() - start, 2), "head_set": head_set,
                     "final_loss": head_set.hparams.get("final_loss"), "reused": False}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**entry, "head_set": json.loads(head_set.to_json())}, indent=1))
        self.results.doc["phase1"][f"{loaded.spec}|{task_name}|seed={seed}"] = {
            k: entry[k] for k in ("key", "seconds", "final_loss")} | {"file": str(path)}
        self._rankings[key] = entry
        return entry

    def _tune_grid(self, cell: dict, head_set: HeadSet):
        """Phase 2 on head_set's top K for each lr of grid.phase2_lr; the best on the selection split is scored.
        With grid.phase2_lr_choice=per_task, a model x task's first phase-2 cell chooses and the rest reuse it."""
        task_name, k = cell["task"], cell["k"]
        _, s = self.splits(task_name)
        grid_cfg, phase2 = self.cfg.grid, self.cfg.phase2
        per_task = grid_cfg.phase2_lr_choice == "per_task"
        choices = self.results.doc.setdefault("phase2_lr_chosen", {}) if per_task else {}
        key = f"{self.loaded.spec}|{task_name}"
        prior = choices.get(key)
        if prior is not None and prior.get("grid_values") != list(grid_cfg.phase2_lr):
            prior = None  # chosen from a different grid: choose again
        lrs = [prior["phase2_lr"]] if prior else grid_cfg.phase2_lr
        grid, best = [], None
        for lr in lrs:
            try:
                adapter = train_offsets(self.loaded, head_set, k, s.train, self.training(cell["seed"]),
                                       dataclasses.replace(phase2, lr=lr), task=task_name)
            except NaNLossError as exc:
                grid.append({"phase2_lr": lr, "error": str(exc)})
                continue
            entry = {"phase2_lr": lr, "final_loss": adapter.config.hparams.get("final_loss")}
            if len(lrs) > 1:
                sel = self.score(s.select, adapter)
                entry.update(score=selection_score(sel), **metric_part(sel))
            grid.append(entry)
            if best is None or entry.get("score", 0) > best[0].get("score", 0) + TIE:
                best = (entry, adapter)
        if best is None:
            raise RuntimeError(f"phase 2 diverged for every lr in grid.phase2_lr={grid_cfg.phase2_lr}; lower them")
        entry, adapter = best
        if per_task and prior is None:
            choices[key] = {"phase2_lr": entry["phase2_lr"], "by": cell["id"], "grid_values": list(grid_cfg.phase2_lr),
                            "grid": grid}
        report = self.score(s.report, adapter, rows=True)
        hparams = {"phase2_lr": entry["phase2_lr"], "phase2_epochs": phase2.epochs}
        if prior:
            hparams["phase2_lr_chosen_by"] = prior["by"]
        return report, adapter, hparams, grid if len(lrs) > 1 else []

    # -- methods ---------------------------------------------------------------------------------
    def run_zero_shot(self, cell: dict) -> dict:
        _, s = self.splits(cell["task"])
        return {"metrics": self.score(s.report, rows=True), "trainable_params": 0, "hparams": {}}

    def run_lofit(self, cell: dict) -> dict:
        entry = self.ranking(cell["task"], cell["seed"])
        head_set = entry["head_set"].with_k(cell["k"])
        report, adapter, hparams, grid = self._tune_grid(cell, head_set)
        p1 = self.cfg.phase1
        hparams.update(l1=p1.l1, phase1_lr=p1.lr, phase1_epochs=p1.epochs)
        lay = self.loaded.layout
        return {"metrics": report, "trainable_params": adapter.num_parameters, "hparams": hparams,
                "selection": grid, "heads": head_set.top(cell["k"]), "phase1_seconds": entry["seconds"],
                "phase1_reused": entry["reused"], "phase1_params": lay.num_layers * lay.num_heads * lay.head_dim,
                "artifacts": {"head_set": head_set, "adapter": adapter}}

    def run_transfer_heads(self, cell: dict) -> dict:
        source = self.cfg.transfer_source(cell["task"])
        entry = self.ranking(source, cell["seed"])
        base = entry["head_set"]
        head_set = HeadSet(**{**dataclasses.asdict(base), "k": cell["k"], "method": "transfer",
                              "hparams": {**base.hparams, "transferred_from": source}})
        report, adapter, hparams, grid = self._tune_grid(cell, head_set)
        hparams["heads_from"] = source
        return {"metrics": report, "trainable_params": adapter.num_parameters, "hparams": hparams,
                "selection": grid, "heads": head_set.top(cell["k"]), "phase1_seconds": entry["seconds"],
                "phase1_reused": entry["reused"], "artifacts": {"adapter": adapter}}

    def run_random_heads(self, cell: dict) -> dict:
        loaded = self.loaded
        head_set = HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=dataclasses.asdict(loaded.layout),
                           ranking=random_ranking(loaded.layout, cell["seed"]), k=cell["k"], method="random",
                           task=cell["task"], seed=cell["seed"])
        report, adapter, hparams, grid = self._tune_grid(cell, head_set)
        return {"metrics": report, "trainable_params": adapter.num_parameters, "hparams": hparams,
                "selection": grid, "heads": head_set.top(cell["k"]), "artifacts": {"adapter": adapter}}

    def run_iti(self, cell: dict) -> dict:
        task, s = self.splits(cell["task"])
        t, iti = self.cfg.tasks[cell["task"]], self.cfg.iti
        # Probe only on the rows phase 2 trains on: never on the selection carve or the report split.
        prompts = [ex.prompt for ex in s.train]
        statements = [st for st in task.labelled_statements(t.train) if any(st[0].startswith(p) for p in prompts)]
        adapter, info = fit_iti(self.loaded, task.name, cell["k"], selection_items=s.select, alphas=iti.alphas,
                                statements=statements, batch_size=self.cfg.eval_batch_size,
                                val_fraction=iti.val_fraction, seed=cell["seed"], score_base=False)
        report = self.score(s.report, adapter, rows=True)
        grid = [{"alpha": g["alpha"], "score": g["score"], **metric_part(g)} for g in info["alpha_grid"]]
        return {"metrics": report, "trainable_params": adapter.num_parameters,
                "hparams": {"alpha": info["alpha"], "n_statements": info["n_statements"]},
                "selection": grid, "heads": [list(h) for h in info["heads"]],
                "probe_accuracy": info["probe_accuracy"], "artifacts": {"adapter": adapter}}

    def run_lora(self, cell: dict) -> dict:
        _, s = self.splits(cell["task"])
        la, lrs, loaded = self.cfg.lora, self.cfg.grid.lora_lr, self.loaded
        batch_size = self.cfg.eval_batch_size
        grid, best, report, info_best = [], None, None, None
        for lr in lrs:
            peft_model = None
            try:
                peft_model, info = lora.train_lora(loaded, s.train, self.training(cell["seed"]),
                                                   dataclasses.replace(la, lr=lr))
                entry = {"lr": lr, "final_loss": info["final_loss"]}
                if len(lrs) == 1:  # nothing to choose: score the report split right away
                    report = lora.evaluate_lora(loaded, peft_model, s.report, batch_size=batch_size, rows=True)
                    info_best, best = info, entry
                else:
                    sel = lora.evaluate_lora(loaded, peft_model, s.select, batch_size=batch_size)
                    entry.update(score=selection_score(sel), **metric_part(sel))
                    if best is None or entry["score"] > best["score"] + TIE:
                        best, info_best = entry, info
                        state = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
                grid.append(entry)
            except NaNLossError as exc:
                grid.append({"lr": lr, "error": str(exc)})
            finally:
                if peft_model is not None:
                    peft_model.unload()  # take the LoRA layers out of loaded.model again
        if best is None:
            raise RuntimeError(f"LoRA diverged for every lr in grid.lora_lr={lrs}; lower them")
        if report is None:  # rebuild the chosen adapter and score it once on the report split
            peft_model = lora.wrap_lora(loaded, la.rank, la.alpha, la.targets, la.dropout)
            try:
                with torch.no_grad():
                    params = dict(peft_model.named_parameters())
                    for name, value in state.items():
                        params[name].copy_(value)
                report = lora.evaluate_lora(loaded, peft_model, s.report, batch_size=batch_size, rows=True)
            finally:
                peft_model.unload()
        return {"metrics": report, "trainable_params": info_best["trainable_parameters"],
                "hparams": {"lr": best["lr"], "epochs": la.epochs, "rank": la.rank, "alpha": la.alpha,
                            "targets": list(la.targets)},
                "selection": grid if len(lrs) > 1 else [], "total_params": info_best["total_parameters"]}

    # -- one cell ------------------------------------------------------------------------------------
    def run_cell(self, cell: dict, setting: str, parent: str, index: str) -> bool:
        tr = tracking
        _, s = self.splits(cell["task"])
        params = cell_params(cell, self.cfg.tasks[cell["task"]].report, len(s.train), len(s.select),
                             self.cfg.dtype, self.device)
        run_id = tr.start_run(self.uri, self.experiment_id, cell_run_name(cell), params=params, tags=cell_tags(cell),
                              parent_run_id=parent)
        start = time.time()
        try:
            out = getattr(self, f"run_{cell['method']}")(cell)
            wall = round(time.time() - start, 2)
            metrics = out["metrics"]
            item_rows = metrics.pop("rows")
            artifacts = out.pop("artifacts", {})
            record = {k: cell[k] for k in ("id", "model", "task", "method", "k", "seed")}
            record.update(setting=setting, split=self.cfg.tasks[cell["task"]].report,
                          metrics=metric_part(metrics), n=metrics["n"], eval_seconds=metrics["seconds"],
                          trainable_params=out["trainable_params"], wall_seconds=wall, hparams=out["hparams"],
                          selection=out.get("selection", []), mlflow_run_id=run_id, finished_at=now(),
                          intervals=with_intervals(item_rows), items=self.results.save_rows(cell["id"], item_rows))
            for key in ("heads", "phase1_seconds", "phase1_reused", "phase1_params", "probe_accuracy",
                        "total_params"):
                if key in out:
                    record[key] = out[key]
            self.log_record(run_id, record)
            if "head_set" in artifacts:
                tr.log_head_set(self.uri, run_id, artifacts["head_set"], k=cell["k"])
            if "adapter" in artifacts:
                tr.log_adapter(self.uri, run_id, artifacts["adapter"])
            tr.end_run(self.uri, run_id)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            tr.end_run(self.uri, run_id, "FAILED", reason=reason)
            print(f"[reproduce] {index} {cell['id']} FAILED after {time.time() - start:.0f}s: {reason}", flush=True)
            traceback.print_exc()
            self.tick()
            self.results.fail(cell, reason)
            if self.fail_fast:
                raise
            return False
        except BaseException:
            tr.end_run(self.uri, run_id, "KILLED", reason="interrupted")
            raise
        self.tick()
        self.results.add(record)
        scores = " ".join(f"{k}={v:.3f}" for k, v in record["metrics"].items())
        chosen_txt = " ".join(f"{k}={v:g}" for k, v in out["hparams"].items() if k in CHOSEN)
        print(f"[reproduce] {index} {cell['id']}: {scores} (n={record['n']}) {chosen_txt} "
              f"params={record['trainable_params']} [{wall:.1f}s]", flush=True)
        return True

    def log_record(self, run_id: str, record: dict) -> None:
        """A cell run's chosen hyperparameters (params chosen.*) and metrics, from its record."""
        if record.get("hparams"):
            tracking.log_params(self.uri, run_id, {f"chosen.{k}": v for k, v in record["hparams"].items()})
        tracking.log_metrics(self.uri, run_id, cell_metrics(record))

    def sync_mlflow(self, parent: str) -> int:
        """Log each recorded cell that this MLflow store lacks as a child run of ``parent``, from the record.

        The record (reproduce.json, committed) outlives any one MLflow store: after --resume on a new machine,
        or with a different --tracking-uri, the cells an earlier store holds would otherwise be missing from
        the parent run. Each backfilled run carries the cell's params, chosen hyperparameters and metrics, the
        LoFiT head set when the ranking file is there, and tag lofit.source=record; adapters are not in the
        record, so those runs have none. Returns how many cells it logged; the caller saves the record.
        """
        tr, doc = tracking, self.results.doc
        present = {r.info.run_id for r in tr.child_runs(self.uri, parent)}
        missing = [c for c in doc["cells"] if c.get("mlflow_run_id") not in present]
        dtype, device = doc.get("config", {}).get("dtype", ""), doc.get("hardware", {}).get("device", "")
        for record in missing:
            split = doc.get("splits", {}).get(record["task"], {})
            params = cell_params(record, record.get("split", ""), split.get("n_train", ""), split.get("n_select", ""),
                                 dtype, device)
            tags = {**cell_tags(record), "lofit.source": "record", "lofit.record_file": str(self.results.json_path),
                    "lofit.recorded_run_id": record.get("mlflow_run_id") or "",
                    "lofit.finished_at": record.get("finished_at", "")}
            run_id = tr.start_run(self.uri, self.experiment_id, cell_run_name(record), params=params, tags=tags,
                                  parent_run_id=parent)
            self.log_record(run_id, record)
            head_set = self.recorded_head_set(record)
            if head_set is not None:
                tr.log_head_set(self.uri, run_id, head_set, k=record["k"])
            tr.end_run(self.uri, run_id)
            record["mlflow_run_id"] = run_id
        if missing:
            print(f"[reproduce] logged {len(missing)} recorded cell(s) this MLflow store lacked under parent run "
                  f"{parent} (tag lofit.source=record)", flush=True)
        return len(missing)

    def recorded_head_set(self, record: dict) -> HeadSet | None:
        """The phase-1 ranking a recorded LoFiT cell used, from <out-dir>/heads/ (None if absent or another)."""
        if record["method"] != "lofit":
            return None
        path = self.ranking_path(record["model"], record["task"], record["seed"])
        if not path.is_file():
            return None
        head_set = HeadSet(**json.loads(path.read_text())["head_set"])
        top = [list(h) for h in head_set.top(record["k"])]
        return head_set if top == [list(h) for h in record.get("heads", top)] else None

    # -- the job ---------------------------------------------------------------------------------
    def model_info(self, model: str) -> list[int]:
        """K values of a model: from the record (no load needed on --resume) or by loading it."""
        info = self.results.doc["models"].get(model)
        if info and info.get("k_fractions") == list(self.cfg.k_fractions):
            return info["k_values"]
        self.load(model)
        return self.results.doc["models"][model]["k_values"]

    def load(self, model: str) -> None:
        if self.loaded is not None and self.loaded.spec == model:
            return
        self.loaded = None
        self._rankings.clear()
        start = time.time()
        self.loaded = load_model(model, dtype=self.cfg.dtype, device=self.device)
        lay = self.loaded.layout
        self.results.doc["models"][model] = {
            "layout": dataclasses.asdict(lay), "total_heads": lay.total_heads, "fingerprint": self.loaded.fingerprint,
            "k_fractions": list(self.cfg.k_fractions), "k_values": k_values(self.cfg.k_fractions, lay.total_heads),
            "parameters": sum(p.numel() for p in self.loaded.model.parameters())}
        print(f"[reproduce] loaded {model} ({lay.num_layers} layers x {lay.num_heads} heads, "
              f"{time.time() - start:.1f}s)", flush=True)

    def parent_run(self, reopen: bool = True) -> str:
        """The record's parent run in this store (reopened as RUNNING when ``reopen``), else a new one."""
        tr, doc = tracking, self.results.doc
        self.uri = tr.resolve_tracking_uri(self.uri)
        self.experiment_id = tr.ensure_experiment(self.cfg.mlflow.experiment, self.uri, self.cfg.mlflow.artifact_root)
        parent = doc.get("parent_run_id") if doc.get("tracking_uri") == self.uri else None
        if parent and (tr.reopen_run(self.uri, parent) if reopen else tr.run_exists(self.uri, parent)):
            if reopen:  # cells a killed driver left RUNNING: closed here, re-run below
                closed = tr.close_dangling_runs(self.uri, parent, reason="driver stopped; cell re-run by --resume")
                if closed:
                    print(f"[reproduce] closed {len(closed)} cell run(s) a stopped driver left open", flush=True)
            return parent
        if parent:
            print(f"[reproduce] parent run {parent} is deleted or not in this store; starting a new one", flush=True)
        parent = tr.start_run(self.uri, self.experiment_id, self.cfg.name, params=dataclasses.asdict(self.cfg),
                              tags={"lofit.kind": "reproduce", "lofit.out_dir": str(self.out_dir)})
        doc.update(parent_run_id=parent, tracking_uri=self.uri)
        return parent

    def tick(self) -> None:
        """Total wall time of the job so far, across --resume runs."""
        self.results.doc["wall_seconds"] = round(self.wall_base + time.time() - self.started, 1)

    def check_inputs(self) -> None:
        """Read every task's splits and resolve every model spec now, so a missing file or a wrong spec
        fails in seconds rather than hours into the run (raises TaskDataError / ModelSpecError)."""
        for task_name in self.cfg.tasks:
            self.splits(task_name)
        for model in self.cfg.models:
            check_spec(model)

    def sync(self) -> int:
        """--sync-mlflow: put the record into this MLflow store (one parent run, a run per cell); runs nothing."""
        doc = self.results.doc
        before = doc.get("parent_run_id")  # parent_run() records a new id when it has to start one
        parent = self.parent_run(reopen=False)
        self.sync_mlflow(parent)
        self.results.save()
        if parent != before:  # a parent made here: close it the way the record stands
            tracking.log_metrics(self.uri, parent, {"cells": len(doc["cells"]),
                                                    "wall_seconds": doc.get("wall_seconds")})
            partial = None if doc.get("finished") else (f"record is partial ({len(doc['cells'])} cells); "
                                                         f"--resume runs the rest")
            tracking.end_run(self.uri, parent, "FINISHED" if not partial else "KILLED", reason=partial)
        print(f"[reproduce] MLflow: {self.uri} (experiment '{self.cfg.mlflow.experiment}', parent run {parent}) "
              f"holds the record's {len(doc['cells'])} cells", flush=True)
        return 0

    def run(self) -> int:
        started = self.started = time.time()
        self.wall_base = self.results.doc.get("wall_seconds") or 0.0 if self.resume else 0.0
        parent = self.parent_run()
        doc = self.results.doc
        self.sync_mlflow(parent)
        self.results.save()
        print(f"[reproduce] MLflow: {self.uri} (experiment '{self.cfg.mlflow.experiment}', parent run {parent}); "
              f"results: {self.results.json_path}", flush=True)
        failed = skipped = ran = 0
        try:
            for model in self.cfg.models:
                ks = self.model_info(model)
                cells = plan_cells(self.cfg, model, ks)
                todo = []
                for c in cells:
                    setting = cell_setting(self.cfg, c)
                    if self.resume and self.results.done(c, setting):
                        skipped += 1
                    else:
                        todo.append((c, setting))
                print(f"[reproduce] {model}: K = {ks}; {len(cells)} cells, {len(cells) - len(todo)} already done",
                      flush=True)
                if not todo:
                    continue
                self.load(model)
                for i, (cell, setting) in enumerate(todo, 1):
                    ok = self.run_cell(cell, setting, parent, f"[{model} {i}/{len(todo)}]")
                    faults.kill_point("reproduce.kill", cells=len(doc["cells"]))
                    ran += ok
                    failed += not ok
                self.loaded = None
                self._rankings.clear()
        except BaseException as exc:
            self.tick()
            self.results.save()
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracking.end_run(self.uri, parent, status, reason=f"{type(exc).__name__}: {exc}")
            raise
        self.tick()
        doc["finished"] = None if failed else now()
        self.results.save()
        tracking.log_metrics(self.uri, parent, {"cells": len(doc["cells"]), "failed_cells": failed,
                                                "wall_seconds": doc["wall_seconds"]})
        tracking.end_run(self.uri, parent, "FAILED" if failed else "FINISHED",
                         reason=f"{failed} cells failed" if failed else None)
        print(f"[reproduce] done: {ran} cells run, {skipped} already done, {failed} failed, "
              f"{time.time() - started:.0f}s; {self.results.json_path} and {self.results.md_path}", flush=True)
        return 1 if failed else 0
