"""docs/using-the-adapter.md runs as written: its python blocks in order, in one namespace, in a folder
holding a tiny Llama as `base-model` and a trained adapter as `adapter`; its shell block through the CLI.
The three routes it shows must give the same logits, and its family table must be the tested one."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_families import EXPECTED

from lofit_ray import Adapter, HeadOffsets
from lofit_ray.architectures import TESTED_FAMILIES
from lofit_ray.models import load_model

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "using-the-adapter.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path / "base-model")
    tiny.tokenizer.save_pretrained(tmp_path / "base-model")
    loaded = load_model(str(tmp_path / "base-model"))  # the adapter records these files' fingerprint
    offsets = HeadOffsets(loaded.layout, offset_heads=[(1, 2), (3, 0)], init_std=0.5, seed=4)
    Adapter.from_offsets(offsets, loaded).save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_python_examples_run_and_agree(workdir):
    code = blocks("python")
    assert len(code) >= 4
    attach = [line for line in code[0].splitlines() if line.strip()]
    assert len(attach) <= 5  # attaching takes at most five lines
    namespace: dict = {}
    for block in code:
        exec(compile(block, str(PAGE), "exec"), namespace)

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    base = logits(AutoModelForCausalLM.from_pretrained(workdir / "base-model"))
    hooked = logits(namespace["hooked"])
    assert (hooked - base).abs().max() > 1e-2
    for name in ("merged", "exported"):
        torch.testing.assert_close(logits(namespace[name]), hooked, atol=1e-4, rtol=0)
    namespace["offsets"].detach()
    torch.testing.assert_close(logits(namespace["hooked"]), base, atol=0, rtol=0)


def test_the_shell_example_exports_the_same_checkpoint(workdir):
    from transformers import AutoModelForCausalLM

    [shell] = blocks("bash")
    args = shell.split()
    assert args[0] == "lofit-ray"
    res = subprocess.run([sys.executable, "-m", "lofit_ray.cli", *args[1:]], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(workdir / "merged-checkpoint")
    expected = Adapter.from_pretrained("adapter").export(load_model("base-model"), workdir / "again")
    for a, b in zip(exported.state_dict().values(), AutoModelForCausalLM.from_pretrained(expected).state_dict().values()):
        assert torch.equal(a, b)


def test_the_family_table_is_the_tested_one():
    rows = re.findall(r"^\| (\w+) \| `([\w.]+)` \| `(\w+)` \|", PAGE.read_text(), flags=re.M)
    assert [r[0] for r in rows] == list(TESTED_FAMILIES)
    assert {family: (projection, cls) for family, projection, cls in rows} == EXPECTED
