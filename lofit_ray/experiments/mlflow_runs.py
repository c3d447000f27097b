"""A reproduce job's MLflow side: one parent run, a nested run per search and per cell, and the backfill of
recorded cells a store lacks.

The record (reproduce.json, lofit_ray.experiments.record) is what the job keeps; MLflow mirrors it for the UI,
so a record moved to another machine or store can be logged again (`--sync-mlflow`). MLflow is reached only
through `lofit_ray.tracking`.
"""
from __future__ import annotations

import dataclasses
import json

from .. import tracking
from ..config import ReproduceConfig
from ..heads import HeadSet
from ..methods import METHODS
from ..models import spec_slug
from .record import Results


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
    # the search's best selection score (older records: a grid; a fixed protocol, no search: None)
    if isinstance(record.get("selection"), dict) and record["selection"]["score"] is not None:
        logged["sel_score"] = record["selection"]["score"]
    return logged


class JobRuns:
    """The job's runs in one MLflow store (`uri`, resolved by `parent_run`, so no store is touched before the
    job's inputs check out)."""

    def __init__(self, cfg: ReproduceConfig, results: Results, tracking_uri: str | None, device: str):
        self.cfg, self.results, self.device = cfg, results, device
        self.uri, self.experiment_id = tracking_uri or cfg.mlflow.tracking_uri, None

    @property
    def out_dir(self):
        return self.results.out_dir

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

    def log_search(self, model: str, sid: str, method: str, task_name: str, k: int | None, found: dict) -> None:
        """A search as a nested run of the job: its chosen setting, best score, trials (a metric per trial and
        a table), so the UI shows what each method was tuned over."""
        tr, doc = tracking, self.results.doc
        states = [t["state"] for t in found["trials"]]
        run_id = tr.start_run(self.uri, self.experiment_id, f"search-{method}-{spec_slug(model)}-{task_name}"
                              + (f"-k{k}" if k is not None else ""),
                              params={"space": dataclasses.asdict(getattr(self.cfg.search.spaces, method)),
                                      "num_trials": self.cfg.search.num_trials, "model": model,
                                      "task": task_name, "method": method, "k": "-" if k is None else k,
                                      **{f"chosen.{key}": v for key, v in found["chosen"].items()}},
                              tags={tracking.MODEL_TAG: model, tracking.TASK_TAG: task_name,
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

    # -- cells -------------------------------------------------------------------------------------
    def start_cell(self, cell: dict, splits, parent: str) -> str:
        """A cell's run, nested under the job's parent run, with what it is (params, tags)."""
        params = cell_params(cell, self.cfg.tasks[cell["task"]].report, len(splits.train), len(splits.select),
                             self.cfg.dtype, self.device)
        return tracking.start_run(self.uri, self.experiment_id, cell_run_name(cell), params=params,
                                  tags=cell_tags(cell), parent_run_id=parent)

    def finish_cell(self, run_id: str, record: dict, artifacts: dict, eval_kind: str) -> None:
        """A finished cell's record on its run: chosen settings and metrics, its head set, and its adapter as an
        MLflow model carrying the cell's report metrics."""
        tr = tracking
        self.log_record(run_id, record)
        if "head_set" in artifacts:
            tr.log_head_set(self.uri, run_id, artifacts["head_set"], k=record["k"])
        if "adapter" in artifacts:  # an MLflow model, with the cell's report metrics
            artifacts["adapter"].config.eval_kind = eval_kind
            model_id = tr.log_adapter(self.uri, run_id, artifacts["adapter"])
            tr.log_metrics(self.uri, run_id, cell_metrics(record), model_id=model_id)
        tr.end_run(self.uri, run_id)

    def end_run(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        tracking.end_run(self.uri, run_id, status, reason=reason)

    def log_record(self, run_id: str, record: dict) -> None:
        """A cell run's chosen hyperparameters (params chosen.*) and metrics, from its record."""
        if record.get("hparams"):
            tracking.log_params(self.uri, run_id, {f"chosen.{k}": v for k, v in record["hparams"].items()})
        tracking.log_metrics(self.uri, run_id, cell_metrics(record))

    # -- the record into a store -------------------------------------------------------------------
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

    def close_parent(self, parent: str, failed: int) -> None:
        """The job's parent run at the end: how many cells, how many failed, how long."""
        doc = self.results.doc
        tracking.log_metrics(self.uri, parent, {"cells": len(doc["cells"]), "failed_cells": failed,
                                                "wall_seconds": doc["wall_seconds"]})
        tracking.end_run(self.uri, parent, "FAILED" if failed else "FINISHED",
                         reason=f"{failed} cells failed" if failed else None)
