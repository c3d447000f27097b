"""What a search process keeps across trials: loaded models and read splits, by what they were built from.

The search's trials and its closing report (lofit_ray.report) both read through here, so a model or a split is
loaded once per process when the search is cost-aware (search.cost_aware).
"""
from __future__ import annotations

import json

import torch

from .config import SearchJobConfig
from .models import load_model
from .split_specs import split_spec, splits_from_spec

_CACHE: dict = {}  # per-process: loaded models and splits, kept across trials when cost-aware


def task_spec(cfg: SearchJobConfig, model: str | None = None) -> dict:
    """What a worker needs to rebuild the same splits (split_specs.split_spec)."""
    return split_spec(cfg.task, model)


def get_splits(spec: dict, cache: bool = True):
    key = ("splits", json.dumps(spec, sort_keys=True))
    if cache and key in _CACHE:
        return _CACHE[key]
    value = splits_from_spec(spec)
    if cache:
        _CACHE[key] = value
    return value


def get_model(spec: str, dtype: str, cache: bool = True, attn_implementation: str = "auto"):
    key = ("model", spec, dtype, attn_implementation)
    if cache and key in _CACHE:
        return _CACHE[key]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU Ray gave this trial is used, whatever the dtype
    loaded = load_model(spec, dtype=dtype, device=device, attn_implementation=attn_implementation)
    if cache:
        _CACHE[key] = loaded
    return loaded
