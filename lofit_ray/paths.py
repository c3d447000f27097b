"""Where lofit-ray keeps things on this machine, in one place.

- $LOFIT_HOME (default ~/.lofit-ray): the default MLflow store, Optuna study, Ray results, and task data
  fetched by `lofit-ray data fetch` (under data/) when no other data dir is set;
- $LOFIT_CACHE_DIR (default ~/.cache/lofit-ray): what is built once and reused: converted models, the
  `datasets` cache, DPO reference log-probs. A cluster can point every node at shared storage.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LOFIT_CACHE_DIR"


def lofit_home() -> Path:
    return Path(os.environ.get("LOFIT_HOME") or Path.home() / ".lofit-ray").expanduser().resolve()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lofit-ray").expanduser()
