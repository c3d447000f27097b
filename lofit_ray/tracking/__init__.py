"""Everything MLflow: runs, metrics, head-set and adapter artifacts, the model registry.

Every function takes the tracking URI and run ids explicitly and talks to MLflow through
``MlflowClient``: nothing here relies on MLflow's global "active run", so the same calls
work from the Tune driver, from Ray Train workers and from the command line.

Layout of what a run holds:

    heads/head_set.json     the HeadSet (ranking of every head, K, provenance)
    heads/heatmap.png       layers x heads scores, the top K framed
    adapter/                adapter_config.json + offsets.safetensors (Adapter.save_pretrained)

Adapters are plain artifacts, not MLflow "logged models": they are registered with
``create_model_version(source=<run artifact uri>/adapter)`` and the alias ``champion`` marks
the version to serve (``models:/lofit-<model>-<task>@champion``).

Errors a person can fix (unknown run, version or experiment; nothing logged yet) raise
ValueError naming the fix; ``lofit_ray.cli.main`` prints them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ..heads import HeadSet, plot_head_set
from ..paths import lofit_home  # noqa: F401  (the default store lives under it; callers use tracking.lofit_home)

if TYPE_CHECKING:
    from ..adapter import Adapter

PHASE1_KEY_TAG = "lofit.phase1_key"
FAILURE_REASON_TAG = "lofit.failure_reason"
HPARAM_COLUMNS = ("selector", "phase1_lr", "l1", "phase2_lr")  # the trial params `heads list` shows
MODEL_ID_TAG = "lofit.model_id"  # the run's adapter as an MLflow model (log_adapter)
LOGGED_MODEL_NAME = "lofit-adapter"
OUTCOME_TAG = "lofit.outcome"  # completed | stopped_early | failed: how a trial's run ended
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
HEADS_K_TAG = "lofit.heads_k"
MODEL_TAG = "lofit.model"
TASK_TAG = "lofit.task"
METHOD_TAG = "lofit.method"
CHAMPION = "champion"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI to choose its mode
SELECT_FP_TAG = "lofit.select_fp"  # on a model version: the selection split + metric its sel_metric came from
ITEMS_DIR = "items"  # per-item records of a run's evaluations: items/<name>.jsonl
HEADS_DIR = "heads"
HEAD_SET_FILE = "head_set.json"
HEATMAP_FILE = "heatmap.png"
ADAPTER_DIR = "adapter"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# metrics shown first in listings, in this order
MAIN_METRICS = ("val_mc1", "val_mc2", "val_em", "val_em_lenient", "sel_metric", "test_mc1", "test_mc2", "test_em")

# MLflow's limits (mlflow.utils.validation): params 6000 chars, tags 8000, keys 250, 100 params/tags per batch
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_KEY = 250
_BATCH = 100
_TRUNCATED = "...[truncated]"


# -- URIs, clients, experiments ------------------------------------------------------------------

def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/cwd/relative.db, so every process opens the same file."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////") or uri == "sqlite:///:memory:":
        return uri
    rest = uri[len("sqlite:///"):]
    path, sep, query = rest.partition("?")
    return "sqlite:///" + str(Path(path).resolve()) + sep + query


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].partition("?")[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else sqlite:///$LOFIT_HOME/mlflow.db; also sets it globally.

    The default store lives in $LOFIT_HOME (default ~/.lofit-ray), not the cwd, so `python jobs/search.py`,
    `ray job submit --working-dir .` (whose driver runs in a temporary copy) and `lofit-ray heads` all
    read and write the same store.

    A bare path to a .db file becomes a sqlite URI; relative sqlite paths become absolute.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{lofit_home() / 'mlflow.db'}"
    if "://" not in uri and uri.endswith((".db", ".sqlite", ".sqlite3")):
        uri = f"sqlite:///{Path(uri).resolve()}"
    uri = _absolute_sqlite(uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client whose tracking and registry both live at the tracking URI (no global state consulted)."""
    uri = _absolute_sqlite(tracking_uri) if tracking_uri else resolve_tracking_uri()
    return _client(uri)


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    """One client per URI and process: building one opens the store (about 0.7 s for SQLite)."""
    ensure_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class StoreError(RuntimeError):
    """The MLflow store cannot be used as it is; the message says why and what to do."""


