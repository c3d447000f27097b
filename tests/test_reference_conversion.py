"""Issue 27: converting what the paper's own code (reference/lo-fit) writes into lofit-ray objects.

Fakes of the reference's files are built here in its exact formats, so nothing needs the reference's virtualenv:
- Trainer.save_model's model.safetensors, whose LoFiT keys are `model.layers.{i}.self_attn.attn_A.{j}` and
  `attn_v.{j}` ([head_dim] each: LlamaAttention's two nn.ParameterLists, models/modeling_llama.py:258-260);
- top_heads/*.npy: np.save(np.array(top_tuples)), (layer, head) rows best first by ||A|| (lofit_trainer.py:300-318);
- the per-step trace cpu.patch adds (utils/trainers.py): the collated tensors as lists, right-padded, -100 labels.
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lofit_ray.adapter import Adapter
from lofit_ray.architectures import o_projs
from lofit_ray.bench import agreement as ag
from lofit_ray.models import load_model

L, H, D = 4, 4, 16  # tiny-llama's layout


def _reference_save(folder: Path, A: torch.Tensor, v: torch.Tensor) -> Path:
    """What Trainer.save_model writes for the reference's LlamaForCausalLM (other weights abbreviated)."""
    tensors = {"model.embed_tokens.weight": torch.randn(8, 4), "model.norm.weight": torch.ones(4)}
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            tensors[f"model.layers.{i}.self_attn.attn_A.{j}"] = A[i, j].clone()
            tensors[f"model.layers.{i}.self_attn.attn_v.{j}"] = v[i, j].clone()
            tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.randn(4, 4)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _reference_top_heads(path: Path, A: torch.Tensor, k: int) -> Path:
    """The reference's head file, computed its way: norms flattened, argsort descending, (x // H, x % H)."""
    ahead = np.linalg.norm(A.numpy(), axis=-1)
    topk = np.argsort(ahead.flatten())[::-1][:k]
    tuples = (topk // A.shape[1], topk % A.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([(tuples[0][i], tuples[1][i]) for i in range(k)]))
    return path


@pytest.fixture
def saved(tmp_path):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(L, H, D, generator=gen) * torch.linspace(0.1, 2.0, L * H).reshape(L, H, 1)
    v = torch.randn(L, H, D, generator=gen)
    folder = _reference_save(tmp_path / "model", A, v)
    npy = _reference_top_heads(tmp_path / "top_heads" / "smollm2_135m_truthfulqa_Aonly_top16heads_42.npy", A, 16)
    return A, v, folder, npy


def test_reads_the_reference_tensors(saved, tmp_path):
    A, v, folder, _ = saved
    got = ag.read_reference_tensors(folder, L, H)
    assert torch.equal(got["A"], A) and torch.equal(got["v"], v)
    # the init dump cpu.patch writes is a torch.save'd {name: tensor} of the same keys
    torch.save({f"model.layers.{i}.self_attn.attn_A.{j}": A[i, j] for i in range(L) for j in range(H)},
               tmp_path / "init.pt")
    assert torch.equal(ag.read_reference_tensors(tmp_path / "init.pt", L, H)["A"], A)


def test_head_set_ranks_as_the_reference_does(saved):
    A, _, _, npy = saved
    heads = ag.read_top_heads(npy)
    assert len(heads) == 16 and all(isinstance(x, int) for h in heads for x in h)
    loaded = load_model("tiny-llama")
    from dataclasses import asdict
    hs = ag.reference_head_set(A, model=loaded.spec, fingerprint=loaded.fingerprint,
                               layout=asdict(loaded.layout), task="truthfulqa", seed=42)
    assert hs.top(16) == heads  # lofit-ray's ranking by ||A||_2 is the reference's file, in order


def test_adapter_applies_the_reference_offsets(saved, tmp_path):
    """The converted adapter adds v to exactly the reference's top-K heads' o_proj inputs (the reference's phase v:
    attn_output[:, :, head] = (A + 1) * attn_output[:, :, head] + v with A = 0), nothing elsewhere."""
    _, v, _, npy = saved
    heads = ag.read_top_heads(npy)[:5]
    loaded = load_model("tiny-llama")
    from dataclasses import asdict
    adapter = ag.reference_adapter(v, heads, model=loaded.spec, fingerprint=loaded.fingerprint,
                                   layout=asdict(loaded.layout), task="truthfulqa")
    adapter = Adapter.from_pretrained(adapter.save_pretrained(tmp_path / "adapter"))
    assert adapter.config.heads == [list(h) for h in heads]
    assert torch.equal(adapter.offset, torch.stack([v[l, h] for l, h in heads]))

    def o_proj_inputs():
        seen = {}
        handles = [p.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
                   for i, p in enumerate(o_projs(loaded.model))]
        with torch.no_grad():
            loaded.model(torch.tensor([[1, 2, 3, 4, 5]]))
        for h in handles:
            h.remove()
        return seen

    before = o_proj_inputs()
    offsets = adapter.attach(loaded.model, loaded.fingerprint)
    try:
        after = o_proj_inputs()
    finally:
        offsets.detach()
    for layer in range(L):
        delta = (after[layer] - before[layer]).unflatten(-1, (H, D))
        for head in range(H):
            want = v[layer, head] if (layer, head) in heads else torch.zeros(D)
            # only this layer's own offset differs in the first layer with a head; later layers see changed
            # inputs too, so compare against the offset where no earlier layer was changed
            if layer <= min(l for l, _ in heads):
                torch.testing.assert_close(delta[0, :, head], want.expand(5, D), atol=1e-6, rtol=0)


def _dpo_record(batch):
    """One traced DPO step as cpu.patch writes it (trl 0.8.1's collated keys, right-padded)."""
    def pad(rows, value):
        width = max(len(r) for r in rows)
        return [r + [value] * (width - len(r)) for r in rows]
    keys = {}
    for side in ("chosen", "rejected"):
        ids = [p + a for p, a in ((b["prompt"], b[side]) for b in batch)]
        labels = [[-100] * len(b["prompt"]) + b[side] for b in batch]
        keys[f"{side}_input_ids"] = pad(ids, 2)
        keys[f"{side}_attention_mask"] = pad([[1] * len(x) for x in ids], 0)
        keys[f"{side}_labels"] = pad(labels, -100)
    keys["reference_chosen_logps"] = [b["ref"][0] for b in batch]
    keys["reference_rejected_logps"] = [b["ref"][1] for b in batch]
    return {"loss": 0.7, "l1": 0.01, "inputs": keys}


def test_trace_replays_as_sequences_and_orders(tmp_path):
    examples = [{"prompt": [1, 10 + i], "chosen": [20 + i, 2], "rejected": [30 + i, 31, 2], "ref": [-1.0 - i, -2.0]}
                for i in range(4)]
    epochs = [[2, 0, 3, 1], [1, 3, 0, 2]]
    with open(tmp_path / "trace.jsonl", "w") as f:
        for order in epochs:
            for s in range(2):
                f.write(json.dumps(_dpo_record([examples[i] for i in order[2 * s: 2 * s + 2]])) + "\n")
    steps = ag.read_trace(tmp_path / "trace.jsonl")
    assert len(steps) == 4 and steps[0]["task_loss"] == pytest.approx(0.69)
    items, orders, refs = ag.examples_and_orders(steps, batch_size=2)
    # first-seen order is epoch 1's order; epoch orders index into it
    assert [it[0].ids for it in items] == [examples[i]["prompt"] + examples[i]["chosen"] for i in epochs[0]]
    assert all(c.answer_start == 2 and r.answer_start == 2 for c, r in items)
    assert refs[0] == examples[2]["ref"]
    assert [[epochs[0][j] for j in o] for o in orders] == epochs
    with pytest.raises(ValueError, match="divisible"):
        ag.examples_and_orders(steps, batch_size=3)


def test_replay_feeds_train_loop_the_given_batches_and_restores():
    from lofit_ray import batching, train
    from lofit_ray.batching import Sequence
    from lofit_ray.config import TrainingConfig

    loaded = load_model("tiny-llama")
    seqs = [Sequence([1, 5 + i, 7, 8 + i], 2) for i in range(4)]
    seen = []

    class Spy:
        lr = 0.0

        def backward(self, loss):
            seen.append(float(loss))

        def step(self):
            pass

    orders = [[3, 2, 1, 0]]
    saved = batching.encode_examples, train.epoch_order
    with ag.replayed_batches(orders):
        train.train_loop(loaded, seqs, TrainingConfig(batch_size=2, seed=0), 1, Spy())
    assert (batching.encode_examples, train.epoch_order) == saved
    # the first step's loss is that of sequences 3 and 2, computed directly
    from lofit_ray import losses
    with torch.no_grad():
        lp = losses.answer_logprobs(loaded.model, batching.batch_items([seqs[3], seqs[2]], 0))
    assert seen[0] == pytest.approx(float(-lp.sum() / 4), rel=1e-5)


def test_statistics():
    a = np.arange(20.0)
    assert ag.spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert ag.spearman(a, -a) == pytest.approx(-1.0)
    assert ag.jaccard_top_k(a, a, 5) == 1.0
    n, k = 6, 2  # chance level: the exact mean over all pairs of k-subsets
    subsets = list(itertools.combinations(range(n), k))
    exact = np.mean([len(set(x) & set(y)) / len(set(x) | set(y)) for x in subsets for y in subsets])
    assert ag.jaccard_chance(n, k) == pytest.approx(exact)
    assert ag.cosines(torch.eye(2), torch.eye(2) * 3) == pytest.approx([1.0, 1.0])


def test_export_for_transformers_439(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32",
                                                 "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend",
                                                           "eos_token": "<e>", "pad_token": "<e>"}))
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": [["a", "b"], ["Ġ", "c"]],
                                                              "ignore_merges": False}}))
    (src / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="llama"):
        ag.export_reference_model(src, tmp_path / "plain")
    out = ag.export_reference_model(src, tmp_path / "smollm2-llama")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "float32" and "rope_parameters" not in config
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "tokenizer.json").read_text())["model"]["merges"] == ["a b", "Ġ c"]
    assert (out / "model.safetensors").read_bytes() == b"weights"


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lo-fit"


