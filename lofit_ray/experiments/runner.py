"""The Runner: plans a reproduce job's cells, runs those the record lacks, and keeps the record and MLflow current.

It orchestrates; what it reuses across cells is in caches.py (each task's splits, each phase-1 ranking), what it
logs to MLflow in mlflow_runs.py (the parent run, a run per search and per cell, the backfill from the record),
and how each method trains in lofit_ray.methods (one file per method).

Cells run one after another in this process (torch only). A cell's method is first searched, once per
model x task x method x K, on the selection split (`search`: lofit_ray.tuning's search, the one the search
service runs, in process; the same number of trials for every method; with search.num_trials 0, no search: the
method's config values). Each method trains through its own object in lofit_ray.methods (`trained`
dispatches), for search trials and cells alike. The cell then trains the chosen setting with its own seed and
scores the report split once; `run_cell` turns that into a record and a nested MLflow run. Each phase-1 ranking
(model, task, seed, phase-1 settings) is saved under <out-dir>/heads/ with its `train.phase1_key` and serves
every trial, K and transfer_heads cell that needs it. MLflow is reached only through `lofit_ray.tracking`.
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
from ..config import Phase1Config, ReproduceConfig
from ..evaluate import evaluate_items, selection_score
from ..evidence import with_intervals
from ..methods import METHODS
from ..models import check_spec, load_model
from ..tuning import run_in_process
from .caches import RankingCache, SplitCache
from .cells import cell_setting, k_values, plan_cells, search_id, search_setting
from .mlflow_runs import JobRuns
from .record import JSON_NAME, Results, hardware, metric_part, now

SEARCHES_DIR = "searches"  # <out-dir>/searches/: one Optuna journal per search, so --resume keeps its trials


def default_out_dir(local: Path) -> Path:
    """`local` (e.g. the job's jobs/results), except under `ray job submit`, whose working directory is a
    temporary copy: there $LOFIT_HOME/reproduce."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return tracking.lofit_home() / "reproduce"
    return local


class Runner:
    """One reproduce job (jobs/reproduce.py, `lofit-ray study`): `run` plans the cells of each model, searches
    and trains what the record lacks, and keeps the record and MLflow current; `sync` only logs the record.
    The methods (lofit_ray.methods) reach the job through it: `splits`, `ranking`, `training`, `score`,
    `search`, `loaded`, `cfg` and `memo`."""

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
        if not (resume or sync_only) and (out_dir / SEARCHES_DIR).is_dir():
            import shutil  # a new record starts its searches afresh (--overwrite): old journals would answer them

            shutil.rmtree(out_dir / SEARCHES_DIR)
        self.memo: dict = {}  # what a job computes once per model: phase-1 rankings, ITI probes
        self.loaded = None
        self.split_cache = SplitCache(cfg, self.results)
        self.rankings = RankingCache(self.results, self.memo)
        # its store is resolved by run(): no MLflow store is touched before the inputs check out
        self.runs = JobRuns(cfg, self.results, tracking_uri, self.device)

    # -- helpers ---------------------------------------------------------------------------------
    def splits(self, task_name: str):
        """(task, TaskSplits) of a task, read once (caches.SplitCache)."""
        return self.split_cache.get(task_name, self.loaded)

    def training(self, seed: int):
        """The shared training settings with the cell's seed."""
        return dataclasses.replace(self.cfg.training, seed=seed)

    def score(self, items, rows: bool = False) -> dict:
        """Metrics of `items` on the model as it stands (inside `trained`, with the method's change on);
        rows=True adds the per-item rows under "rows"."""
        metrics, item_rows = evaluate_items(self.loaded, items, batch_size=self.cfg.eval_batch_size)
        return {**metrics, "rows": item_rows} if rows else metrics

    def ranking(self, task_name: str, seed: int, phase1: Phase1Config) -> dict:
        """Phase 1 for (model, task, seed, phase-1 settings): computed once, saved under <out-dir>/heads/
        (reused by --resume, by every trial with the same phase-1 values, and by transfer_heads)."""
        _, s = self.splits(task_name)
        return self.rankings.get(self.loaded, task_name, seed, phase1, s, self.training(seed))

    def trained(self, method: str, task_name: str, k: int | None, seed: int, params: dict, on_epoch=None):
        """The model with `method` trained at `params` for the with-block, then as before (lofit_ray.methods).
        Trained methods run params["epochs"] epochs when given, else the most a trial trains (phase2.epochs,
        lora.epochs), calling on_epoch(epoch, stats) after each. Yields what the record keeps."""
        return METHODS[method].trained(self, task_name, k, seed, params, on_epoch=on_epoch)

    def search(self, task_name: str, method: str, k: int | None) -> dict:
        """The method's search at K on the selection split: from the record when its setting is unchanged, else
        run (resuming its Optuna journal) and recorded. Trials train with search.seed."""
        if self.cfg.search.num_trials == 0:  # no search: the method's config values (search.num_trials' help)
            return {"chosen": METHODS[method].fixed_params(self.cfg), "score": None, "trials": [], "seconds": None,
                    "best_trial": None}
        sid = search_id(self.loaded.spec, task_name, method, k)
        setting = search_setting(self.cfg, task_name, method)
        searches = self.results.doc.setdefault("searches", {})
        if searches.get(sid, {}).get("setting") == setting:
            return searches[sid]
        if method == "transfer_heads" and "lofit" in self.cfg.methods:
            self.search(self.cfg.transfer_source(task_name), "lofit", k)  # its chosen phase 1 gives the heads
        _, s = self.splits(task_name)
        cfg = self.cfg.search
        method_space = getattr(cfg.spaces, METHODS[method].space)
        space = {f.name: getattr(method_space, f.name) for f in dataclasses.fields(method_space)}
        epoched = METHODS[method].epoched

        def objective(params: dict, report) -> None:
            def on_epoch(epoch: int, stats: dict) -> None:
                report(epoch, selection_score(self.score(s.select), cfg.metric))

            with self.trained(method, task_name, k, cfg.seed, params, on_epoch=on_epoch if epoched else None):
                if not epoched:
                    report(1, selection_score(self.score(s.select), cfg.metric))

        def on_trial(t: dict) -> None:
            value = "-" if t["value"] is None else f"{t['value']:.4f}"
            print(f"[reproduce]   search {sid} trial {t['number']}: {t['state']} {value} "
                  + " ".join(f"{k}={v:g}" for k, v in t["params"].items())
                  + (f" epochs={t['epochs']}" if "epochs" in t else "") + f" [{t.get('seconds', 0):.0f}s]", flush=True)
            faults.kill_point("reproduce.kill", trials=t["number"] + 1)

        print(f"[reproduce] search {sid}: {cfg.num_trials} trials on the selection split (n={len(s.select)})",
              flush=True)
        journal = self.out_dir / SEARCHES_DIR / f"{setting}__{sid.replace('|', '__').replace('=', '')}.journal"
        found = run_in_process(objective, space, cfg, journal, name=sid, epoched=epoched, on_trial=on_trial)
        found.update(setting=setting, metric=cfg.metric, n_select=len(s.select), journal=str(
            journal.relative_to(self.out_dir)), finished_at=now())
        searches[sid] = found
        self.results.save()
        self.log_search(sid, method, task_name, k, found)
        return found

    def log_search(self, sid: str, method: str, task_name: str, k: int | None, found: dict) -> None:
        """The search as a nested run of the job (mlflow_runs.JobRuns.log_search)."""
        self.runs.log_search(self.loaded.spec, sid, method, task_name, k, found)

    # -- methods ---------------------------------------------------------------------------------
    def run_method(self, cell: dict) -> dict:
        """A cell: the zero-shot model, or the method's searched setting trained with the cell's seed; each
        scored once on the report split."""
        _, s = self.splits(cell["task"])
        if not METHODS[cell["method"]].searched:
            return {"metrics": self.score(s.report, rows=True), "trainable_params": 0, "hparams": {}}
        found = self.search(cell["task"], cell["method"], cell["k"])
        start = time.time()
        with self.trained(cell["method"], cell["task"], cell["k"], cell["seed"], found["chosen"]) as info:
            metrics = self.score(s.report, rows=True)
        out = {"metrics": metrics, "hparams": dict(found["chosen"]), "search_seconds": found["seconds"],
               "cell_seconds": round(time.time() - start, 2),
               "train_seconds": round(time.time() - start - metrics["seconds"], 2),
               "selection": {"score": found["score"], "trials": len(found["trials"]), "best_trial": found["best_trial"]},
               "artifacts": {k: info.pop(k) for k in ("adapter", "head_set") if k in info}}
        out.update(info)
        return out

    # -- one cell ------------------------------------------------------------------------------------
    def run_cell(self, cell: dict, setting: str, parent: str, index: str) -> bool:
        """Run one cell under its own MLflow run and add it to the record (or record its failure)."""
        task, s = self.splits(cell["task"])
        run_id = self.runs.start_cell(cell, s, parent)
        start = time.time()
        try:
            out = self.run_method(cell)
            wall = out.pop("cell_seconds", round(time.time() - start, 2))  # the search's time is search_seconds
            metrics = out["metrics"]
            item_rows = metrics.pop("rows")
            artifacts = out.pop("artifacts", {})
            record = {k: cell[k] for k in ("id", "model", "task", "method", "k", "seed")}
            record.update(setting=setting, split=self.cfg.tasks[cell["task"]].report,
                          metrics=metric_part(metrics), n=metrics["n"], eval_seconds=metrics["seconds"],
                          trainable_params=out["trainable_params"], wall_seconds=wall, hparams=out["hparams"],
                          selection=out.get("selection", []), mlflow_run_id=run_id, finished_at=now(),
                          intervals=with_intervals(item_rows), items=self.results.save_rows(cell["id"], item_rows))
            for key in ("heads", "phase1_seconds", "phase1_reused", "phase1_params", "ranking_file", "heads_from",
                        "probe_accuracy", "n_statements", "total_params", "search_seconds", "train_seconds"):
                if key in out:
                    record[key] = out[key]
            self.runs.finish_cell(run_id, record, artifacts, task.eval_kind)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.runs.end_run(run_id, "FAILED", reason=reason)
            print(f"[reproduce] {index} {cell['id']} FAILED after {time.time() - start:.0f}s: {reason}", flush=True)
            traceback.print_exc()
            self.tick()
            self.results.fail(cell, reason)
            if self.fail_fast:
                raise
            return False
        except BaseException:
            self.runs.end_run(run_id, "KILLED", reason="interrupted")
            raise
        self.tick()
        self.results.add(record)
        scores = " ".join(f"{k}={v:.3f}" for k, v in record["metrics"].items())
        chosen_txt = " ".join(f"{k}={v:g}" for k, v in out["hparams"].items())
        print(f"[reproduce] {index} {cell['id']}: {scores} (n={record['n']}) {chosen_txt} "
              f"params={record['trainable_params']} [{wall:.1f}s]", flush=True)
        return True

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
        self.memo.clear()
        if any(t.chat_template for t in self.cfg.tasks.values()):  # their prompts follow the model's chat template
            self.split_cache.clear()
        start = time.time()
        self.loaded = load_model(model, dtype=self.cfg.dtype, device=self.device,
                                 attn_implementation=self.cfg.attn_implementation)
        lay = self.loaded.layout
        self.results.doc["models"][model] = {
            "layout": dataclasses.asdict(lay), "total_heads": lay.total_heads, "fingerprint": self.loaded.fingerprint,
            "k_fractions": list(self.cfg.k_fractions), "k_values": k_values(self.cfg.k_fractions, lay.total_heads),
            "parameters": sum(p.numel() for p in self.loaded.model.parameters())}
        print(f"[reproduce] loaded {model} ({lay.num_layers} layers x {lay.num_heads} heads, "
              f"{time.time() - start:.1f}s)", flush=True)

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
        if self.cfg.search.num_trials == 0:  # every searched method must have config values to train at
            for method in self.cfg.methods:
                if METHODS[method].searched:
                    METHODS[method].fixed_params(self.cfg)

    def sync(self) -> int:
        """--sync-mlflow: put the record into this MLflow store (one parent run, a run per cell); runs nothing."""
        return self.runs.sync()

    def run(self) -> int:
        started = self.started = time.time()
        self.wall_base = self.results.doc.get("wall_seconds") or 0.0 if self.resume else 0.0
        parent = self.runs.parent_run()
        doc = self.results.doc
        self.runs.sync_mlflow(parent)
        self.results.save()
        print(f"[reproduce] MLflow: {self.runs.uri} (experiment '{self.cfg.mlflow.experiment}', parent run {parent}); "
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
                self.memo.clear()
        except BaseException as exc:
            self.tick()
            self.results.save()
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.runs.end_run(parent, status, reason=f"{type(exc).__name__}: {exc}")
            raise
        self.tick()
        doc["finished"] = None if failed else now()
        self.results.save()
        self.runs.close_parent(parent, failed)
        print(f"[reproduce] done: {ran} cells run, {skipped} already done, {failed} failed, "
              f"{time.time() - started:.0f}s; {self.results.json_path} and {self.results.md_path}", flush=True)
        return 1 if failed else 0