def ensure_store(uri: str) -> None:
    """Create a SQLite store completely, or check an existing one, before anything writes to it.

    A new store is built and migrated in a temporary file beside it and renamed into place under a
    file lock, so a process killed at any moment leaves either no store or a complete one, and two
    processes never migrate the same file at once (which left `_alembic_tmp_*` tables behind). A
    store an interrupted migration left half done is refused with the fix. Other URIs are servers
    or databases that manage their own schema.
    """
    import fcntl

    from .. import faults

    db = _sqlite_path(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in db.parent.glob(f".{db.name}.creating-*"):  # left by a creator that was killed
            stale.unlink(missing_ok=True)
        if db.is_file() and db.stat().st_size > 0:
            _check_store(db)
            return
        tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = SqlAlchemyStore(f"sqlite:///{tmp}", default_artifact_root=(db.parent / "mlartifacts").as_uri())
            store.engine.dispose()
            faults.kill_point("driver.kill", at="store_created")
            os.replace(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)


def _check_store(db: Path) -> None:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            tables = [row[0] for row in conn.execute("select name from sqlite_master where type='table'")]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{db} is not a readable SQLite database ({exc}); point --tracking-uri elsewhere or move "
                         f"the file away") from exc
    half = [t for t in tables if t.startswith("_alembic_tmp_")]
    if half:
        raise StoreError(f"{db}: an MLflow schema migration was interrupted (table {half[0]} is left over); "
                         f"restore a backup of the file, or drop that table and run `mlflow db upgrade "
                         f"sqlite:///{db}`")


