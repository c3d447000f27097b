"""Baselines: ITI (activations, probes, directions, adapter, alpha choice) and LoRA (peft), on tiny-llama."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from lofit_ray.adapter import Adapter
from lofit_ray.architectures import o_projs
from lofit_ray.baselines import iti, lora
from lofit_ray.batching import encode_examples, batch_items
from lofit_ray.losses import sft_loss
from lofit_ray.models import load_model
from lofit_ray.tasks import SFTExample, get_task
from lofit_ray.tasks.base import data_dir
from lofit_ray.config import LoraConfig, TrainingConfig

needs_data = pytest.mark.skipif(not (data_dir() / "truthfulqa").is_dir(), reason="shared TruthfulQA data is missing")

TEXTS = ["Q: Can pigs fly? A: No.", "Hello", "Q: What is the capital of France? A: Paris is the capital of France.",
         "One two three four five six", "Q: Is the earth flat? A: No, it is round."]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _o_proj_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The full o_proj input of every layer for one unpadded batch (the straightforward reference)."""
    seen = []
    handles = [p.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for p in o_projs(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _logits(model, text="Q: Can pigs fly? A: No, pigs cannot fly.", tok=None):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- ITI: activations ----------------------------------------------------------------------------

def test_head_activations_equal_unpadded_reference(tiny):
    acts = iti.head_activations(tiny, TEXTS, batch_size=2)
    L, H, D = tiny.layout.num_layers, tiny.layout.num_heads, tiny.layout.head_dim
    assert acts.shape == (len(TEXTS), L, H, D) and acts.dtype == torch.float32
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tiny.tokenizer(text)["input_ids"]])
        ref = _o_proj_inputs(tiny.model, ids)
        layer, head = 2, 1  # one head by hand: columns head*D .. (head+1)*D of o_proj's input, last token
        assert torch.allclose(acts[i, layer, head], ref[layer][0, -1, head * D:(head + 1) * D], atol=1e-5)
        full = torch.stack([r[0, -1].reshape(H, D) for r in ref])  # every head of every layer
        assert torch.allclose(acts[i], full, atol=1e-5)
    assert not torch.allclose(acts[0], acts[2])  # different texts, different activations


# --- ITI: probes -------------------------------------------------------------------------------

