#!/usr/bin/env bash
# Install lofit-ray with its dev extras into ./.venv (if needed) and run the whole test suite.
# The tests start (and stop) what they need themselves: local Ray clusters, an MLflow server on
# 127.0.0.1, DeepSpeed workers. Extra arguments go to pytest (e.g. -m "not slow", -k export).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] && [ -x .venv/bin/lofit-ray ] || bash scripts/install.sh
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
# Keep test state out of the user's ~/.lofit-ray; the model conversion cache is shared on purpose.
export LOFIT_HOME=${LOFIT_HOME:-$(mktemp -d -t lofit-test-home.XXXX)}
lofit-ray prepare-model smollm2-135m
status=0
python -m pytest -ra --durations=15 "$@" || status=$?
ray stop --force >/dev/null 2>&1 || true   # in case a failed test left a cluster behind
exit $status