def _retry(fn, *args, attempts: int = 6, **kwargs):
    """Run an MLflow write, retrying when several processes hit one sqlite file at once."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "default"


def default_artifact_location(name: str, tracking_uri: str) -> str | None:
    """Where an experiment's artifacts go unless told: beside a sqlite .db; the server's choice for http."""
    if _is_http(tracking_uri):
        return None
    db = _sqlite_path(tracking_uri)
    base = db.parent if db is not None else Path.cwd().resolve()
    return (base / "mlartifacts" / _safe_name(name)).as_uri()


def ensure_experiment(name: str, tracking_uri: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created with an explicit artifact location if missing."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = artifact_root
        if location is not None and "://" not in location:
            location = Path(location).resolve().as_uri()
        if location is None:
            location = default_artifact_location(name, tracking_uri)
        try:
            # tagged as model training: MLflow 3's UI would otherwise open it in GenAI mode ("Evaluations")
            return _retry(c.create_experiment, name, artifact_location=location,
                          tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException as exc:  # another worker created it first
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise ValueError(f"cannot create MLflow experiment {name!r} at {tracking_uri}: {exc}") from exc
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _experiment_ids(c: MlflowClient, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    exp = c.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = c.get_experiment(experiment)
        except MlflowException:
            exp = None
    if exp is None:
        names = sorted(e.name for e in c.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r} at {c.tracking_uri}; "
                         f"pass --experiment one of {names or '(none yet: run `lofit-ray search` first)'}")
    return [exp.experiment_id]


# -- params, tags, metrics -----------------------------------------------------------------------

def _key(key: Any) -> str:
    key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))
    return key[:_MAX_KEY]


def _value(value: Any, limit: int) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, sort_keys=isinstance(value, dict))
    else:
        text = str(value)
    if len(text) > limit:
        text = text[:limit - len(_TRUNCATED)] + _TRUNCATED
    return text


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": "1", "c": "[1, 2]"}, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[_key(name)] = _value(value, _MAX_PARAM_VALUE)
    return flat


def _tags(tags: dict | None) -> dict[str, str]:
    return {_key(k): _value(v, _MAX_TAG_VALUE) for k, v in (tags or {}).items() if v is not None}


def _chunks(items: list, size: int = _BATCH) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


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


# -- adapters and the registry ----------------------------------------------------------------------

def log_adapter(tracking_uri: str, run_id: str, adapter: "Adapter") -> str:
    """Log the adapter twice over: its files under the run's adapter/, and an MLflow model (pyfunc, see
    tracking/pyfunc.py) in the experiment's Models view with the adapter's params (`log_metrics` with its
    model_id links metrics to it). Returns the model's id (the run's tag lofit.model_id), which
    `register_adapter` points versions at."""
    from . import pyfunc

    c = client(tracking_uri)
    run = _get_run(c, run_id)
    tmp = Path(tempfile.mkdtemp(prefix="lofit-adapter-"))
    try:
        adapter.save_pretrained(tmp / ADAPTER_DIR)
        _retry(c.log_artifacts, run_id, str(tmp / ADAPTER_DIR), ADAPTER_DIR)
        pyfunc.save(tmp / "model", tmp / ADAPTER_DIR, adapter.config.task)
        heads = " ".join(f"L{layer}.H{head}" for layer, head in adapter.config.heads)
        params = flatten_params({"base_model": adapter.config.base_model, "task": adapter.config.task,
                                 "method": adapter.config.method, "k": len(adapter.config.heads), "heads": heads,
                                 **adapter.config.hparams})
        # not named ADAPTER_DIR: MLflow 3 resolves runs:/RUN/<name> to a logged model of that name first
        model = _retry(c.create_logged_model, run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                       params=params, tags={"lofit.fingerprint": adapter.config.fingerprint},
                       model_type="lofit-adapter")
        _retry(c.log_model_artifacts, model.model_id, str(tmp / "model"))
        _retry(c.finalize_logged_model, model.model_id, "READY")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    set_tags(tracking_uri, run_id, {"lofit.adapter_heads": len(adapter.config.heads), "lofit.heads": heads,
                                    "lofit.adapter_parameters": adapter.num_parameters,
                                    MODEL_ID_TAG: model.model_id})
    return model.model_id


def registered_name(model_spec: str, task: str) -> str:
    """"lofit-<model>-<task>", lower case, [a-z0-9-] only; paths contribute their basename."""
    base = Path(str(model_spec).rstrip("/\\")).name or str(model_spec)
    base = re.sub(r"\.(gguf|safetensors|bin|pt)$", "", base, flags=re.IGNORECASE)
    parts = ["lofit", base, task]
    slug = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return re.sub(r"-+", "-", slug).strip("-")


def register_adapter(tracking_uri: str, name: str, run_id: str, tags: dict) -> str:
    """Register the run's adapter/ artifacts as a new version of ``name`` (created if missing)."""
    c = client(tracking_uri)
    run = _get_run(c, run_id)
    if not any(f.path.endswith("adapter_config.json") for f in c.list_artifacts(run_id, ADAPTER_DIR)):
        raise ValueError(f"run {run_id} has no {ADAPTER_DIR}/ artifacts; call log_adapter before registering")
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            _retry(c.create_registered_model, name, description="LoFiT adapters (head list + offsets)")
        except MlflowException:  # created meanwhile by another process
            c.get_registered_model(name)
    model_id = run.data.tags.get(MODEL_ID_TAG)  # runs logged before adapters were MLflow models have none
    # the model's own artifact location: a models:/ source would make MLflow resolve it with the process-wide
    # tracking URI, which need not be this store's
    source = c.get_logged_model(model_id).artifact_location if model_id else f"{run.info.artifact_uri}/{ADAPTER_DIR}"
    version = _retry(c.create_model_version, name, source=source, run_id=run_id, tags=_tags(tags),
                     model_id=model_id)
    if model_id:  # how MLflow's UI links a logged model to its versions (as mlflow.register_model does)
        _retry(c.set_logged_model_tags, model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [{"name": name, "version": str(version.version)}])})
    return str(version.version)


def _registered_model(c: MlflowClient, name: str):
    try:
        return c.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in c.search_registered_models())
        raise ValueError(f"no registered model {name!r} at {c.tracking_uri}; "
                         f"registered: {names or '(none yet: run `lofit-ray search` first)'}") from exc


def _model_version(c: MlflowClient, name: str, version: str):
    _registered_model(c, name)
    try:
        return c.get_model_version(name, str(version))
    except MlflowException as exc:
        versions = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")))
        raise ValueError(f"{name} has no version {version}; versions: {versions} "
                         f"(see `lofit-ray heads list`)") from exc


def best_version(tracking_uri: str, name: str, tag: str = "sel_metric",
                 select_fingerprint: str | None = None) -> tuple[str, str] | None:
    """(version, run_id) of the registered version with the highest numeric ``tag``, or None.

    With ``select_fingerprint``, only versions scored on that same selection split and metric (tag
    lofit.select_fp) compete: a score on another split or metric is not comparable, however high."""
    c = client(tracking_uri)
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    best = None
    for v in versions:
        if select_fingerprint is not None and v.tags.get(SELECT_FP_TAG) != select_fingerprint:
            continue
        try:
            score = float(v.tags.get(tag, "nan"))
        except ValueError:
            continue
        if not math.isnan(score) and (best is None or score > best[0]):
            best = (score, str(v.version), v.run_id)
    return best[1:] if best else None


