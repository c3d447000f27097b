"""Experiments over the whole method: `jobs/reproduce.py`'s comparison of LoFiT with its baselines.

cells: which cells a config plans and the setting each depends on; tuning: one method's search (Optuna
TPE + ASHA, resumable); record: the reproduce.json record and its Markdown table; runner: the Runner that
searches, runs the cells and keeps the record; caches: the splits and phase-1 rankings it reuses across cells;
mlflow_runs: its MLflow runs (parent, searches, cells, the backfill from the record); curve: the learning curve
over records.
The config is `lofit_ray.config.ReproduceConfig`.
"""
from .cells import METHODS, cell_id, cell_setting, k_values, plan_cells
from .record import JSON_NAME, MD_NAME, Results, render_comparisons, render_markdown, write_atomic
from .runner import Runner, default_out_dir

__all__ = ["JSON_NAME", "MD_NAME", "METHODS", "Results", "Runner", "cell_id", "cell_setting", "default_out_dir",
           "k_values", "plan_cells", "render_comparisons", "render_markdown", "write_atomic"]
