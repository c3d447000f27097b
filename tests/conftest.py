"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (where behaviour depends on it)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny():
    """A 4-layer x 4-head random Llama with SmolLM2's tokenizer (seeded: identical every run)."""
    from lofit_ray.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from lofit_ray.models import load_model

    return load_model("smollm2-135m")
