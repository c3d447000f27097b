"""Benchmark: the LoFiT core's speed (phase 1, phase 2 variants, MC scoring, generation, selectors); JSON into jobs/results/.

    python jobs/bench_core.py --help

The benchmark lives in lofit_ray/bench/core_suite.py (its docstring says what each number is); this file only
runs it with jobs/results as the default output folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray.bench import core_suite

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    return core_suite.main(argv, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
