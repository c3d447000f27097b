"""Where runs are recorded: the tracking URI, clients, the SQLite store, experiments, the tag names lofit-ray
sets, and MLflow's limits on keys and values (params are flattened and cut to fit)."""
from __future__ import annotations

import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from ..paths import lofit_home


PHASE1_KEY_TAG = "lofit.phase1_key"
FAILURE_REASON_TAG = "lofit.failure_reason"
HPARAM_COLUMNS = ("selector", "phase1_lr", "l1", "phase2_lr")  # the trial params `heads list` shows
RANKING_PARAMS = ("phase1.selector", "phase1.l1", "phase1.lr", "phase1.epochs")  # ... and a phase-1 ranking's
KIND_TAG = "lofit.kind"  # search | phase1 | trial | control | reproduce*: what a run is
MODEL_ID_TAG = "lofit.model_id"  # the run's adapter as an MLflow model (log_adapter)
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
    check_access(uri)
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


CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def check_access(uri: str) -> None:
    """For an MLflow server (http/https): one request with the credentials MLflow itself will send ($MLFLOW_TRACKING_
    USERNAME / _PASSWORD, or $MLFLOW_TRACKING_TOKEN), so that a server that refuses them (HTTP 401 or 403, e.g. a
    `mlflow server --app-name basic-auth`) stops a search before Ray or any trial starts, with a StoreError that
    names the variables. Anything else (unreachable, TLS) is left to MLflow's own calls, retries and messages."""
    if _is_http(uri):
        _check_access(uri, *(os.environ.get(v) for v in (*CREDENTIAL_VARS, "MLFLOW_TRACKING_TOKEN")))


@functools.lru_cache(maxsize=16)
def _check_access(uri: str, username: str | None, password: str | None, token: str | None) -> None:
    """Once per URI and set of credentials in a process (a refusal is not cached)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, timeout=30, raise_on_status=False, params={"max_results": 1})
    except Exception:  # noqa: BLE001 - not an answer from the server: not ours to judge here
        return
    if response.status_code == 401:
        given = [v for v in CREDENTIAL_VARS if os.environ.get(v)]
        raise StoreError(f"the MLflow server at {uri} refused the credentials (HTTP 401): set {CREDENTIAL_VARS[0]} and "
                         f"{CREDENTIAL_VARS[1]} to an account of that server ("
                         + (f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but not accepted"
                            if given else "neither is set") + ")")
    if response.status_code == 403:
        raise StoreError(f"the MLflow server at {uri} lets the account in {CREDENTIAL_VARS[0]} "
                         f"({username or 'unset'}) in but not read experiments (HTTP 403): ask its admin for "
                         f"permission, or use another account")


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

def experiments(tracking_uri: str) -> list[tuple[str, str]]:
    """(id, name) of the store's active experiments but MLflow's empty "Default", for `lofit-ray ui`'s links."""
    return [(e.experiment_id, e.name) for e in client(tracking_uri).search_experiments(view_type=ViewType.ACTIVE_ONLY)
            if e.name != "Default"]


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


# -- registry references (models:/NAME@ALIAS, models:/NAME/VERSION) -----------------------------------

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