@pytest.mark.skipif(not (REFERENCE / "lofit_trainer.py").is_file() or shutil.which("patch") is None,
                    reason="the reference code (../shared/reference/lo-fit) is not beside this checkout")
def test_cpu_patch_applies_to_the_reference(tmp_path):
    tree = ag.prepare_tree(REFERENCE, tmp_path / "data", tmp_path / "tree")
    text = (tree / "lofit_trainer.py").read_text()
    assert "'smollm2_135m'" in text and "import wandb" not in text and 'evaluation_strategy="no"' in text
    assert "base=getattr(self.config, 'rope_theta', 10000)" in (tree / "models" / "modeling_llama.py").read_text()
    assert (tree / "dataset" / "truthfulqa" / "fold_0_test_seed_42.csv").is_symlink()
    assert subprocess.run(["python", "-m", "py_compile", str(tree / "lofit_trainer.py"),
                           str(tree / "utils" / "trainers.py")]).returncode == 0


def test_the_agreement_page_shows_the_recorded_tables():
    """docs/agreement.md pastes the tables `report_tables` and `wall_times` print from jobs/results/agreement: a
    rerun that changes the record must change the page too."""
    from lofit_ray.bench.agreement_run import report_tables, wall_times

    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "agreement.md").read_text()
    for table in (report_tables(repo / "jobs" / "results" / "agreement"),
                  wall_times(repo / "jobs" / "results" / "agreement")):
        assert table.strip() and table.strip() in page
