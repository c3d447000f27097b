"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (where behaviour depends on it)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_sessionstart(session):
    """Most tests read the paper's splits: say once where they were looked for, rather than 100 errors."""
    from lofit_ray.tasks import DATA_DIR_ENV, data_dir

    where = data_dir()
    if not (where / "truthfulqa").is_dir():
        pytest.exit(f"task data not found at {where}: clone lofit-ray beside shared/ (so ../shared/data exists) "
                    f"or set {DATA_DIR_ENV}=/path/to/data", returncode=4)


@pytest.fixture(scope="session")
def tiny():
    """A 4-layer x 4-head random Llama with SmolLM2's tokenizer (seeded: identical every run)."""
    from lofit_ray.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from lofit_ray.models import load_model

    return load_model("smollm2-135m")
