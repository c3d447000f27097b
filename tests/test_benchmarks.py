"""The benchmarks (lofit_ray/bench, run by jobs/bench_*.py) run end to end here on a tiny model: bench_core's phase-2 variants all train the
library's trajectory and its reference MC scorer matches the library's; jobs/bench_gpu.py runs on CPU and
labels its numbers as not GPU numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _job(name: str):
    """jobs/<name>.py as a module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_core_variants_agree_with_the_library(tmp_path):
    out = tmp_path / "bench.json"
    assert _job("bench_core").main(["--model", "tiny-llama", "--repeats", "1", "--k", "3", "--phase2-pairs", "8",
                          "--phase2-variants", "all", "--mc-questions", "4", "--mc-side-by-side", "3",
                          "--gen-items", "2", "--selector-examples", "8", "--out", str(out)]) == 0
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
    for task, timed_runs in report["selectors"]["tasks"].items():  # every selector timed against l1's mean
        runs = timed_runs["runs"]
        assert [r["selector"] for r in runs] == ["l1", "gates", "grad", "grad_x_act", "l1"], task
        l1_mean = (runs[0]["seconds"] + runs[-1]["seconds"]) / 2
        for r in runs:
            assert r["over_l1"] == pytest.approx(r["seconds"] / l1_mean) and len(r["top_k_layers"]) == 3


def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    from lofit_ray.bench.gpu_steps import CPU_NOTE

    bench = _job("bench_gpu")
    assert bench.main(["--model", "tiny-llama", "--dtype", "float32", "--steps", "1", "--warmup", "0",
                       "--batch-size", "2", "--seq-len", "32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"] is torch.cuda.is_available()
    if not report["gpu"]:
        assert report["note"] == CPU_NOTE and "NOT a GPU number" in report["note"]
    assert report["peak"]["tflops"] > 0 and report["flops_formula"]
    cases = report["cases"]
    for name in ("phase1/sdpa", "phase2/sdpa", "phase1/eager", "phase2/eager", "phase1/per_head_loop"):
        assert cases[name]["tokens_per_s"] > 0, (name, cases[name])
        assert 0 < cases[name]["fraction_of_peak"] and cases[name]["flops_per_token"] > 0
    assert cases["phase2/sdpa"]["flops_per_token"] <= cases["phase1/sdpa"]["flops_per_token"]
    for phase in ("phase1", "phase2"):  # a number, or a status saying it cannot run here; never an error
        flash = cases[f"{phase}/flash_attention_2"]
        assert "error" not in flash, flash
        if report["gpu"]:
            assert flash.get("tokens_per_s", 0) > 0 or flash.get("skipped") == "flash_attn not installed", flash
        else:
            assert flash.get("skipped") in ("flash_attn not installed", "flash attention runs on CUDA GPUs only"), flash
    for stage in ("zero0", "zero1", "zero2", "zero3"):  # these run in one CPU process
        assert cases[f"phase1/{stage}"].get("tokens_per_s", 0) > 0, (stage, cases[f"phase1/{stage}"])
