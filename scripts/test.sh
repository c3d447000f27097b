#!/usr/bin/env bash
# Install lofit-ray with its dev extras into ./.venv (if needed) and run the whole test suite.
# The tests start (and stop) what they need themselves: local Ray clusters, an MLflow server on
# 127.0.0.1, DeepSpeed workers. Extra arguments go to pytest (e.g. -m "not slow", -k export).
#
# The session touches only what it started (tests/conftest.py, isolated_env): its LOFIT_HOME, DPO
# reference-log-prob cache, LOFIT_CACHE_DIR (the `datasets` cache) and Ray temp dir live in one temp dir,
# removed at the end together with any Ray cluster a failed test left running there. A Ray cluster you
# started with `ray start`, your RAY_ADDRESS, MLflow store and credentials and ~/.ray are left alone. Only
# the model conversion caches ($LOFIT_CACHE_DIR/models and /gguf) are shared, on purpose (linked in).
# With CI=true, a test that would skip because a part of the project is missing fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] && [ -x .venv/bin/lofit-ray ] || bash scripts/install.sh
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS MLFLOW_TRACKING_URI MLFLOW_REGISTRY_URI
LOFIT_TEST_ROOT=$(mktemp -d /tmp/lofit-test.XXXXXX)   # short: Ray's socket paths go below it
export LOFIT_TEST_ROOT LOFIT_HOME=$LOFIT_TEST_ROOT/home LOFIT_REFERENCE_CACHE=$LOFIT_TEST_ROOT/reference
cleanup() {
    python tests/ray_util.py --stop "$LOFIT_TEST_ROOT" || true   # only clusters under it, never `ray stop`
    rm -rf "$LOFIT_TEST_ROOT"
}
trap cleanup EXIT
lofit-ray prepare-model smollm2-135m
python -m pytest -ra --durations=15 "$@"
