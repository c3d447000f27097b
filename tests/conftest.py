"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (where behaviour depends on it).

The session is isolated from the user's own state (see `isolated_env`): everything it writes goes under
one temp dir, removed at the end together with any Ray cluster the session left running there, and
nothing else is stopped. Only the model conversion caches ($LOFIT_CACHE_DIR/models and /gguf, default
~/.cache/lofit-ray) stay shared, on purpose: converting SmolLM2 takes minutes and their entries are keyed by
the source file. Everything else under $LOFIT_CACHE_DIR (the `datasets` Arrow cache, which fuzzed files would
fill) lives in the session's root.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from lofit_ray.paths import CACHE_ENV, cache_dir

# What a user's shell may point at their own services; the test session inherits none of it.
USER_ONLY_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI",
                  "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                  "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# The parts of $LOFIT_CACHE_DIR a session shares with the user (expensive, keyed by their source): models.py
SHARED_CACHES = ("models", "gguf")


def under_ci() -> bool:
    """CI=true (GitHub Actions, GitLab, most CI systems set it): skips that hide a missing part fail instead."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip here, fail under CI: for a part of the project (schemas, configs, data files, an importable
    module) that is missing. A truly optional tool that is absent keeps a plain pytest.skip/importorskip."""
    __tracebackhide__ = True  # -ra reports the caller's line, not this one
    if under_ci():
        pytest.fail(f"CI=true, so this does not skip: {reason}", pytrace=False)
    pytest.skip(reason)


def isolated_cache(root: Path, shared: Path) -> Path:
    """root/cache as $LOFIT_CACHE_DIR, its models/ and gguf/ linked to `shared`'s (created if missing), so
    a session reuses and adds converted models but writes nothing else into the user's cache."""
    cache = root / "cache"
    cache.mkdir(exist_ok=True)
    for name in SHARED_CACHES:
        (shared / name).mkdir(parents=True, exist_ok=True)
        link = cache / name
        if not link.is_symlink():
            link.symlink_to(shared / name, target_is_directory=True)
    return cache


def isolated_env(env: dict, root: str | os.PathLike) -> dict:
    """`env` with the session's isolation under `root` (a short path: Ray's socket paths must fit 107 chars),
    which gets a fresh Ray auth token file.

    - LOFIT_HOME (default MLflow store, ray_results) and the DPO reference-log-prob cache live under root;
    - RAY_TMPDIR=root: Ray's temp dir is root/ray, so an address-less `ray.init()` reads root/ray/
      ray_current_cluster and starts its own local cluster; it never finds a cluster the user started with
      `ray start` (whose address is in /tmp/ray), and the session's own `ray start` does not overwrite it;
    - RAY_ADDRESS is unset rather than `local`: `ray job submit --address URL` lets RAY_ADDRESS override URL;
    - RAY_AUTH_TOKEN_PATH=root/auth_token (a new token), so Ray neither reads nor writes ~/.ray/auth_token;
      a test may point it at a token of its own;
    - no MLflow tracking/registry URI, credentials, experiment or run from the user's shell;
    - LOFIT_CACHE_DIR=root/cache, with the user's converted models linked in (isolated_cache).
    """
    root = Path(root)
    shared_cache = Path(env.get(CACHE_ENV) or cache_dir()).expanduser()
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    out = {k: v for k, v in env.items() if k not in USER_ONLY_VARS}
    out.update({"LOFIT_HOME": str(root / "home"), "LOFIT_REFERENCE_CACHE": str(root / "reference"),
                "RAY_TMPDIR": str(root), "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"),
                CACHE_ENV: str(isolated_cache(root, shared_cache))})
    return out


def short_tempdir(prefix: str) -> Path:
    """A new directory under /tmp (not a long $TMPDIR): Ray puts its sockets below whatever dir it is given."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


# scripts/test.sh makes the root (and removes it, also after a crash); pytest on its own makes its own.
_OWN_ROOT = not os.environ.get("LOFIT_TEST_ROOT")
SESSION_ROOT = short_tempdir("lofit-test.") if _OWN_ROOT else Path(os.environ["LOFIT_TEST_ROOT"])
_session_env = {**isolated_env(dict(os.environ), SESSION_ROOT), "LOFIT_TEST_ROOT": str(SESSION_ROOT)}
os.environ.clear()
os.environ.update(_session_env)


def pytest_sessionstart(session):
    """Most tests read the paper's splits: say once where they were looked for, rather than 100 errors."""
    from lofit_ray.tasks import DATA_DIR_ENV, data_dir

    where = data_dir()
    if not (where / "truthfulqa").is_dir():
        pytest.exit(f"task data not found at {where}: clone lofit-ray beside shared/ (so ../shared/data exists) "
                    f"or set {DATA_DIR_ENV}=/path/to/data", returncode=4)


def pytest_unconfigure(config):
    """Stop the Ray clusters the session left under its root (only those), then remove the root."""
    from ray_util import stop_ray_cluster

    stop_ray_cluster(temp_dir=SESSION_ROOT)
    if _OWN_ROOT:
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    """A 4-layer x 4-head random Llama with SmolLM2's tokenizer (seeded: identical every run)."""
    from lofit_ray.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from lofit_ray.models import load_model

    return load_model("smollm2-135m")
