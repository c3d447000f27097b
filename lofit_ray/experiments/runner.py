"""The Runner: plans a reproduce job's cells, runs those the record lacks, and keeps the record and MLflow current.

Cells run one after another in this process (torch only). A cell's method is first searched, once per
model x task x method x K, on the selection split (`search`: lofit_ray.tuning's search, the one the search
service runs, in process; the same number of trials for every method); each method trains through its own object in lofit_ray.methods (`trained` dispatches), for
search trials and cells alike. The cell
then trains the chosen setting with its own seed and scores the report split once; `run_cell` turns that
into a record and a nested MLflow run. Each phase-1 ranking (model, task, seed, phase-1 lr and L1) is
saved under <out-dir>/heads/ with its `train.phase1_key` and serves every trial, K and transfer_heads cell
that needs it. MLflow is reached only through `lofit_ray.tracking`.
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
from ..heads import HeadSet
from ..methods import METHODS
from ..models import check_spec, load_model, spec_slug
from ..split_specs import split_spec, splits_from_spec
from ..selectors import select_heads
from ..train import phase1_key
from ..tuning import run_in_process
from .cells import cell_setting, k_values, plan_cells, search_id, search_setting
from .record import JSON_NAME, Results, hardware, metric_part, now, write_atomic

HEADS_DIR = "heads"  # <out-dir>/heads/: phase-1 rankings, reused by --resume
SEARCHES_DIR = "searches"  # <out-dir>/searches/: one Optuna journal per search, so --resume keeps its trials


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
            tracking.KIND_TAG: "reproduce-cell", "lofit.cell": cell["id"]}


def cell_metrics(record: dict) -> dict:
    """What a cell's MLflow run logs as metrics, from its record (the live run and the backfill agree)."""
    logged = {**record["metrics"], "n": record["n"], "eval_seconds": record["eval_seconds"],
              "trainable_parameters": record["trainable_params"], "wall_seconds": record["wall_seconds"]}
    if record.get("phase1_seconds") is not None:
        logged["phase1_seconds"] = record["phase1_seconds"]
    for key in ("search_seconds", "train_seconds"):
        if record.get(key) is not None:
            logged[key] = record[key]
    if isinstance(record.get("selection"), dict) and record["selection"]["score"] is not None:  # the search's best selection score (older records: a grid)
        logged["sel_score"] = record["selection"]["score"]
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
        if not (resume or sync_only) and (out_dir / SEARCHES_DIR).is_dir():
            import shutil  # a new record starts its searches afresh (--overwrite): old journals would answer them

            shutil.rmtree(out_dir / SEARCHES_DIR)
        self._splits: dict = {}
        self.memo: dict = {}
        self.loaded = None

    # -- helpers ---------------------------------------------------------------------------------
    def splits(self, task_name: str):
        if task_name not in self._splits:
            t = dataclasses.replace(self.cfg.tasks[task_name])
            t.data_dir = t.data_dir or self.cfg.data_dir
            task, s = splits_from_spec(split_spec(t, self.loaded.spec if t.chat_template else None))
            self._splits[task_name] = (task, s)
            self.results.doc["splits"][task_name] = {
                "train": t.train,
                "report": t.report or f"a {t.report_fraction:.0%} carve of '{t.train}' (carve_seed {t.carve_seed})",
                "carve": s.carve, "limit_train": t.limit_train,
                "n_train": len(s.train), "n_select": len(s.select), "n_report": len(s.report),
                "train_hash": s.train_hash(), "objective": task.objective, "eval_kind": task.eval_kind}
        return self._splits[task_name]

    def training(self, seed: int):
        """The shared training settings with the cell's seed."""
        return dataclasses.replace(self.cfg.training, seed=seed)

    def score(self, items, rows: bool = False) -> dict:
        """Metrics of `items` on the model as it stands (inside `trained`, with the method's change on);
        rows=True adds the per-item rows under "rows"."""
        metrics, item_rows = evaluate_items(self.loaded, items, batch_size=self.cfg.eval_batch_size)
        return {**metrics, "rows": item_rows} if rows else metrics

    def ranking_path(self, model: str, task_name: str, seed: int, key: str) -> Path:
        return self.out_dir / HEADS_DIR / f"{spec_slug(model)}__{task_name}__seed{seed}__{key[:8]}.json"

    def ranking(self, task_name: str, seed: int, phase1: Phase1Config) -> dict:
        """Phase 1 for (model, task, seed, phase-1 settings): computed once, saved under <out-dir>/heads/
        (reused by --resume, by every trial with the same phase-1 values, and by transfer_heads)."""
        loaded = self.loaded
        _, s = self.splits(task_name)
        training = self.training(seed)
        memo = phase1_key(loaded.cache_key, s.train_hash(), task_name, training, phase1)
        if memo in self.memo:
            return self.memo[memo]
        path = self.ranking_path(loaded.spec, task_name, seed, memo)
        entry = None
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == memo:
                entry = {**saved, "head_set": HeadSet(**saved["head_set"]), "reused": True}
        if entry is None:
            start = time.time()
            head_set = select_heads(loaded, s.train, training, phase1, task=task_name)
            entry = {"key": memo, "seconds": round(time.time() - start, 2), "head_set": head_set,
                     "final_loss": head_set.hparams.get("final_loss"), "reused": False}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**entry, "head_set": json.loads(head_set.to_json())}, indent=1))
        entry["file"] = str(path.relative_to(self.out_dir))
        name = f"{loaded.spec}|{task_name}|seed={seed}|" + (
            f"lr={phase1.lr:g}|l1={phase1.l1:g}" if phase1.selector == "l1" else
            "|".join(f"{key}={value}" for key, value in phase1.settings().items() if key != "epochs"))
        self.results.doc["phase1"][name] = {
            k: entry[k] for k in ("key", "seconds", "final_loss", "file")}
        self.memo[memo] = entry
        return entry

    def trained(self, method: str, task_name: str, k: int | None, seed: int, params: dict, on_epoch=None):
        """The model with `method` trained at `params` for the with-block, then as before (lofit_ray.methods).
        Trained methods run params["epochs"] epochs when given, else the most a trial trains (phase2.epochs,
        lora.epochs), calling on_epoch(epoch, stats) after each. Yields what the record keeps."""
        return METHODS[method].trained(self, task_name, k, seed, params, on_epoch=on_epoch)

    def search(self, task_name: str, method: str, k: int | None) -> dict:
        """The method's search at K on the selection split: from the record when its setting is unchanged, else
        run (resuming its Optuna journal) and recorded. Trials train with search.seed."""
        if self.cfg.search.num_trials == 0:  # no search: the method's config values (search.num_trials' help)
            return {"chosen": METHODS[method].fixed_params(self.cfg), "score": None, "trials": [], "seconds": 0.0,
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
        """A search as a nested run of the job: its chosen setting, best score, trials (a metric per trial and
        a table), so the UI shows what each method was tuned over."""
        tr, doc = tracking, self.results.doc
        states = [t["state"] for t in found["trials"]]
        run_id = tr.start_run(self.uri, self.experiment_id, f"search-{method}-{spec_slug(self.loaded.spec)}-{task_name}"
                              + (f"-k{k}" if k is not None else ""),
                              params={"space": dataclasses.asdict(getattr(self.cfg.search.spaces, method)),
                                      "num_trials": self.cfg.search.num_trials, "model": self.loaded.spec,
                                      "task": task_name, "method": method, "k": "-" if k is None else k,
                                      **{f"chosen.{key}": v for key, v in found["chosen"].items()}},
                              tags={tracking.MODEL_TAG: self.loaded.spec, tracking.TASK_TAG: task_name,
                                    tracking.METHOD_TAG: method, tracking.KIND_TAG: "reproduce-search",
                                    "lofit.search": sid},
                              parent_run_id=doc.get("parent_run_id"))
        for t in found["trials"]:
            if t["value"] is not None:
                tr.log_metrics(self.uri, run_id, {"trial_score": t["value"]}, step=t["number"])
        tr.log_metrics(self.uri, run_id, {"sel_score": found["score"], "search_seconds": found["seconds"],
                                          **{f"trials_{x}": states.count(x) for x in ("complete", "pruned", "fail")}})
        tr.log_rows_table(self.uri, run_id, found["trials"], "trials.table.json")
        tr.end_run(self.uri, run_id)

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
        tr = tracking
        _, s = self.splits(cell["task"])
        params = cell_params(cell, self.cfg.tasks[cell["task"]].report, len(s.train), len(s.select),
                             self.cfg.dtype, self.device)
        run_id = tr.start_run(self.uri, self.experiment_id, cell_run_name(cell), params=params, tags=cell_tags(cell),
                              parent_run_id=parent)
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
            self.log_record(run_id, record)
            if "head_set" in artifacts:
                tr.log_head_set(self.uri, run_id, artifacts["head_set"], k=cell["k"])
            if "adapter" in artifacts:  # an MLflow model, with the cell's report metrics
                artifacts["adapter"].config.eval_kind = self.splits(cell["task"])[0].eval_kind
                model_id = tr.log_adapter(self.uri, run_id, artifacts["adapter"])
                tr.log_metrics(self.uri, run_id, cell_metrics(record), model_id=model_id)
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
        chosen_txt = " ".join(f"{k}={v:g}" for k, v in out["hparams"].items())
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
        if not METHODS[record["method"]].logs_ranking:
            return None
        path = self.out_dir / record.get("ranking_file", "-")
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
        self.memo.clear()
        if any(t.chat_template for t in self.cfg.tasks.values()):  # their prompts follow the model's chat template
            self._splits.clear()
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
                              tags={tracking.KIND_TAG: "reproduce", "lofit.out_dir": str(self.out_dir)})
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
        if self.cfg.search.num_trials == 0:  # every searched method must have config values to train at
            for method in self.cfg.methods:
                if METHODS[method].searched:
                    METHODS[method].fixed_params(self.cfg)

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
                self.memo.clear()
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
