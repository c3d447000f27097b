"""Every tested family end to end on a tiny random model built by transformers (4 layers x 4 heads):
the projection found, phases 1 and 2, hook = merge = exported checkpoint; then the model entry points
(hub ids from the cache, dtype, attention kernels) and the exit code of a model lofit-ray cannot hook."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lofit_ray import Adapter, HeadOffsets, Phase1Config, Phase2Config, TrainingConfig, select_heads, train_offsets
from lofit_ray.architectures import TESTED_FAMILIES, _output_projection, decoder_layers, o_projs
from lofit_ray.models import load_model
from lofit_ray.tasks import PreferenceExample
from lofit_ray.train import TorchStepper, train_loop

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 2000, (2, 11), generator=torch.Generator().manual_seed(0))
EXAMPLES = [PreferenceExample(f"Q: colour {i}? A:", " blue", " green") for i in range(4)]
TRAINING = TrainingConfig(batch_size=4)

# family: (the projection lofit-ray hooks, the class stock transformers loads the export as)
EXPECTED = {
    "llama": ("self_attn.o_proj", "LlamaForCausalLM"),
    "mistral": ("self_attn.o_proj", "LlamaForCausalLM"),  # re-expressed: mistral's o_proj has no bias flag
    "qwen2": ("self_attn.o_proj", "LlamaForCausalLM"),  # re-expressed: q/k/v biases, no o_proj bias flag
    "qwen3": ("self_attn.o_proj", "Qwen3ForCausalLM"),
    "gemma": ("self_attn.o_proj", "GemmaForCausalLM"),
    "gemma2": ("self_attn.o_proj", "Gemma2ForCausalLM"),
    "gemma3_text": ("self_attn.o_proj", "Gemma3ForCausalLM"),
    "phi3": ("self_attn.o_proj", "LlamaForCausalLM"),  # re-expressed: fused qkv / gate_up split
    "olmo2": ("self_attn.o_proj", "Olmo2ForCausalLM"),
    "granite": ("self_attn.o_proj", "GraniteForCausalLM"),
    "gpt_neox": ("attention.dense", "GPTNeoXForCausalLM"),
}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_the_table_covers_the_tested_families():
    assert sorted(EXPECTED) == sorted(TESTED_FAMILIES)


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_family_trains_and_hook_merge_and_export_agree(family, tmp_path):
    from transformers import AutoModelForCausalLM

    projection, exported_as = EXPECTED[family]
    loaded = load_model(f"tiny-{family}")
    assert _output_projection(decoder_layers(loaded.model)[0])[0] == projection
    assert (loaded.layout.num_heads, loaded.layout.head_dim) == (4, 16)

    # phase 1 ranks all 16 heads from a finite loss; phase 2 trains the top 3
    head_set = select_heads(loaded, EXAMPLES, TRAINING, Phase1Config(epochs=1, lr=5e-2))
    assert len(head_set.ranking) == 16 and torch.isfinite(torch.tensor(head_set.hparams["final_loss"]))
    adapter = train_offsets(loaded, head_set, 3, EXAMPLES, TRAINING, Phase2Config(epochs=2, lr=5e-2))
    assert adapter.offset.abs().max() > 1e-2  # moved from its N(0, 1e-3) init
    with torch.no_grad():
        adapter.offset.mul_(20)  # large offsets: a wrong merge or export cannot hide under the tolerance

    base = _logits(loaded.model)
    offsets = adapter.attach(loaded.model, loaded.fingerprint)
    hooked = _logits(loaded.model)
    offsets.detach()
    assert (hooked - base).abs().max() > 1e-2

    out = adapter.export(loaded, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, nothing of lofit_ray
    assert type(plain).__name__ == exported_as and plain.dtype == torch.float32
    torch.testing.assert_close(_logits(plain), hooked, atol=1e-4, rtol=0)

    adapter.merge_and_unload(loaded.model)
    torch.testing.assert_close(_logits(loaded.model), hooked, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_phase2_skipping_frozen_layers_equals_the_full_model(family):
    """Heads in layers 2 and 3 only: phase 2 with layers 0-1 cached (their output fed straight to layer 2)
    trains the same offsets as running every layer. Granite scales embeddings outside its embedding module,
    so feeding the cached state as inputs_embeds would scale it twice."""
    loaded = load_model(f"tiny-{family}")
    trained = []
    for start in (2, 0):
        offsets = HeadOffsets(loaded.layout, offset_heads=[(2, 1), (3, 0)], seed=0).attach(loaded.model)
        try:
            history = train_loop(loaded, EXAMPLES, TRAINING, 2, TorchStepper([offsets.offset], 5e-2),
                                 base_model=offsets.disabled, start_layer=start)
        finally:
            offsets.detach()
        trained.append((offsets.offset.detach(), history[-1]["loss"]))
    torch.testing.assert_close(trained[0][0], trained[1][0], atol=1e-5, rtol=0)
    assert trained[0][1] == pytest.approx(trained[1][1], abs=1e-5)
    assert len(o_projs(loaded.model)) == 4  # the decoder got its full layer list back


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_kernels_give_the_same_hooked_logits(family):
    results = {}
    for kernel in ("eager", "sdpa"):
        loaded = load_model(f"tiny-{family}", attn_implementation=kernel)
        assert loaded.model.config._attn_implementation == kernel
        HeadOffsets(loaded.layout, offset_heads=[(1, 2)], init_std=1.0, seed=3).attach(loaded.model)
        results[kernel] = _logits(loaded.model)
    torch.testing.assert_close(results["eager"], results["sdpa"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="attn_implementation 'flash' is not one of auto, eager, sdpa"):
        load_model("tiny-llama", attn_implementation="flash")
    with pytest.raises(ValueError, match="attn_implementation 'sdpa': Gemma2ForCausalLM does not support an attention "
                                         "implementation through torch.nn.functional.scaled_dot_product_attention "
                                         "yet; use auto or eager$"):
        load_model("tiny-gemma2", attn_implementation="sdpa")


def _save(loaded, directory: Path, dtype=torch.float32) -> Path:
    loaded.model.to(dtype).save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    loaded.model.float()
    return directory


def test_export_keeps_the_checkpoint_dtype(tmp_path):
    """A bfloat16 checkpoint trained in float32 exports in bfloat16 (its own dtype) unless asked otherwise."""
    from transformers import AutoModelForCausalLM

    folder = _save(load_model("tiny-llama"), tmp_path / "bf16", torch.bfloat16)
    loaded = load_model(str(folder))
    assert loaded.source_dtype == "bfloat16" and loaded.model.dtype == torch.float32
    adapter = Adapter.from_offsets(HeadOffsets(loaded.layout, offset_heads=[(0, 1)], init_std=0.5), loaded)
    assert AutoModelForCausalLM.from_pretrained(adapter.export(loaded, tmp_path / "a")).dtype == torch.bfloat16
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(adapter.export(loaded, tmp_path / "b", dtype="float32")).dtype \
        == torch.float32


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_hub_ids_load_from_the_cache_pinned_or_not_and_fail_clearly_offline(tmp_path):
    """A hub id in the Hugging Face cache (laid out as huggingface_hub writes it) loads by name and pinned to
    its revision with HF_HUB_OFFLINE=1; an id not there fails with one line naming it and the fix."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--lofit-test--tiny-qwen3"
    snapshot = _save(load_model("tiny-qwen3"), repo / "snapshots" / revision)
    expected = load_model(str(snapshot)).fingerprint  # the folder itself, loaded as a local checkpoint
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from lofit_ray.models import load_model\n"
            "for spec in ('lofit-test/tiny-qwen3', 'lofit-test/tiny-qwen3@" + revision + "'):\n"
            "    print(load_model(spec).fingerprint)\n")
    res = _run([sys.executable, "-c", code], env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [expected, expected]

    res = _run([sys.executable, "-m", "lofit_ray.cli", "prepare-model", "lofit-test/not-there@v1"], env)
    assert res.returncode == 2
    line = [x for x in res.stderr.splitlines() if "error" in x]
    assert len(line) == 1 and "'lofit-test/not-there@v1' is not in the Hugging Face cache and HF_HUB_OFFLINE is set" \
        in line[0] and "hf download lofit-test/not-there --revision v1" in line[0], res.stderr[-2000:]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2 checkpoint: heads, but its attention output projection is a Conv1D, not an nn.Linear,
    so lofit-ray finds no projection to hook."""
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path_factory.mktemp("gpt2")
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, bos_token_id=0,
                                                          eos_token_id=0)).save_pretrained(folder)
    return folder


def _one_error_line(res: subprocess.CompletedProcess, prefix: str) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("entry", ["lofit-ray search", "python jobs/search.py", "lofit-ray select",
                                   "python jobs/reproduce.py"])
def test_a_model_without_a_findable_projection_exits_2_with_one_line(gpt2_folder, entry, tmp_path):
    """UnsupportedArchitectureError is a ModelSpecError, which every entry point turns into one line, exit 2."""
    search = ["--config", "smoke", "--set", f"models=[{gpt2_folder}]", "--tracking-uri",
              f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args = {"lofit-ray search": [sys.executable, "-m", "lofit_ray.cli", "search", *search],
            "python jobs/search.py": [sys.executable, "jobs/search.py", *search],
            "lofit-ray select": [sys.executable, "-m", "lofit_ray.cli", "select", "--model", str(gpt2_folder),
                                 "--out", str(tmp_path / "heads.json")],
            "python jobs/reproduce.py": [sys.executable, "jobs/reproduce.py", "--config", "configs/reproduce_tiny.yaml",
                                         "--set", f"models=[{gpt2_folder}]", "--out-dir", str(tmp_path / "out"),
                                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]}[entry]
    prefix = {"lofit-ray select": "lofit-ray select:", "python jobs/reproduce.py": "reproduce:"}.get(entry, "search:")
    line = _one_error_line(_run(args), prefix)
    assert "'gpt2' is not supported by lofit-ray: decoder layer 0 (GPT2Block) has no attention output projection" \
        in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # stopped before anything


def test_attn_implementation_is_a_checked_config_field():
    from lofit_ray.config import ConfigError
    from lofit_ray.config.reproduce_job import ReproduceConfig
    from lofit_ray.config.search_job import SearchJobConfig

    assert SearchJobConfig(attn_implementation="eager").attn_implementation == "eager"
    for cls in (SearchJobConfig, ReproduceConfig):
        with pytest.raises(ConfigError, match="^attn_implementation: 'flash' is not one of auto, eager, sdpa, "
                                              "flash_attention_2$"):
            cls(attn_implementation="flash")
