"""Ray job entry point: search LoFiT hyperparameters and record everything in MLflow.

    python jobs/search.py                                   # embedded default: local Ray, SQLite MLflow,
                                                            # smollm2-135m on TruthfulQA, minutes on 2 cores
    python jobs/search.py --config configs/smoke.yaml
    ray job submit --working-dir . -- python jobs/search.py --config configs/truthfulqa_smollm2.yaml
    python jobs/search.py --config ... --resume             # after a killed driver: finished trials stay done

The same as `lofit-ray search` (lofit_ray/cli/search.py holds the flags and the code). The summary
(champion per model, report-split metrics vs 0-shot, trials) is printed and written as JSON.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:  # prefer the installed package; `ray job submit --working-dir .` runs this file from a temporary copy
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.cli.search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
