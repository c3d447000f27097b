"""Everything MLflow, and only here: runs, metrics, head-set and adapter artifacts, the model registry.

Every function takes the tracking URI and run ids explicitly and talks to MLflow through ``MlflowClient``:
nothing relies on MLflow's global "active run", so the same calls work from the Tune driver, from Ray Train
workers and from the command line.

    store.py     the tracking URI, clients, the SQLite store, experiments, tag names, MLflow's size limits
    runs.py      runs and what they hold: params, tags, metrics, head sets, per-item records
    registry.py  adapters as MLflow models, registered versions, the champion, the `lofit-ray heads` listings
    pyfunc.py    the adapter as an MLflow pyfunc model (what `mlflow.pyfunc.load_model` returns)

Layout of what a trial's run holds:

    heads/head_set.json     the HeadSet (ranking of every head, K, provenance)
    heads/heatmap.png       layers x heads scores, the top K framed
    adapter/                adapter_config.json + offsets.safetensors (Adapter.save_pretrained)

and the run's adapter is also a logged MLflow model (pyfunc; tag lofit.model_id): registry versions point at
it, and the alias ``champion`` marks the version to serve (``models:/lofit-<model>-<task>@champion``).

Errors a person can fix (unknown run, version or experiment; nothing logged yet) raise ValueError naming the
fix; ``lofit_ray.cli.main`` prints them.
"""
from ..paths import lofit_home
from .registry import (best_version, download_adapter, get_champion, list_head_sets, load_head_set, log_adapter,
                       promote, register_adapter, registered_name, set_champion)
from .runs import (child_runs, close_dangling_runs, close_stopped_run, end_run, find_head_set, finished_child_run,
                   finished_trial_run, load_item_rows, log_file, log_head_set, log_item_rows, log_metrics,
                   log_params, log_rows_table, reopen_run, run_exists, set_tags, start_run)
from .store import (ADAPTER_DIR, CHAMPION, EXPERIMENT_KIND_TAG, FAILURE_REASON_TAG, HEADS_DIR, HEADS_K_TAG,
                    HEAD_SET_FILE, HEATMAP_FILE, HPARAM_COLUMNS, ITEMS_DIR, KIND_TAG, MAIN_METRICS,
                    METHOD_TAG, MODEL_ID_TAG, MODEL_TAG, OUTCOME_TAG, PARENT_RUN_TAG, PHASE1_KEY_TAG, RUN_NAME_TAG,
                    RUN_STATUSES, SELECT_FP_TAG, StoreError, TASK_TAG, client, default_artifact_location,
                    ensure_experiment, ensure_store, experiments, flatten_params, resolve_tracking_uri)

__all__ = [
    "best_version", "download_adapter", "get_champion", "list_head_sets", "load_head_set", "log_adapter", "promote",
    "register_adapter", "registered_name", "set_champion", "child_runs", "close_dangling_runs", "close_stopped_run",
    "end_run", "find_head_set", "finished_child_run", "finished_trial_run", "load_item_rows", "log_file",
    "log_head_set", "log_item_rows", "log_metrics", "log_params", "log_rows_table", "reopen_run", "run_exists",
    "set_tags", "start_run", "ADAPTER_DIR", "CHAMPION", "EXPERIMENT_KIND_TAG", "FAILURE_REASON_TAG", "HEADS_DIR",
    "HEADS_K_TAG", "HEAD_SET_FILE", "HEATMAP_FILE", "HPARAM_COLUMNS", "ITEMS_DIR", "KIND_TAG",
    "MAIN_METRICS", "METHOD_TAG", "MODEL_ID_TAG", "MODEL_TAG", "OUTCOME_TAG", "PARENT_RUN_TAG", "PHASE1_KEY_TAG",
    "RUN_NAME_TAG", "RUN_STATUSES", "SELECT_FP_TAG", "StoreError", "TASK_TAG", "client",
    "default_artifact_location", "ensure_experiment", "ensure_store", "experiments", "flatten_params",
    "resolve_tracking_uri", "lofit_home",
]
