"""What a method's search depends on, as a hash: --resume searches again (and re-runs the cells the search
serves) when it changes. It lives beside the methods because a method's own part of it may hold another
method's setting (transfer_heads hashes the LoFiT search of its source task); lofit_ray.experiments.cells looks
methods up by name and asks here, so the methods never reach back into the cell plan."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from ..config import ReproduceConfig, TaskConfig
from ..config.sections import USER_TASK_FIELDS
from .base import Method


def task_part(cfg: ReproduceConfig, name: str) -> dict:
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


def setting_hash(part: dict) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def method_setting(cfg: ReproduceConfig, task: str, method: Method) -> str:
    """A hash of what a method's search (and so every cell it serves) depends on. Left out: what changes speed
    only (phase2.skip_frozen_layers, data_dir) and the seeds the cells retrain with."""
    tr, search = cfg.training, cfg.search
    part = {"dtype": cfg.dtype, "task": task_part(cfg, task), "method": method.name,
            "training": {"batch_size": tr.batch_size, "max_length": tr.max_length, "dpo_beta": tr.dpo_beta,
                         "eval_batch_size": cfg.eval_batch_size},
            "search": {"num_trials": search.num_trials, "seed": search.seed, "metric": search.metric,
                       "asha": search.asha, "reduction_factor": search.reduction_factor,
                       # no search: the values it trains at; else the space it searches
                       **({"space": dataclasses.asdict(getattr(search.spaces, method.name))} if search.num_trials else
                          {"fixed": method.fixed_params(cfg)}),
                       # added later: in the hash only when set, so records run before it stay done
                       **({"grace_period": search.grace_period} if search.grace_period != 1 else {})}}
    part.update(method.setting_part(cfg, task))
    return setting_hash(part)
