"""The cells of a reproduce run: which K, which (model, task, method, K, seed) and in what order.

A cell is a plain dict {"id", "model", "task", "method", "k", "seed"}; zero_shot has no K and no
seed, lora and reft no K. `cell_setting` hashes the config parts a cell's result depends on, so --resume
re-runs exactly the cells whose setting changed.
"""
from __future__ import annotations

import math

from ..config import ReproduceConfig
from ..methods import METHODS, HeadMethod
from ..methods.setting import method_setting, setting_hash, task_part

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


def search_setting(cfg: ReproduceConfig, task: str, method: str) -> str:
    """A hash of what a method's search (and so every cell it serves) depends on: --resume searches again
    and re-runs the cells when it changes (lofit_ray.methods.setting)."""
    return method_setting(cfg, task, METHODS[method])


def cell_setting(cfg: ReproduceConfig, cell: dict) -> str:
    """A hash of the config parts a cell's result depends on: --resume re-runs a cell when it changes."""
    if not METHODS[cell["method"]].searched:
        return setting_hash({"dtype": cfg.dtype, "task": task_part(cfg, cell["task"]), "method": cell["method"],
                      "eval_batch_size": cfg.eval_batch_size})
    return search_setting(cfg, cell["task"], cell["method"])