def test_item_groups_and_split_by_item():
    labels = [1, 1, 0, 0, 1, 0, 1, 1, 0]
    assert iti.item_groups(labels) == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    groups = [i // 4 for i in range(40)]
    train, val = iti.split_indices(40, 0.2, seed=3, groups=groups)
    assert len(train) + len(val) == 40 and len(val) == 8
    assert not {groups[i] for i in train.tolist()} & {groups[i] for i in val.tolist()}
    t2, v2 = iti.split_indices(40, 0.2, seed=3, groups=groups)
    assert torch.equal(train, t2) and torch.equal(val, v2)  # seeded
    with pytest.raises(ValueError):
        iti.split_indices(1, 0.2, seed=0)


def _planted(n_items=60, planted=(2, 3), strength=6.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = [1, 1, 0, 0] * n_items  # 4 statements per item, true ones first
    acts = torch.randn(len(labels), 4, 4, 16, generator=gen)
    y = torch.tensor(labels, dtype=torch.float32)
    acts[:, planted[0], planted[1], 5] += strength * (2 * y - 1)  # +-6 on one dim over N(0, 1) noise: separable
    return acts, labels


def test_probe_ranks_planted_head_first():
    acts, labels = _planted()
    result = iti.probe_heads(acts, labels, val_fraction=0.2, seed=0)
    ranking = result["ranking"]
    assert ranking[0][:2] == [2, 3] and ranking[0][2] == 1.0
    assert len(ranking) == 16 and {(l, h) for l, h, _ in ranking} == {(l, h) for l in range(4) for h in range(4)}
    others = result["accuracy"].flatten().tolist()
    others.pop(2 * 4 + 3)
    assert max(others) < 0.8  # noise heads stay near chance
    assert result["n_val"] == 48 and result["n_train"] == 192  # whole items of 4 held out


def test_probe_needs_both_labels():
    acts, _ = _planted(n_items=5)
    with pytest.raises(ValueError, match="both true and false"):
        iti.probe_heads(acts, [1] * acts.shape[0])


def test_directions_are_mass_mean_shift_with_projected_std():
    acts, labels = _planted(n_items=30, seed=1)
    heads = [(2, 3), (0, 1)]
    unit, sigma = iti.iti_directions(acts, labels, heads)
    y = torch.tensor(labels, dtype=torch.bool)
    for row, (l, h) in enumerate(heads):
        z = acts[:, l, h].double()
        shift = z[y].mean(0) - z[~y].mean(0)
        assert torch.allclose(unit[row].double(), shift / shift.norm(), atol=1e-6)
        proj = (z @ (shift / shift.norm())).numpy()
        assert math.isclose(float(sigma[row]), float(proj.std()), rel_tol=1e-5)
    assert unit[0].abs().argmax() == 5  # the planted head's direction is its planted dim


# --- ITI: the adapter ------------------------------------------------------------------------------

@needs_data
def test_fit_iti_adapter_selects_alpha_saves_and_acts_only_on_its_heads(tiny, tmp_path):
    task = get_task("truthfulqa")
    items = task.eval_items(limit=3)
    adapter, info = iti.fit_iti(tiny, task, 3, selection_items=items, alphas=(0.5, 8.0), limit=8, seed=0)
    # alpha choice: the best selection score of the grid
    assert [g["alpha"] for g in info["alpha_grid"]] == [0.5, 8.0]
    best = max(info["alpha_grid"], key=lambda g: g["score"])
    assert info["alpha"] == best["alpha"] and adapter.config.hparams["alpha"] == best["alpha"]
    assert info["base"]["n"] == 3 and all(g["score"] == g["mc2"] for g in info["alpha_grid"])
    # heads = top-K of the probe ranking, offsets = alpha * sigma * unit direction
    assert adapter.config.method == "iti" and info["head_set"].method == "iti"
    heads = [tuple(h) for h in adapter.config.heads]
    assert heads == info["head_set"].top(3) == info["heads"]
    assert torch.allclose(adapter.offset, info["alpha"] * info["sigma"][:, None] * info["directions"])
    assert torch.allclose(adapter.offset.norm(dim=-1), info["alpha"] * info["sigma"], rtol=1e-5)

    # save / load
    adapter.save_pretrained(tmp_path / "iti")
    again = Adapter.from_pretrained(tmp_path / "iti")
    assert torch.equal(again.offset, adapter.offset) and again.config == adapter.config

    # logits change, and equal between the saved and the in-memory adapter
    tok = tiny.tokenizer
    base = _logits(tiny.model, tok=tok)
    offsets = adapter.attach(tiny.model)
    try:
        hooked = _logits(tiny.model, tok=tok)
    finally:
        offsets.detach()
    offsets = again.attach(tiny.model)
    try:
        assert torch.allclose(_logits(tiny.model, tok=tok), hooked)
    finally:
        offsets.detach()
    assert not torch.allclose(base, hooked, atol=1e-4)

    # only the selected heads move: below the lowest selected layer nothing changes; at it,
    # exactly the selected heads shift, by exactly their offset rows
    ids = torch.tensor([tok("Q: Can pigs fly? A: No.")["input_ids"]])
    H, D = tiny.layout.num_heads, tiny.layout.head_dim
    before = _o_proj_inputs(tiny.model, ids)
    offsets = adapter.attach(tiny.model)
    try:
        after = _o_proj_inputs(tiny.model, ids)  # this hook runs after the adapter's
    finally:
        offsets.detach()
    first = min(l for l, _ in heads)
    for layer in range(first):
        assert torch.equal(before[layer], after[layer])
    diff = (after[first] - before[first]).unflatten(-1, (H, D))[0]  # [T, H, D]
    for head in range(H):
        if (first, head) in heads:
            row = heads.index((first, head))
            assert torch.allclose(diff[:, head], adapter.offset[row].expand_as(diff[:, head]), atol=1e-5)
        else:
            assert diff[:, head].abs().max() == 0
    assert torch.allclose(_logits(tiny.model, tok=tok), base)  # detached: base model again


def test_fit_iti_argument_errors(tiny):
    with pytest.raises(ValueError, match="K="):
        iti.fit_iti(tiny, "x", 0, statements=[("a", 1), ("b", 0)], alphas=(1.0,))
    with pytest.raises(ValueError, match="selection_items"):
        iti.fit_iti(tiny, "x", 2, statements=[("a", 1), ("b", 0)], alphas=(1.0, 2.0))


def test_fit_iti_without_selection_uses_the_one_alpha(tiny):
    statements = [(f"Q: Is {i} even? A: {'Yes' if i % 2 == 0 else 'No'}.", 1) for i in range(6)]
    statements += [(f"Q: Is {i} even? A: {'No' if i % 2 == 0 else 'Yes'}.", 0) for i in range(6)]
    adapter, info = iti.fit_iti(tiny, "parity", 2, statements=statements, alphas=(3.0,))
    assert info["alpha"] == 3.0 and info["alpha_grid"] == [] and adapter.config.task == "parity"
    assert adapter.offset.shape == (2, tiny.layout.head_dim) and adapter.num_parameters == 2 * tiny.layout.head_dim


# --- LoRA -------------------------------------------------------------------------------------------

SFT = [SFTExample(f"Q: What comes after {w}? A:", f" {n}") for w, n in
       [("one", "two"), ("two", "three"), ("three", "four"), ("four", "five"), ("five", "six"), ("six", "seven")]]


def _sft_loss(model, loaded):
    batch = batch_items(encode_examples(loaded.tokenizer, SFT, 64), loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        return float(sft_loss(model, batch))


def test_lora_trainable_count_is_analytic():
    loaded = load_model("tiny-llama")
    # tiny-llama: 4 layers, hidden 64, q/o 64->64, k/v 64->32 (2 KV heads of 16)
    expected = 4 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert lora.lora_parameter_count(loaded.model, 8) == expected == 14336
    assert lora.lora_parameter_count(loaded.model, 4, ("q_proj", "v_proj")) == 4 * 4 * ((64 + 64) + (64 + 32))
    peft_model = lora.wrap_lora(loaded, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    assert lora.count_trainable(peft_model) == 3584 == lora.count_lora_parameters(peft_model)
    with pytest.raises(ValueError, match="not found"):
        lora.wrap_lora(load_model("tiny-llama"), 8, 16, targets=("qkv_proj",))


def test_lora_sft_lowers_loss_and_round_trips(tmp_path):
    loaded = load_model("tiny-llama")
    tok = loaded.tokenizer
    base_logits = _logits(loaded.model, tok=tok)
    before = _sft_loss(loaded.model, loaded)
    training = TrainingConfig(batch_size=3, max_length=64, seed=0)
    peft_model, info = lora.train_lora(loaded, SFT, training, LoraConfig(epochs=4, lr=1e-2))
    assert info["trainable_parameters"] == 14336 and info["objective"] == "sft"
    assert len(info["history"]) == 4 and all(math.isfinite(h["loss"]) for h in info["history"])
    inner = lora.inner_model(peft_model)
    after = _sft_loss(inner, loaded)
    assert after < before - 0.1, (before, after)
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    # the LoadedModel view that evaluate() and answer_logprobs() use sees the adapter
    assert _sft_loss(lora.lora_loaded(loaded, peft_model).model, loaded) == after
    with peft_model.disable_adapter():  # the DPO reference: exactly the base model
        assert torch.allclose(_logits(inner, tok=tok), base_logits, atol=1e-6)

    trained = _logits(inner, tok=tok)
    assert not torch.allclose(trained, base_logits, atol=1e-4)
    lora.save_lora(peft_model, tmp_path / "lora", loaded, info, task="count")
    meta = json.loads((tmp_path / "lora" / lora.META_NAME).read_text())
    assert meta["fingerprint"] == loaded.fingerprint and meta["info"]["trainable_parameters"] == 14336

    fresh = load_model("tiny-llama")
    assert fresh.fingerprint == loaded.fingerprint
    reloaded = lora.load_lora(fresh, tmp_path / "lora")
    assert torch.allclose(_logits(lora.inner_model(reloaded), tok=tok), trained, atol=1e-6)
    assert lora.count_lora_parameters(reloaded) == 14336 and lora.count_trainable(reloaded) == 0
    # trained on other weights: refused naming both models (`eval` exits 2), unless allowed
    (tmp_path / "lora" / lora.META_NAME).write_text(json.dumps({**meta, "fingerprint": "0123456789abcdef",
                                                                "base_model": "someone/other-llama"}))
    with pytest.raises(ValueError, match="someone/other-llama .*tiny-llama .*--allow-base-mismatch"):
        lora.load_lora(load_model("tiny-llama"), tmp_path / "lora")
    lora.load_lora(load_model("tiny-llama"), tmp_path / "lora", allow_base_mismatch=True)


def test_lora_nan_loss_is_reported(monkeypatch):
    from lofit_ray import losses
    from lofit_ray.train import NaNLossError

    loaded = load_model("tiny-llama")
    real = losses.answer_logprobs
    calls = []

    def poisoned(model, batch, **kw):  # the second step's loss is NaN
        calls.append(1)
        logp = real(model, batch, **kw)
        return logp * float("nan") if len(calls) == 2 else logp

    monkeypatch.setattr(losses, "answer_logprobs", poisoned)  # the shared loop (train.train_loop) calls it
    with pytest.raises(NaNLossError, match="epoch 1, step 2"):
        lora.train_lora(loaded, SFT, TrainingConfig(batch_size=3, max_length=64), LoraConfig(epochs=1, lr=1e-3))


@needs_data
def test_lora_dpo_and_evaluate(tmp_path):
    loaded = load_model("tiny-llama")
    task = get_task("truthfulqa")
    peft_model, info = lora.train_lora(loaded, task.train_examples(limit=4), TrainingConfig(batch_size=2, max_length=64),
                                       LoraConfig(epochs=2, lr=5e-3))
    assert info["objective"] == "dpo"
    assert abs(info["history"][0]["loss"] - math.log(2)) < 0.1  # B=0 at the start: policy = reference
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    metrics = lora.evaluate_lora(loaded, peft_model, task.eval_items(limit=2))
    assert metrics["n"] == 2 and 0 <= metrics["mc1"] <= 1 and 0 <= metrics["mc2"] <= 1


# --- CLI and imports ----------------------------------------------------------------------------------

@needs_data
def test_cli_iti_then_eval(tmp_path, capsys):
    from lofit_ray.cli import main

    out = tmp_path / "iti"
    rc = main(["iti", "--model", "tiny-llama", "--task", "truthfulqa", "--k", "2", "--alphas", "1,4",
               "--limit", "3", "--probe-limit", "6", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    line = text.strip().splitlines()[-1]
    assert line.startswith("ITI on 2 of 16 heads") and "32 parameters" in line and str(out) in line
    adapter = Adapter.from_pretrained(out)
    assert adapter.config.method == "iti" and len(adapter.config.heads) == 2
    assert json.loads((out / "iti_heads.json").read_text())["method"] == "iti"
    assert json.loads((out / "iti_info.json").read_text())["alpha"] in (1.0, 4.0)
    rc = main(["eval", "--model", "tiny-llama", "--task", "truthfulqa", "--limit", "2", "--adapter", str(out)])
    assert rc == 0 and "(2 heads)" in capsys.readouterr().out


@needs_data
def test_cli_lora_train_eval_then_eval_the_lora_adapter(tmp_path, capsys):
    from lofit_ray.cli import main

    out = tmp_path / "lora"
    rc = main(["lora", "--model", "tiny-llama", "--task", "truthfulqa", "--limit", "4", "--lora-epochs", "1",
               "--batch-size", "2", "--max-length", "64", "--rank", "4", "--targets", "q_proj,v_proj", "o_proj",
               "--eval", "--eval-limit", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    line = text.strip().splitlines()[-1]
    expected = 4 * 4 * ((64 + 64) + (64 + 32) + (64 + 64))
    assert f"{expected} trainable parameters" in line and "mc1=" in line and "dpo final loss" in line, line
    assert (out / "adapter_model.safetensors").is_file()
    # `eval` scores a LoRA adapter too, on the base model it records
    rc = main(["eval", "--task", "truthfulqa", "--limit", "2", "--adapter", str(out), "--out", str(tmp_path / "m.json")])
    assert rc == 0, capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 2 and metrics["lora_parameters"] == expected and metrics["method"] == "lora"
    assert metrics["model"] == "tiny-llama" and metrics["mc2_ci_low"] <= metrics["mc2"] <= metrics["mc2_ci_high"]


def test_cli_rejects_bad_alphas(capsys):
    from lofit_ray.cli import main

    assert main(["iti", "--model", "tiny-llama", "--k", "2", "--alphas", "1,x"]) == 2
    assert "--alphas" in capsys.readouterr().err
    assert main(["lora", "--model", "tiny-llama", "--rank", "0"]) == 2  # LoraConfig's check, named by flag
    assert "--rank (lora.rank)" in capsys.readouterr().err


def test_baselines_import_without_peft_ray_mlflow():
    code = ("import sys\n"
            "for name in ('peft', 'ray', 'mlflow'): sys.modules[name] = None\n"
            "import lofit_ray.baselines, lofit_ray.cli.baselines\n"
            "from lofit_ray.baselines import lora\n"
            "try:\n    lora.wrap_lora(None, 8, 16, ['q_proj'])\n"
            "except ImportError as e:\n    assert 'peft' in str(e); print('ok')\n"
            "from lofit_ray.cli import main\n"
            "print(main(['lora', '--model', 'no-such-model']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["ok", "2"], result.stderr
    assert result.stderr.strip() == "lofit-ray lora needs peft: pip install 'lofit-ray[baselines]'"


# -- ReFT (LoReFT on the residual stream) -------------------------------------------------------

def test_loreft_edit_is_the_published_intervention_and_comes_off_cleanly(tiny):
    """h + R^T (W h + b - R h) with orthonormal rows of R, on one layer's output; `disabled` and `detach`
    give back the base model exactly."""
    from lofit_ray.baselines.reft import LoReFT

    ids = torch.tensor([[1, 5, 9, 2, 7]])
    base = tiny.model(ids).logits
    edit = LoReFT(tiny.model.config.hidden_size, layer=1, rank=2, seed=0).attach(tiny.model)
    try:
        R = edit.rotate.weight.detach()
        torch.testing.assert_close(R @ R.T, torch.eye(2), atol=1e-5, rtol=0)
        h = torch.randn(3, tiny.model.config.hidden_size)
        W, b = edit.learned.weight.detach(), edit.learned.bias.detach()
        torch.testing.assert_close(edit.edit(h).detach(), h + (h @ W.T + b - h @ R.T) @ R)
        assert not torch.allclose(tiny.model(ids).logits, base)
        with edit.disabled():
            torch.testing.assert_close(tiny.model(ids).logits, base)
        assert edit.num_parameters == 2 * 2 * tiny.model.config.hidden_size + 2
        assert edit.num_parameters == sum(p.numel() for p in edit.parameters())
    finally:
        edit.detach()
    torch.testing.assert_close(tiny.model(ids).logits, base)


def test_train_reft_lowers_the_loss_and_detaches_after_a_failure(tiny):
    from lofit_ray.baselines.reft import reft_layer, train_reft
    from lofit_ray.config import ReftConfig
    from lofit_ray.tasks import PreferenceExample

    examples = [PreferenceExample(f"Q: colour {i}? A:", " blue", " green") for i in range(8)]
    training = TrainingConfig(batch_size=4, seed=0)
    edit, info = train_reft(tiny, examples, training, ReftConfig(epochs=3, lr=1e-2, depth=1.0))
    edit.detach()
    assert info["history"][-1]["loss"] < info["history"][0]["loss"] and info["layer"] == 3 == reft_layer(4, 1.0)
    ids = torch.tensor([[1, 2, 3]])
    base = tiny.model(ids).logits

    def stop(epoch, stats):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reft(tiny, examples, training, ReftConfig(epochs=2), on_epoch=stop)
    torch.testing.assert_close(tiny.model(ids).logits, base)  # the stopped edit is off the model
