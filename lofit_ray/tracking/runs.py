"""Runs and what they hold: params, tags, metrics, head sets (heads/), per-item records (items/)."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from ..heads import HeadSet, plot_head_set
from .store import (FAILURE_REASON_TAG, HEAD_SET_FILE, HEADS_DIR, HEADS_K_TAG, HEATMAP_FILE, ITEMS_DIR,
                    _MAX_TAG_VALUE, METHOD_TAG, MODEL_TAG, OUTCOME_TAG, PARENT_RUN_TAG, PHASE1_KEY_TAG, RUN_STATUSES,
                    TASK_TAG, _chunks, client, flatten_params, _key, _resolve_models_uri, _retry, _tags, _value)


# -- runs: params, tags, metrics, status ---------------------------------------------------------------

def log_params(tracking_uri: str, run_id: str, params: dict) -> None:
    c = client(tracking_uri)
    items = [Param(k, v) for k, v in flatten_params(params).items()]
    for chunk in _chunks(items):
        _retry(c.log_batch, run_id, params=chunk)


def set_tags(tracking_uri: str, run_id: str, tags: dict) -> None:
    c = client(tracking_uri)
    items = [RunTag(k, v) for k, v in _tags(tags).items()]
    for chunk in _chunks(items):
        _retry(c.log_batch, run_id, tags=chunk)


def start_run(tracking_uri: str, experiment_id: str, run_name: str, params: dict, tags: dict,
              parent_run_id: str | None = None) -> str:
    """Create a RUNNING run (a child of ``parent_run_id`` if given) and return its id."""
    c = client(tracking_uri)
    all_tags = _tags(tags)
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = _retry(c.create_run, experiment_id, tags=all_tags, run_name=run_name)
    if params:
        log_params(tracking_uri, run.info.run_id, params)
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict, step: int | None = None,
                model_id: str | None = None) -> None:
    """Log numeric metrics (None and non-numbers are skipped; bools count as 0/1); with `model_id`, they are
    also the metrics of that logged model (the Models view shows them)."""
    c = client(tracking_uri)
    now = int(time.time() * 1000)
    items = []
    for key, value in metrics.items():
        if value is None or isinstance(value, str):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        items.append(Metric(_key(key), number, now, int(step or 0), model_id=model_id))
    for chunk in _chunks(items, 1000):
        _retry(c.log_batch, run_id, metrics=chunk)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """Close a run as FINISHED, FAILED or KILLED; ``reason`` goes to tag lofit.failure_reason."""
    status = status.upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"run status {status!r} is not one of {RUN_STATUSES}")
    c = client(tracking_uri)
    if reason:
        _retry(c.set_tag, run_id, FAILURE_REASON_TAG, _value(reason, _MAX_TAG_VALUE))
    _retry(c.set_terminated, run_id, status)


def close_stopped_run(tracking_uri: str, run_id: str, metrics: dict, epoch: int, reason: str) -> bool:
    """Close a run that is still RUNNING because its trial was stopped early: it ends now, FINISHED (an early
    stop is a scheduling decision, not a failure), with `metrics`, tag lofit.outcome=stopped_early and the
    reason. Returns False when the run had already ended."""
    c = client(tracking_uri)
    if _get_run(c, run_id).info.status != "RUNNING":
        return False
    log_metrics(tracking_uri, run_id, metrics)
    set_tags(tracking_uri, run_id, {OUTCOME_TAG: "stopped_early", "lofit.stop_reason": reason,
                                    "lofit.stopped_epoch": epoch})
    _retry(c.set_terminated, run_id, "FINISHED")
    return True


def close_dangling_runs(tracking_uri: str, parent_run_id: str, reason: str) -> list[str]:
    """Mark descendants of ``parent_run_id`` that are still RUNNING as KILLED (those of a killed driver, or
    any a search left open when it ended), with ``reason``. Returns the ids it closed."""
    closed, frontier, seen = [], [parent_run_id], {parent_run_id}
    while frontier:
        parent = frontier.pop()
        for run in child_runs(tracking_uri, parent):
            rid = run.info.run_id
            if rid in seen:
                continue
            seen.add(rid)
            frontier.append(rid)
            if run.info.status == "RUNNING":
                end_run(tracking_uri, rid, "KILLED", reason)
                closed.append(rid)
    return closed


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    """The active runs whose parent is ``parent_run_id`` (direct children only)."""
    c = client(tracking_uri)
    experiment_id = _get_run(c, parent_run_id).info.experiment_id
    return _search_all(c, [experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")


def _search_all(c: MlflowClient, experiment_ids: list[str], filter_string: str = "",
                order_by: list[str] | None = None) -> list:
    runs, token = [], None
    while True:
        page = c.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                             max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _get_run(c: MlflowClient, run_id: str):
    try:
        return c.get_run(run_id)
    except MlflowException as exc:
        raise ValueError(f"no MLflow run {run_id!r} at {c.tracking_uri}; "
                         f"pick a run id from `lofit-ray heads list`") from exc


# -- head sets ------------------------------------------------------------------------------------

def log_head_set(tracking_uri: str, run_id: str, head_set: HeadSet, k: int | None = None,
                 key: str | None = None) -> None:
    """Log heads/head_set.json and heads/heatmap.png, and tag the run with K, model, task, method.

    With ``k``, the stored set is ``head_set.with_k(k)``; with ``key``, the run is also tagged
    lofit.phase1_key so ``find_head_set`` can reuse it.
    """
    if k is not None and k != head_set.k:
        head_set = head_set.with_k(k)
    shown_k = "all" if head_set.k is None else head_set.k  # a phase-1 ranking has no K yet
    c = client(tracking_uri)
    tmp = Path(tempfile.mkdtemp(prefix="lofit-heads-"))
    try:
        folder = tmp / HEADS_DIR
        folder.mkdir()
        head_set.to_json(folder / HEAD_SET_FILE)
        plot_head_set(head_set, folder / HEATMAP_FILE)
        _retry(c.log_artifacts, run_id, str(folder), HEADS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tags = {HEADS_K_TAG: shown_k, MODEL_TAG: head_set.model, TASK_TAG: head_set.task,
            METHOD_TAG: head_set.method,
            "lofit.heads_shape": f"{head_set.layout['num_layers']}x{head_set.layout['num_heads']}",
            "lofit.fingerprint": head_set.fingerprint}
    if key is not None:
        tags[PHASE1_KEY_TAG] = key
    set_tags(tracking_uri, run_id, tags)


def _download_head_set(c: MlflowClient, run_id: str) -> HeadSet | None:
    tmp = tempfile.mkdtemp(prefix="lofit-heads-")
    try:
        try:
            local = c.download_artifacts(run_id, f"{HEADS_DIR}/{HEAD_SET_FILE}", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return HeadSet.from_json(Path(local).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_head_set(tracking_uri: str, experiment_id: str, key: str) -> HeadSet | None:
    """Phase-1 memo: the head set of the newest FINISHED run tagged lofit.phase1_key = ``key``, or None."""
    c = client(tracking_uri)
    if "'" in key or "\\" in key:
        raise ValueError(f"phase-1 key {key!r} must not contain quotes or backslashes; use a hash")
    ids = experiment_id if isinstance(experiment_id, list) else [experiment_id]
    runs = c.search_runs(ids, filter_string=f"tags.`{PHASE1_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                         run_view_type=ViewType.ACTIVE_ONLY, max_results=20,
                         order_by=["attributes.start_time DESC"])
    for run in runs:
        head_set = _download_head_set(c, run.info.run_id)
        if head_set is not None:
            return head_set
    return None


def finished_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> dict | None:
    """The FINISHED run of this trial in this search, if an earlier driver already completed (or early-stopped)
    it: {"run_id", "metrics", "version", "stopped_epoch"} (None when there is none)."""
    runs = client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`lofit.trial_id` = '{trial_id}' and "
                                       f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        max_results=1)
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "metrics": dict(run.data.metrics),
            "version": run.data.tags.get("lofit.registered_version", ""),
            "stopped_epoch": int(run.data.tags["lofit.stopped_epoch"]) if "lofit.stopped_epoch" in run.data.tags
            else None}


# -- per-item records -------------------------------------------------------------------------------

def log_item_rows(tracking_uri: str, run_id: str, rows: list[dict], name: str) -> None:
    """items/<name>.jsonl, the record `lofit-ray compare` pairs item by item, and items/<name>.table.json,
    the same rows as an MLflow table the UI shows (list cells as JSON text)."""
    from ..evidence import write_rows

    c = client(tracking_uri)
    tmp = Path(tempfile.mkdtemp(prefix="lofit-items-"))
    try:
        _retry(c.log_artifact, run_id, str(write_rows(tmp / f"{name}.jsonl", rows)), ITEMS_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log_rows_table(tracking_uri, run_id, rows, f"{ITEMS_DIR}/{name}.table.json")


def log_file(tracking_uri: str, run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    """One local file (a plot, a table) as an artifact of the run."""
    _retry(client(tracking_uri).log_artifact, run_id, str(path), artifact_dir)


def log_rows_table(tracking_uri: str, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Rows as an MLflow table (the UI's artifact view shows it); list and dict cells as JSON text."""
    columns = list(dict.fromkeys(col for r in rows for col in r))
    table = {col: [json.dumps(r.get(col)) if isinstance(r.get(col), (list, dict)) else r.get(col) for r in rows]
             for col in columns}
    _retry(client(tracking_uri).log_table, run_id, table, artifact_file)


