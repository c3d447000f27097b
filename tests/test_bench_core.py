"""jobs/bench_core.py on a tiny model: every phase-2 variant trains the same trajectory as the library, the
reference MC scorer gives the library's log-probs, and each section reports its floor."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench_core.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_core", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_core_variants_agree_with_the_library(tmp_path):
    out = tmp_path / "bench.json"
    assert _bench().main(["--model", "tiny-llama", "--repeats", "1", "--k", "3", "--phase2-pairs", "8",
                          "--phase2-variants", "all", "--mc-questions", "4", "--mc-side-by-side", "3",
                          "--gen-items", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    phase2 = report["phase2"]
    assert set(phase2["variants"]) == {"library", "reference", "bench_all_levers", "library_repeat",
                                       *phase2["variant_of_lever"].values()}
    for name, variant in phase2["variants"].items():
        assert variant["max_step_loss_diff_vs_library"] < 1e-4, name
        assert variant["final_offset_max_diff_vs_library"] < 1e-3, name
    assert set(phase2["lever_contributions"]) == set(phase2["variant_of_lever"])
    mc = report["mc_scoring"]
    assert mc["questions"] == 4 and mc["side_by_side"]["max_abs_logprob_diff"] < 1e-3
    assert mc["side_by_side"]["metrics_previous"]["mc1"] == mc["side_by_side"]["metrics_library"]["mc1"]
    assert mc["floor_s"] > 0 and mc["floor"]["tokens"] > mc["floor"]["answer_tokens"] > 0
    assert report["generation"]["floor_s"] > 0 and report["phase1"]["lofit_phase1_step_s"] > 0