def get_champion(tracking_uri: str, name: str):
    """The ModelVersion that alias ``champion`` points at, or None (also None if ``name`` is unknown).

    Note: MLflow's sqlite store gives ``.version`` as an int, the REST store as a str; compare str(...).
    """
    c = client(tracking_uri)
    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def set_champion(tracking_uri: str, name: str, version: str | int) -> str | None:
    """Point alias ``champion`` of ``name`` at ``version``; return the previous champion's version."""
    c = client(tracking_uri)
    _model_version(c, name, str(version))
    old = get_champion(tracking_uri, name)
    _retry(c.set_registered_model_alias, name, CHAMPION, str(version))
    return None if old is None else str(old.version)


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))(?P<path>/.*)?$")


def _resolve_models_uri(c: MlflowClient, uri: str):
    m = _MODELS_URI.match(uri)
    if not m:
        raise ValueError(f"cannot parse {uri!r}; use models:/NAME@ALIAS or models:/NAME/VERSION")
    if m["alias"]:
        _registered_model(c, m["name"])
        try:
            return c.get_model_version_by_alias(m["name"], m["alias"])
        except MlflowException as exc:
            raise ValueError(f"{m['name']} has no alias {m['alias']!r}; "
                             f"set one with `lofit-ray heads promote {m['name']} VERSION`") from exc
    return _model_version(c, m["name"], m["version"])


def download_adapter(uri: str, tracking_uri: str | None = None, dst_path: str | Path | None = None) -> Path:
    """Fetch an adapter from models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID[/adapter];
    return a local directory holding adapter_config.json.

    A models:/ URI is resolved to its version's run with this store's own client, then that run's files are
    downloaded: no process-wide MLflow URI is read or set (MLflow's own models:/ download uses the global
    registry URI, which another store may have set).
    """
    tracking_uri = _absolute_sqlite(tracking_uri) if tracking_uri else resolve_tracking_uri()
    c = client(tracking_uri)
    if uri.startswith("models:/"):
        version = _resolve_models_uri(c, uri)  # clear errors for unknown names, versions, aliases
        if not version.run_id:
            raise ValueError(f"{uri} was registered without a run; lofit-ray registers adapters from runs")
        run_id, path = version.run_id, ADAPTER_DIR
    elif uri.startswith("runs:/"):
        parts = uri[len("runs:/"):].strip("/").split("/", 1)
        run_id, path = parts[0], parts[1] if len(parts) > 1 else ADAPTER_DIR
        _get_run(c, run_id)
    else:
        raise ValueError(f"{uri!r} is not an MLflow URI; use models:/NAME@champion, models:/NAME/VERSION "
                         f"or runs:/RUN_ID/adapter (or pass a local adapter directory)")
    dst = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="lofit-adapter-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(c.download_artifacts(run_id, path, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise ValueError(f"cannot download {uri} from {tracking_uri}: {exc}") from exc
    for candidate in (local, local / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ValueError(f"{uri} holds no adapter_config.json (got {sorted(p.name for p in local.iterdir())}); "
                     f"it is not an adapter logged by lofit-ray")


# -- for `lofit-ray heads` ------------------------------------------------------------------------------

def _versions_by_run(c: MlflowClient) -> dict[str, list]:
    by_run: dict[str, list] = {}
    versions, token = [], None
    while True:
        page = c.search_model_versions(max_results=10000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    for v in versions:
        if v.run_id:
            by_run.setdefault(v.run_id, []).append(v)
    return by_run


def _aliases(c: MlflowClient, version) -> list[str]:
    if version.aliases:
        return list(version.aliases)
    try:  # some stores leave aliases off search results
        return list(c.get_model_version(version.name, version.version).aliases or [])
    except MlflowException:
        return []


def list_head_sets(tracking_uri: str, experiment: str | None = None, model: str | None = None,
                   task: str | None = None) -> list[dict]:
    """Runs that logged a head set, newest first, with their metrics and registered versions."""
    c = client(tracking_uri)
    ids = _experiment_ids(c, experiment)
    if not ids:
        return []
    filters = [f"tags.`{HEADS_K_TAG}` LIKE '%'"]
    for tag, value in ((MODEL_TAG, model), (TASK_TAG, task)):
        if value:
            if "'" in value:
                raise ValueError(f"{value!r}: quotes are not allowed in filters")
            filters.append(f"tags.`{tag}` = '{value}'")
    runs = _search_all(c, ids, " and ".join(filters), order_by=["attributes.start_time DESC"])
    names = {e.experiment_id: e.name for e in c.search_experiments(view_type=ViewType.ALL)}
    by_run = _versions_by_run(c) if runs else {}
    rows = []
    for run in runs:
        tags = run.data.tags
        versions = sorted(by_run.get(run.info.run_id, []), key=lambda v: (v.name, int(v.version)))
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment": names.get(run.info.experiment_id, run.info.experiment_id),
            "status": run.info.status,
            "start_time": run.info.start_time,
            "parent_run_id": tags.get(PARENT_RUN_TAG),
            "model": tags.get(MODEL_TAG, ""),
            "task": tags.get(TASK_TAG, ""),
            "method": tags.get(METHOD_TAG, ""),
            "kind": tags.get("lofit.kind") or ("phase1" if not tags.get(HEADS_K_TAG, "").isdigit() else ""),
            "k": int(tags[HEADS_K_TAG]) if tags.get(HEADS_K_TAG, "").isdigit() else None,
            "params": {k: run.data.params[k] for k in HPARAM_COLUMNS if k in run.data.params},
            "phase1_key": tags.get(PHASE1_KEY_TAG),
            "metrics": dict(run.data.metrics),
            "registered": [{"name": v.name, "version": str(v.version), "aliases": _aliases(c, v)}
                           for v in versions],
        })
    return rows


