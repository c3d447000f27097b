"""Adapters as MLflow models, the registry and its champion, and the listings behind `lofit-ray heads`."""
from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ..heads import HeadSet
from .runs import _download_head_set, _get_run, _search_all, set_tags
from .store import (ADAPTER_DIR, CHAMPION, HEAD_SET_FILE, HEADS_K_TAG, HPARAM_COLUMNS, KIND_TAG, METHOD_TAG,
                    MODEL_ID_TAG, MODEL_TAG, PARENT_RUN_TAG, PHASE1_KEY_TAG, RANKING_PARAMS, SELECT_FP_TAG, TASK_TAG,
                    _absolute_sqlite, client, _experiment_ids, flatten_params, _model_version, _resolve_models_uri,
                    resolve_tracking_uri, _retry, _tags)

if TYPE_CHECKING:
    from ..adapter import Adapter


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
        pyfunc.save(tmp / "model", tmp / ADAPTER_DIR, pyfunc.eval_kind(adapter.config))
        heads = " ".join(f"L{layer}.H{head}" for layer, head in adapter.config.heads)
        params = flatten_params({"base_model": adapter.config.base_model, "task": adapter.config.task,
                                 "method": adapter.config.method, "k": len(adapter.config.heads), "heads": heads,
                                 **adapter.config.hparams})
        model = _retry(c.create_logged_model, run.info.experiment_id, name=logged_model_name(adapter.config),
                       source_run_id=run_id, params=params, tags={"lofit.fingerprint": adapter.config.fingerprint},
                       model_type="lofit-adapter")
        _retry(c.log_model_artifacts, model.model_id, str(tmp / "model"))
        _retry(c.finalize_logged_model, model.model_id, "READY")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    set_tags(tracking_uri, run_id, {"lofit.adapter_heads": len(adapter.config.heads), "lofit.heads": heads,
                                    "lofit.adapter_parameters": adapter.num_parameters,
                                    MODEL_ID_TAG: model.model_id})
    return model.model_id


def logged_model_name(config) -> str:
    """What the Models view lists an adapter as, method and K first so a narrow column still shows them
    ("lofit-k16-smollm2-135m", "random-k16-smollm2-135m"; the task is a param beside it). Never ADAPTER_DIR:
    MLflow 3 resolves runs:/RUN/<name> to a logged model of that name before the run's artifacts."""
    return f"{config.method}-k{len(config.heads)}-{_model_slug(config.base_model)}"


def registered_name(model_spec: str, task: str) -> str:
    """"lofit-<model>-<task>", lower case, [a-z0-9-] only; paths contribute their basename."""
    return "-".join(part for part in ("lofit", _model_slug(model_spec), _slug(task)) if part)


def _model_slug(model_spec: str) -> str:
    base = Path(str(model_spec).rstrip("/\\")).name or str(model_spec)
    return _slug(re.sub(r"\.(gguf|safetensors|bin|pt)$", "", base, flags=re.IGNORECASE))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


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


def best_version(tracking_uri: str, name: str, tag: str = "sel_metric",
                 select_fingerprint: str | None = None) -> tuple[str, str] | None:
    """(version, run_id) of the registered version with the highest numeric ``tag``, or None; a tie goes to
    the earlier version (lofit_ray.tuning: the earlier trial wins a tie).

    With ``select_fingerprint``, only versions scored on that same selection split and metric (tag
    lofit.select_fp) compete: a score on another split or metric is not comparable, however high."""
    c = client(tracking_uri)
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    best = None
    for v in sorted(versions, key=lambda v: int(v.version)):
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
            "kind": tags.get(KIND_TAG) or ("phase1" if not tags.get(HEADS_K_TAG, "").isdigit() else ""),
            "k": int(tags[HEADS_K_TAG]) if tags.get(HEADS_K_TAG, "").isdigit() else None,
            "params": {k: run.data.params[k] for k in (*HPARAM_COLUMNS, *RANKING_PARAMS) if k in run.data.params},
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