def load_item_rows(tracking_uri: str, ref: str) -> tuple[list[dict], str]:
    """(rows, where) of a recorded evaluation. ref: RUN_ID, runs:/RUN_ID, models:/NAME@ALIAS or
    models:/NAME/VERSION (the version's run), each optionally #RECORD (default: the run's only record,
    else `report`)."""
    from ..evidence import read_rows

    c = client(tracking_uri)
    target, _, record = ref.partition("#")
    run_id = target[len("runs:/"):].strip("/") if target.startswith("runs:/") else target
    if target.startswith("models:/"):
        run_id = _resolve_models_uri(c, target).run_id
    _get_run(c, run_id)
    names = sorted(f.path.rsplit("/", 1)[-1][: -len(".jsonl")] for f in c.list_artifacts(run_id, ITEMS_DIR)
                   if f.path.endswith(".jsonl"))
    if not names:
        raise ValueError(f"{ref}: run {run_id} holds no per-item records ({ITEMS_DIR}/*.jsonl); they are written "
                         f"by searches and by `lofit-ray eval --out`")
    record = record or (names[0] if len(names) == 1 else "report")
    if record not in names:
        raise ValueError(f"{ref}: run {run_id} has no record {record!r}; it has {', '.join(names)} "
                         f"(pick one with {target}#NAME)")
    tmp = Path(tempfile.mkdtemp(prefix="lofit-items-"))
    try:
        path = c.download_artifacts(run_id, f"{ITEMS_DIR}/{record}.jsonl", str(tmp))
        return read_rows(path), f"run {run_id} #{record}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finished_child_run(tracking_uri: str, parent_run_id: str, tag: str, value: str) -> str | None:
    """The id of a FINISHED child run of ``parent_run_id`` tagged ``tag`` = ``value``, or None (for resume)."""
    c = client(tracking_uri)
    experiment_id = _get_run(c, parent_run_id).info.experiment_id
    runs = c.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}' and tags.`{PARENT_RUN_TAG}` = "
                                                        f"'{parent_run_id}' and attributes.status = 'FINISHED'",
                         max_results=1)
    return runs[0].info.run_id if runs else None


# -- for experiments ------------------------------------------------------------------------------------

def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether this store holds run ``run_id`` (and it is not deleted)."""
    try:
        return client(tracking_uri).get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def reopen_run(tracking_uri: str, run_id: str) -> bool:
    """Mark run ``run_id`` RUNNING again (a resumed job logs into it); False when this store lacks it or it is
    deleted."""
    if not run_exists(tracking_uri, run_id):
        return False
    _retry(client(tracking_uri).update_run, run_id, status="RUNNING")
    return True
