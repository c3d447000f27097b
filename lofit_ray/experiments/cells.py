"""The cells of a reproduce run: which K, which (model, task, method, K, seed) and in what order.

A cell is a plain dict {"id", "model", "task", "method", "k", "seed"}; zero_shot has no K and no
seed, lora no K. `cell_setting` hashes the config parts a cell's result depends on, so --resume
re-runs exactly the cells whose setting changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from ..config import REPRODUCE_METHODS as METHODS, ReproduceConfig

PER_K = ("lofit", "iti", "random_heads", "transfer_heads")  # one cell per K and seed, in run order
PHASE2 = ("lofit", "random_heads", "transfer_heads")  # the methods that train offsets with grid.phase2_lr


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
    if "zero_shot" in methods:
        cells += [{"model": model, "task": t, "method": "zero_shot", "k": None, "seed": None} for t in cfg.tasks]
    for seed in cfg.seeds:
        for task in cfg.tasks:
            for k in ks:
                cells += [{"model": model, "task": task, "method": m, "k": k, "seed": seed} for m in per_k]
            if "lora" in methods:
                cells.append({"model": model, "task": task, "method": "lora", "k": None, "seed": seed})
    for c in cells:
        c["id"] = cell_id(c["model"], c["task"], c["method"], c["k"], c["seed"])
    return cells


def cell_setting(cfg: ReproduceConfig, cell: dict) -> str:
    """A hash of the config parts a cell's result depends on: --resume re-runs a cell when it changes.

    The parts keep the names records were first written with (`lofit.*`, `lora.lr`, `training.eval_batch_size`),
    so a record from before the current config shape stays resumable. Left out: what each cell replaces
    (training.seed, phase2.lr, lora.lr) and what changes speed only (phase2.skip_frozen_layers, data_dir).
    """
    def task_part(name):
        t = dataclasses.asdict(cfg.tasks[name])
        del t["data_dir"], t["name"]
        return t

    method = cell["method"]
    part = {"dtype": cfg.dtype, "task": task_part(cell["task"]), "method": method}
    if method != "zero_shot":
        tr = cfg.training
        part["training"] = {"batch_size": tr.batch_size, "max_length": tr.max_length, "dpo_beta": tr.dpo_beta,
                            "eval_batch_size": cfg.eval_batch_size}
    if method in PHASE2:
        p1, p2, grid = cfg.phase1, cfg.phase2, cfg.grid
        part["lofit"] = {"phase1_epochs": p1.epochs, "phase1_lr": p1.lr, "l1": p1.l1, "phase2_epochs": p2.epochs,
                         "phase2_lr": grid.phase2_lr, "phase2_lr_choice": grid.phase2_lr_choice}
    if method == "transfer_heads":
        source = cfg.transfer_source(cell["task"])
        part["source"] = {"task": source, "split": task_part(source)}
    if method == "iti":
        part["iti"] = dataclasses.asdict(cfg.iti)
    if method == "lora":
        part["lora"] = {**dataclasses.asdict(cfg.lora), "lr": cfg.grid.lora_lr}
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]
