"""The package's import graph has no cycles, counting imports inside functions (scripts/import_cycles.py reads
them from the source). A cycle hidden by a lazy import is still a knot: give what both sides need one lower
home that both import. Fast: reads files, imports nothing of lofit_ray."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lofit_ray_has_no_import_cycles():
    checker = _checker()
    edges = checker.graph()
    assert len(edges) > 50 and sum(map(len, edges.values())) > 200  # it read the package
    found = checker.cycles(edges)
    assert not found, "import cycles (python scripts/import_cycles.py):\n" + "\n".join(
        checker.describe(edges, c) for c in found)


def test_the_checker_sees_a_cycle_hidden_inside_a_function(tmp_path):
    checker = _checker()
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .low import helper\n")
    (pkg / "sub" / "low.py").write_text("def helper():\n    from ..high import thing\n    return thing\n")
    (pkg / "high.py").write_text("import pkg.sub as sub\nfrom pkg import other\nthing = 1\n")
    (pkg / "other.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import high\n")
    edges = checker.graph(tmp_path, "pkg")
    assert edges["pkg.sub.low"] == {"pkg.high": 2}  # relative, two levels up, inside a function
    assert set(edges["pkg.high"]) == {"pkg.sub", "pkg.other"}  # `from pkg import other` is the module
    assert edges["pkg.other"] == {}  # TYPE_CHECKING imports never run
    assert checker.cycles(edges) == [["pkg.high", "pkg.sub", "pkg.sub.low"]]
