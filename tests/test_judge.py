"""lm-evaluation-harness as an outside judge: lm-eval's own HF model class scores an exported checkpoint on the
shipped lofit_truthfulqa_* tasks, and its MC1/MC2 equal `lofit-ray eval`'s on the same items."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lofit_ray.adapter import Adapter, AdapterConfig  # noqa: E402
from lofit_ray.cli import main as cli  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "lofit_ray" / "lm_eval_tasks"


def test_lm_eval_scores_an_exported_adapter_as_lofit_ray_eval_does(tiny, tmp_path):
    layout = dataclasses.asdict(tiny.layout)
    config = AdapterConfig(base_model="tiny-llama", fingerprint=tiny.fingerprint, layout=layout,
                           heads=[[1, 2], [3, 0]], task="truthfulqa")
    adapter = Adapter(config, 0.5 * torch.randn(2, layout["head_dim"], generator=torch.Generator().manual_seed(7)))
    adapter.save_pretrained(tmp_path / "adapter")
    assert cli(["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged")]) == 0
    assert cli(["eval", "--model", "tiny-llama", "--task", "truthfulqa", "--adapter", str(tmp_path / "adapter"),
                "--limit", "12", "--out", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())

    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "merged"), "dtype": "float32"},
                                  tasks=["lofit_truthfulqa_mc1", "lofit_truthfulqa_mc2"], device="cpu", batch_size=8,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR),
                                                           metadata={"split": "val", "limit": 12}),
                                  bootstrap_iters=0)
    theirs = out["results"]
    assert len(out["samples"]["lofit_truthfulqa_mc2"]) == ours["n"] == 12
    assert theirs["lofit_truthfulqa_mc1"]["acc,none"] == pytest.approx(ours["mc1"], abs=1e-3)
    assert theirs["lofit_truthfulqa_mc2"]["acc,none"] == pytest.approx(ours["mc2"], abs=1e-3)
    # item by item too: the same questions in the same order, each MC2 within 1e-3
    rows = [json.loads(line) for line in (tmp_path / "ours.items.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["lofit_truthfulqa_mc2"], key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [r["question"] for r in rows]
    assert [s["acc"] for s in samples] == pytest.approx([r["mc2"] for r in rows], abs=1e-3)
