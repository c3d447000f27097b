"""Benchmark: one training step of each phase on a GPU (or a labelled CPU smoke run); JSON into jobs/results/.

    python jobs/bench_gpu.py --help

The benchmark lives in lofit_ray/bench/gpu_steps.py (its docstring says what each number is); this file only
runs it with jobs/results as the default output folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.bench import gpu_steps

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    return gpu_steps.main(argv, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
