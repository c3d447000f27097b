#!/usr/bin/env bash
# Install lofit-ray into ./.venv (if needed) and run the main job on its embedded default:
# a local Ray, MLflow on SQLite in ~/.lofit-ray, SmolLM2-135M-Instruct on TruthfulQA.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/lofit-ray ] || bash scripts/install.sh
. .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python jobs/search.py "$@"