def _adapter_head_set(c: MlflowClient, run_id: str) -> HeadSet | None:
    """A head set built from a run's adapter (its heads, ranked by offset norm) when no head set was logged."""
    from ..adapter import Adapter

    tmp = tempfile.mkdtemp(prefix="lofit-adapter-")
    try:
        try:
            local = c.download_artifacts(run_id, ADAPTER_DIR, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        adapter = Adapter.from_pretrained(local)
    except FileNotFoundError:
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cfg = adapter.config
    norms = adapter.offset.norm(dim=-1).tolist()
    ranking = sorted(([int(l), int(h), float(n)] for (l, h), n in zip(cfg.heads, norms)), key=lambda r: -r[2])
    return HeadSet(model=cfg.base_model, fingerprint=cfg.fingerprint, layout=cfg.layout, ranking=ranking,
                   k=len(ranking), method=cfg.method, task=cfg.task, hparams={"from": "adapter offsets norm"},
                   seed=int(cfg.head_set.get("seed", 0)))


def load_head_set(tracking_uri: str, ref: str) -> HeadSet:
    """A head set from a run id, runs:/RUN_ID, models:/NAME@ALIAS or models:/NAME/VERSION (that
    version's run), or a local JSON file."""
    ref = str(ref)
    if ref.endswith(".json") or Path(ref).is_file():
        return HeadSet.from_json(Path(ref))
    c = client(tracking_uri)
    if ref.startswith("models:/"):
        run_id = _resolve_models_uri(c, ref).run_id
        if not run_id:
            raise ValueError(f"{ref} was registered without a run, so it has no head set")
    elif ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].strip("/").split("/")[0]
    else:
        run_id = ref
    _get_run(c, run_id)
    head_set = _download_head_set(c, run_id) or _adapter_head_set(c, run_id)
    if head_set is None:
        raise ValueError(f"run {run_id} logged neither heads/{HEAD_SET_FILE} nor an adapter; "
                         f"pick a run from `lofit-ray heads list`")
    return head_set


# -- for the CLI

def promote(tracking_uri: str, name: str, version: str | int) -> dict:
    """Point ``name``@champion at ``version`` (`lofit-ray heads promote`); return what changed:
    {"name", "old_version" (None if unset), "version", "run_id", "metrics" (the run's val_/test_/sel_ ones)}."""
    old = set_champion(tracking_uri, name, version)
    c = client(tracking_uri)
    mv = _model_version(c, name, str(version))
    metrics = {}
    if mv.run_id:
        metrics = {k: v for k, v in _get_run(c, mv.run_id).data.metrics.items()
                   if k.startswith(("val_", "test_", "sel_"))}
    return {"name": name, "old_version": old, "version": str(mv.version), "run_id": mv.run_id, "metrics": metrics}


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
