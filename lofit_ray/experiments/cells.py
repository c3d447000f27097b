"""The cells of a reproduce run: which K, which (model, task, method, K, seed) and in what order.

A cell is a plain dict {"id", "model", "task", "method", "k", "seed"}; zero_shot has no K and no
seed, lora and reft no K. `cell_setting` hashes the config parts a cell's result depends on, so --resume
re-runs exactly the cells whose setting changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from ..config import ReproduceConfig, TaskConfig
from ..config.sections import USER_TASK_FIELDS
from ..methods import METHODS, HeadMethod

PER_K = tuple(name for name, m in METHODS.items() if m.per_k)  # one cell per K and seed, in run order
PHASE2 = tuple(name for name, m in METHODS.items() if isinstance(m, HeadMethod))  # the methods that train offsets
# The methods whose heads come from a selector of lofit_ray.selectors (phase1.selector), and which one.
SELECTOR_OF = {name: m.selector for name, m in METHODS.items() if m.selector}


def k_values(fractions: list[float], total_heads: int) -> list[int]:
    """K for each fraction of the heads: rounded half up, at least 1, duplicates merged, ascending."""
    return sorted({min(total_heads, max(1, math.floor(f * total_heads + 0.5))) for f in fractions})


def cell_id(model: str, task: str, method: str, k: int | None, seed: int | None) -> str:
    return f"{model}|{task}|{method}|k={'-' if k is None else k}|seed={'-' if seed is None else seed}"


def plan_cells(cfg: ReproduceConfig, model: str, ks: list[int]) -> list[dict]:
    """Every cell of one model, in run order."""
    cells = []
    methods = [m for m in METHODS if m in cfg.methods]
    per_k = [m for m in PER_K if m in methods]
    for task in cfg.tasks:  # task by task, so a partial record holds whole tasks
        cells += [{"model": model, "task": task, "method": m, "k": None, "seed": None}
                  for m in methods if not METHODS[m].seeded]
        for seed in cfg.seeds:
            for k in ks:
                cells += [{"model": model, "task": task, "method": m, "k": k, "seed": seed} for m in per_k]
            cells += [{"model": model, "task": task, "method": m, "k": None, "seed": seed}
                      for m in methods if METHODS[m].seeded and not METHODS[m].per_k]
    for c in cells:
        c["id"] = cell_id(c["model"], c["task"], c["method"], c["k"], c["seed"])
    return cells


def search_id(model: str, task: str, method: str, k: int | None) -> str:
    """One search per model x task x method x K; its chosen setting serves every seed of that cell."""
    return f"{model}|{task}|{method}|k={'-' if k is None else k}"


def _task_part(cfg: ReproduceConfig, name: str) -> dict:
    """The task config a cell's result depends on. Where the data lives is not part of it (the split hashes
    in the record are); a `source` is, since it may hold other rows than the data dir's files."""
    t = dataclasses.asdict(cfg.tasks[name])
    del t["data_dir"], t["name"]
    defaults = dataclasses.asdict(TaskConfig())
    for key in USER_TASK_FIELDS:  # at their defaults (the paper's tasks) they leave the setting as it was
        if t[key] == defaults[key]:
            del t[key]
    if t["source"] is None:  # the data dir's files, as before `source` existed: settings stay the same
        del t["source"]
    return t


def _hash(part: dict) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def search_setting(cfg: ReproduceConfig, task: str, method: str) -> str:
    """A hash of what a method's search (and so every cell it serves) depends on: --resume searches again
    and re-runs the cells when it changes. Left out: what changes speed only (phase2.skip_frozen_layers,
    data_dir) and the seeds the cells retrain with."""
    tr, search = cfg.training, cfg.search
    part = {"dtype": cfg.dtype, "task": _task_part(cfg, task), "method": method,
            "training": {"batch_size": tr.batch_size, "max_length": tr.max_length, "dpo_beta": tr.dpo_beta,
                         "eval_batch_size": cfg.eval_batch_size},
            "search": {"num_trials": search.num_trials, "seed": search.seed, "metric": search.metric,
                       "asha": search.asha, "reduction_factor": search.reduction_factor,
                       # no search: the values it trains at; else the space it searches
                       **({"space": dataclasses.asdict(getattr(search.spaces, method))} if search.num_trials else
                          {"fixed": METHODS[method].fixed_params(cfg)}),
                       # added later: in the hash only when set, so records run before it stay done
                       **({"grace_period": search.grace_period} if search.grace_period != 1 else {})}}
    part.update(METHODS[method].setting_part(cfg, task))
    return _hash(part)


def cell_setting(cfg: ReproduceConfig, cell: dict) -> str:
    """A hash of the config parts a cell's result depends on: --resume re-runs a cell when it changes."""
    if not METHODS[cell["method"]].searched:
        return _hash({"dtype": cfg.dtype, "task": _task_part(cfg, cell["task"]), "method": cell["method"],
                      "eval_batch_size": cfg.eval_batch_size})
    return search_setting(cfg, cell["task"], cell["method"])
