#!/usr/bin/env bash
# Build an isolated virtualenv for the LoFiT paper's own code (reference/lo-fit), OUTSIDE the project's .venv.
#
#   bash scripts/reference_env.sh [VENV_DIR]     (default ~/.cache/lofit-ray/reference-venv)
#
# Pins come from the reference's own requirements.txt (transformers 4.39.2, trl 0.8.1, peft 0.10.0,
# accelerate 0.28.0, datasets 2.18.0, tokenizers 0.15.2, ...), applied as a pip CONSTRAINTS file so pip takes
# exactly those versions of whatever it installs and nothing else. One deliberate departure: torch. The
# reference pins torch==2.2.2 (a CUDA build); the only CPU build on this machine's package index is
# torch==2.13.0+cpu, so torch is installed first from that wheel and held there by the same constraints file
# (pip then cannot pull a CUDA torch or the nvidia-* wheels). wandb, baukit and openai are not installed: the
# run-time patch (jobs/reference/cpu.patch) turns wandb off and nothing on the trained path needs the others.
# Idempotent: re-running with the venv present only checks the imports.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${LOFIT_REFERENCE_VENV:-$HOME/.cache/lofit-ray/reference-venv}}"
REF="${LOFIT_REFERENCE_DIR:-$REPO/../shared/reference/lo-fit}"
TORCH_VERSION="2.13.0"
case "$(realpath -m "$VENV")" in
  "$(realpath -m "$REPO")"/*|/work/main/*) echo "refusing to build the reference venv inside a project tree: $VENV" >&2; exit 2;;
esac
[ -f "$REF/requirements.txt" ] || { echo "reference requirements not found: $REF/requirements.txt" >&2; exit 2; }
check() { "$VENV/bin/python" - <<'PY'
import torch, transformers, trl, peft, accelerate, datasets
print("reference venv:", "torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, "datasets", datasets.__version__)
assert transformers.__version__ == "4.39.2" and trl.__version__ == "0.8.1" and peft.__version__ == "0.10.0"
PY
}
if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then exit 0; fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
CONSTRAINTS="$VENV/reference-constraints.txt"
# The reference's pins minus the GPU stack (torch, torchvision, triton, nvidia-*), the unpinned/VCS lines, and
# the pins of torch's own dependencies that torch 2.13 cannot use (sympy 1.12 < 1.13.3; mpmath follows sympy).
grep -E '^[A-Za-z0-9_.-]+==' "$REF/requirements.txt" \
  | grep -viE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|sympy|mpmath)==' > "$CONSTRAINTS"
echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"   # the local CPU wheel (find-links /opt/wheels)
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" transformers trl peft accelerate datasets safetensors numpy pandas
check
