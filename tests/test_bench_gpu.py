"""jobs/bench_gpu.py runs end to end on this machine (a tiny model on CPU) and labels its numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    bench = _bench()
    assert bench.main(["--model", "tiny-llama", "--dtype", "float32", "--steps", "1", "--warmup", "0",
                       "--batch-size", "2", "--seq-len", "32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"] is torch.cuda.is_available()
    if not report["gpu"]:
        assert report["note"] == bench.CPU_NOTE and "NOT a GPU number" in report["note"]
    assert report["peak"]["tflops"] > 0 and report["flops_formula"]
    cases = report["cases"]
    for name in ("phase1/sdpa", "phase2/sdpa", "phase1/eager", "phase2/eager", "phase1/per_head_loop"):
        assert cases[name]["tokens_per_s"] > 0, (name, cases[name])
        assert 0 < cases[name]["fraction_of_peak"] and cases[name]["flops_per_token"] > 0
    assert cases["phase2/sdpa"]["flops_per_token"] <= cases["phase1/sdpa"]["flops_per_token"]
    flash = cases["phase1/flash_attention_2"]
    assert "tokens_per_s" in flash or "skipped" in flash or "error" in flash
    for stage in ("zero0", "zero1", "zero2", "zero3"):  # these run in one CPU process
        assert cases[f"phase1/{stage}"].get("tokens_per_s", 0) > 0, (stage, cases[f"phase1/{stage}"])
