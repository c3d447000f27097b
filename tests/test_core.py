"""The torch core: hooks, ranking, adapters, merge/export, evaluation, errors; tiny models and SmolLM2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from lofit_ray import Adapter, HeadOffsets, HeadSet, Phase2Config, TrainingConfig, train_offsets
from lofit_ray.architectures import FAMILIES, UnsupportedArchitectureError, head_layout, o_projs
from lofit_ray.evaluate import mc_metrics, mc_scores
from lofit_ray.heads import compare, jaccard, random_ranking
from lofit_ray.models import ModelSpecError, load_model
from lofit_ray.tasks import MCQuestion, PreferenceExample, SFTExample, get_task
from lofit_ray.train import NaNLossError, TorchStepper, train_loop

IDS = torch.randint(0, 2000, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# -- hooks ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_architecture_zero_offsets_leave_logits_unchanged(family):
    loaded = load_model(f"tiny-{family}")
    assert head_layout(loaded.model.config).num_heads == 4
    base = _logits(loaded.model)
    offsets = HeadOffsets(loaded.layout, scale=True, offset_heads=[(0, 1), (3, 2)], init_std=0.0).attach(loaded.model)
    assert torch.equal(_logits(loaded.model), base)
    with torch.no_grad():
        offsets.offset.fill_(0.5)
    assert not torch.allclose(_logits(loaded.model), base)
    with offsets.disabled():
        assert torch.equal(_logits(loaded.model), base)
    offsets.detach()
    assert torch.equal(_logits(loaded.model), base)


def test_hooked_offsets_equal_a_straightforward_reference(tiny):
    """z * (1 + A) + v on the o_proj input, computed head by head, equals the vectorized hook."""
    layout = tiny.layout
    offsets = HeadOffsets(layout, scale=True, offset_heads=[(1, 0), (1, 3), (2, 2)], init_std=0.3, seed=1)
    captured = {}
    proj = o_projs(tiny.model)[1]
    handle = proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].clone()))
    _logits(tiny.model)
    handle.remove()
    x = captured["x"]
    expected = x.clone()
    D = layout.head_dim
    for h in range(layout.num_heads):
        sl = slice(h * D, (h + 1) * D)
        expected[..., sl] = x[..., sl] * (1 + offsets.scale[1, h])
        for row, (layer, head) in enumerate(offsets.offset_heads):
            if (layer, head) == (1, h):
                expected[..., sl] += offsets.offset[row]
    torch.testing.assert_close(offsets.transform(1, x), expected)
    # layers without a selected head get no hook when only v is trained
    assert HeadOffsets(layout, offset_heads=[(2, 1)]).active_layers() == [2]


def test_offsets_reject_bad_heads(tiny):
    with pytest.raises(ValueError, match="outside"):
        HeadOffsets(tiny.layout, offset_heads=[(9, 0)])
    with pytest.raises(ValueError, match="twice"):
        HeadOffsets(tiny.layout, offset_heads=[(0, 0), (0, 0)])


# -- head sets ------------------------------------------------------------------------

def test_head_set_json_round_trip_random_control_and_compare(tiny, tmp_path):
    layout = asdict(tiny.layout)
    a = HeadSet("tiny-llama", tiny.fingerprint, layout, random_ranking(tiny.layout, 1), k=4, method="random", seed=1)
    b = HeadSet("tiny-llama", tiny.fingerprint, layout, random_ranking(tiny.layout, 2), k=4, method="random", seed=2)
    path = tmp_path / "a.json"
    a.to_json(path)
    again = HeadSet.from_json(path)
    assert again == a and again.top() == a.top()
    assert random_ranking(tiny.layout, 1) == a.ranking and a.top() != b.top()
    assert jaccard(a, a) == 1.0
    overlap = len(set(a.top()) & set(b.top()))
    assert compare({"a": a, "b": b})["pairs"][0]["overlap"] == overlap
    assert sum(compare({"a": a, "b": b})["per_layer"]["a"]) == 4
    with pytest.raises(ValueError, match="out of range"):
        HeadSet("tiny-llama", "x", layout, a.ranking, k=17)
    with pytest.raises(ValueError, match="larger than"):
        a.top(100)


# -- phase 2, adapters, merge ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_adapter(tiny):
    layout = asdict(tiny.layout)
    head_set = HeadSet("tiny-llama", tiny.fingerprint, layout, random_ranking(tiny.layout, 0), k=3, method="random")
    examples = [PreferenceExample(f"Q: colour {i}? A:", " blue", " green") for i in range(8)]
    return train_offsets(tiny, head_set, None, examples, TrainingConfig(batch_size=4), Phase2Config(epochs=2, lr=5e-2),
                        task="synthetic")


def test_adapter_trains_only_selected_heads_and_round_trips(tiny, trained_adapter, tmp_path):
    adapter = trained_adapter
    assert adapter.num_parameters == 3 * tiny.layout.head_dim
    assert adapter.offset.abs().max() > 1e-2  # it moved from the N(0, 1e-3) init
    adapter.save_pretrained(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "offsets.safetensors"]
    again = Adapter.from_pretrained(tmp_path / "ad")
    assert torch.equal(again.offset, adapter.offset) and again.config == adapter.config
    base = _logits(tiny.model)
    offsets = again.attach(tiny.model, tiny.fingerprint)
    hooked = _logits(tiny.model)
    offsets.detach()
    assert not torch.allclose(hooked, base)
    with pytest.raises(FileNotFoundError, match="lofit-ray train"):
        Adapter.from_pretrained(tmp_path / "missing")


def test_export_gives_a_plain_transformers_model_with_the_same_logits(tiny, trained_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    offsets = trained_adapter.attach(tiny.model)
    hooked = _logits(tiny.model)
    offsets.detach()
    out = trained_adapter.export(tiny, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(plain), hooked, atol=1e-4, rtol=0)
    assert plain.config.attention_bias is True


def test_export_refuses_a_model_no_stock_family_can_carry_merged():
    """Mistral with a sliding window inside its context: no o_proj bias flag, and Llama (which has one) does
    not slide; export says so and points at attaching the adapter, while the in-memory merge still works."""
    loaded = load_model("tiny-mistral")
    loaded.model.config.sliding_window = 24
    adapter = Adapter.from_offsets(HeadOffsets(loaded.layout, offset_heads=[(0, 0)]), loaded)
    with pytest.raises(UnsupportedArchitectureError, match="sliding window.*attach it"):
        adapter.export(loaded, "/tmp/never")
    model = adapter.merge_and_unload(loaded.model)  # in-memory merge still works
    assert o_projs(model)[0].bias is not None


# -- adapters for another model, or from broken files: exit 2 with one line ------------------

def _cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must exit 2 with one `error:` line and no traceback. Returns that line."""
    from lofit_ray.cli import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_adapter_trained_on_other_weights_exits_2_unless_allowed(trained_adapter, tmp_path, capsys):
    """Same layout, other fingerprint: eval and export refuse it naming both models;
    --allow-base-mismatch applies it with a warning."""
    from dataclasses import replace

    Adapter(replace(trained_adapter.config, base_model="someone/other-llama", fingerprint="0123456789abcdef"),
            trained_adapter.offset).save_pretrained(tmp_path / "other")
    export = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "other"), "--out", str(tmp_path / "m")]
    line = _cli_error(capsys, *export)
    assert "someone/other-llama" in line and "0123456789abcdef" in line and "tiny-llama" in line
    assert "--allow-base-mismatch" in line and not (tmp_path / "m").exists()
    line = _cli_error(capsys, "eval", "--model", "tiny-llama", "--task", "truthfulqa", "--limit", "1",
                      "--adapter", str(tmp_path / "other"))
    assert "someone/other-llama" in line and "tiny-llama" in line

    from lofit_ray.cli import main

    assert main([*export, "--allow-base-mismatch"]) == 0
    assert "warning" in capsys.readouterr().err and (tmp_path / "m" / "config.json").is_file()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def _rows_off_by_one(path):
    from safetensors.torch import load_file, save_file

    save_file({"offset": load_file(str(path))["offset"][:-1].contiguous()}, str(path))


BROKEN = {  # file -> how it is broken
    "offsets.safetensors": [_truncate, lambda p: p.write_bytes(b"\x00" * 64), _rows_off_by_one, lambda p: p.unlink()],
    "adapter_config.json": [lambda p: p.write_text("{not json"), lambda p: p.write_bytes(b"\xff\xfe\x00"),
                            lambda p: p.write_text("[1, 2]"), lambda p: p.write_text('{"base_model": "x"}'),
                            lambda p: p.write_text(p.read_text().replace('"heads": [', '"heads": [[99, 0], ')),
                            lambda p: p.unlink()],
}


@pytest.mark.parametrize("name,case", [(n, i) for n, cases in BROKEN.items() for i in range(len(cases))])
def test_a_broken_adapter_file_exits_2_naming_its_path(trained_adapter, tmp_path, capsys, name, case):
    """Corrupt, truncated, inconsistent (offset rows != heads, a head outside the model) or missing."""
    directory = trained_adapter.save_pretrained(tmp_path / "ad")
    BROKEN[name][case](directory / name)
    line = _cli_error(capsys, "export", "--model", "tiny-llama", "--adapter", str(directory),
                      "--out", str(tmp_path / "m"))
    assert str(directory / name) in line, line
    assert not (tmp_path / "m").exists()


# -- training loop guards ------------------------------------------------------------------

def _train_offsets(loaded, offsets, examples, training, epochs, lr, start_layer=0):
    """Phase 2's loop on given offsets (attached here, detached after)."""
    offsets.attach(loaded.model)
    try:
        return train_loop(loaded, examples, training, epochs, TorchStepper([offsets.offset], lr),
                          base_model=offsets.disabled, start_layer=start_layer)
    finally:
        offsets.detach()


def test_the_papers_optimizer_clips_then_decays_the_lr_linearly_to_zero():
    """lr_schedule linear + max_grad_norm (the paper's code, through transformers' Trainer defaults): the lr of
    step s is lr x (T - s) / T, and AdamW sees the clipped gradient (its first moment is 0.1 x the gradient)."""
    p = torch.nn.Parameter(torch.zeros(3))
    stepper = TorchStepper([p], lr=0.1, max_grad_norm=1.0, lr_schedule="linear", total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(stepper.optimizer.param_groups[0]["lr"])
        p.grad = torch.tensor([100.0, 0.0, 0.0])
        stepper.step()
        assert p.grad is None
        if len(lrs) == 1:
            torch.testing.assert_close(stepper.optimizer.state[p]["exp_avg"], torch.tensor([0.1, 0.0, 0.0]))
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025])
    constant = TorchStepper([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(3)
        constant.step()
    assert constant.optimizer.param_groups[0]["lr"] == 0.1  # the default: constant, no clipping


@pytest.mark.parametrize("field, value", [("lr_schedule", "cosine"), ("max_grad_norm", -1.0)])
def test_phase_optimizer_fields_are_checked(field, value):
    from lofit_ray.config import ConfigError, Phase1Config, Phase2Config

    for phase in (Phase1Config, Phase2Config):
        with pytest.raises(ConfigError, match=f"phase[12].{field}"):
            phase(**{field: value})


def test_nan_loss_stops_with_a_clear_error(tiny):
    offsets = HeadOffsets(tiny.layout, offset_heads=[(0, 0)])
    with torch.no_grad():
        offsets.offset.fill_(float("nan"))
    with pytest.raises(NaNLossError, match="lower the learning rate"):
        _train_offsets(tiny, offsets, [SFTExample("Q: a A:", " b")] * 4, TrainingConfig(batch_size=4), 1, 1e-2)


def test_k_larger_than_the_head_count_and_unknown_models_fail_early(tiny, monkeypatch):
    ranking = HeadSet("tiny-llama", tiny.fingerprint, asdict(tiny.layout), random_ranking(tiny.layout, 0))
    with pytest.raises(ValueError, match="larger than the 16 heads"):
        ranking.with_k(17)
    with pytest.raises(ValueError, match="ranking without K"):  # phase 2 needs a K: given, or the set's own
        train_offsets(tiny, ranking, None, [SFTExample("a", " b")], TrainingConfig(), Phase2Config())
    with pytest.raises(ModelSpecError, match="bundled name"):
        load_model("no-such-model")
    with monkeypatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelSpecError, match="'some-org/not-cached-model' is not in the Hugging Face cache and "
                                                 "HF_HUB_OFFLINE is set.*hf download some-org/not-cached-model"):
            load_model("some-org/not-cached-model")


def test_unsupported_architectures_are_named_with_what_is_missing():
    from transformers import GPT2Config, MambaConfig

    from lofit_ray.models import check_config

    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*layer 0.*no attention output "
                                                          "projection"):
        check_config(GPT2Config(n_layer=2, n_embd=64, n_head=4))  # its projection is a Conv1D, not a Linear
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported.*declares no attention heads"):
        head_layout(MambaConfig(num_hidden_layers=2, hidden_size=64))


# -- evaluation -------------------------------------------------------------------------

def _one_choice_at_a_time(loaded, items) -> list[list[float]]:
    """The plain definition of MC scoring: prefix + choice as one sequence, no cache, no batching."""
    tok, scores = loaded.tokenizer, []
    for item in items:
        prefix = tok(item.prefix, add_special_tokens=True)["input_ids"]
        row = []
        for choice in item.choices:
            ids = prefix + tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), dim=-1)
            row.append(logp[torch.arange(len(prefix) - 1, len(ids) - 1), torch.tensor(ids[len(prefix):])].sum().item())
        scores.append(row)
    return scores


@pytest.mark.parametrize("spec,window", [("tiny-llama", None), ("tiny-gemma3-wide", None), ("tiny-gemma3-wide", 24)])
def test_packed_mc_scoring_equals_one_choice_at_a_time(spec, window):
    """Shared-prefix cache, questions packed with all their choices, batches of mixed lengths: the same
    scores (1e-4 on MC1/MC2) as scoring each choice alone. window=24 puts Gemma-3's sliding window inside
    the prompts, so the packed mask must apply it by position."""
    loaded = load_model(spec)
    if window:
        loaded.model.config.sliding_window = window
    items = get_task("truthfulqa").eval_items(limit=9)
    expected = _one_choice_at_a_time(loaded, items)
    for share_prefix, tokens_per_batch in ((True, 1024), (True, 40), (False, 300)):
        got = mc_scores(loaded, items, share_prefix=share_prefix, tokens_per_batch=tokens_per_batch)
        for a, b in zip(got, expected):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-5)
        for name, value in mc_metrics(items, got).items():
            assert value == pytest.approx(mc_metrics(items, expected)[name], abs=1e-4)


def test_mc_metrics_follow_the_truthfulqa_definitions():
    item = MCQuestion("q", [" a", " b", " c"], labels=[1, 1, 0], best=1)
    m = mc_metrics([item], [[-1.0, -2.0, -1.5]])
    assert m["mc1"] == 0.0  # best (-2.0) does not beat the incorrect answer (-1.5)
    p = torch.tensor([-1.0, -2.0, -1.5]).exp()
    assert m["mc2"] == pytest.approx(float((p[0] + p[1]) / p.sum()))


# -- the real model -----------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_loads_and_a_few_dpo_steps_lower_the_loss(smollm2):
    layout = smollm2.layout
    assert (layout.num_layers, layout.num_heads, layout.head_dim) == (30, 9, 64)
    examples = get_task("truthfulqa").train_examples(limit=8)
    head_set = HeadSet("smollm2-135m", smollm2.fingerprint, asdict(layout), random_ranking(layout, 0), k=16)
    offsets = HeadOffsets(layout, offset_heads=head_set.top(), seed=0)
    history = _train_offsets(smollm2, offsets, examples, TrainingConfig(batch_size=8, max_length=96), 4, 2e-2,
                             start_layer=offsets.lowest_layer())
    assert history[0]["loss"] == pytest.approx(0.6931, abs=0.02)  # DPO starts at log 2
    assert history[-1]["loss"] < history[0]["loss"] - 0.05


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "lofit_ray.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


@pytest.mark.slow
def test_cli_select_tune_eval_export_end_to_end(tmp_path):
    def cli(*args):
        res = _cli(*args)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    common = ["--model", "tiny-llama", "--task", "truthfulqa"]
    out = cli("select", *common, "--limit", "8", "--k", "3", "--phase1-epochs", "1", "--out", str(tmp_path / "h.json"))
    assert "selected 3 of 16 heads" in out
    # train, eval and export take the model the head set / adapter records when --model is not given
    cli("train", "--task", "truthfulqa", "--limit", "8", "--heads", str(tmp_path / "h.json"), "--phase2-epochs", "1",
        "--out", str(tmp_path / "ad"))
    out = cli("eval", "--task", "truthfulqa", "--limit", "3", "--adapter", str(tmp_path / "ad"), "--out",
              str(tmp_path / "m.json"))
    assert "on tiny-llama" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["model"] == "tiny-llama"
    assert metrics["n"] == 3 and 0 <= metrics["mc2"] <= 1 and metrics["wall_seconds"] > 0
    assert metrics["mc2_ci_low"] <= metrics["mc2"] <= metrics["mc2_ci_high"]
    rows = [json.loads(line) for line in (tmp_path / "m.items.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and sum(r["mc2"] for r in rows) / 3 == pytest.approx(metrics["mc2"])
    assert all(len(r["choice_logprobs"]) == len(r["choices"]) == len(r["labels"]) for r in rows)
    out = cli("eval", *common, "--limit", "3", "--out", str(tmp_path / "zero.json"))
    assert "mc2" in out and "[" in out and "95% intervals" in out
    out = cli("compare", str(tmp_path / "m.json"), str(tmp_path / "zero.json"), "--out", str(tmp_path / "c.json"))
    paired = json.loads((tmp_path / "c.json").read_text())["paired"]
    zero = json.loads((tmp_path / "zero.json").read_text())
    assert paired["mc2"]["diff"] == pytest.approx(metrics["mc2"] - zero["mc2"]) and "p=" in out
    bad = _cli("compare", str(tmp_path / "m.json"), str(tmp_path / "nothing.json"))
    assert bad.returncode == 2 and "nothing.json: no such file" in bad.stderr
    cli("eval", *common, "--limit", "2", "--out", str(tmp_path / "two.json"))
    bad = _cli("compare", str(tmp_path / "m.json"), str(tmp_path / "two.json"))
    assert bad.returncode == 2 and "did not score the same items" in bad.stderr
    cli("export", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file()
    bad = _cli("select", *common, "--k", "99")
    assert bad.returncode == 2 and "choose K in 1..16" in bad.stderr and "--k 99" in bad.stderr
    # a ranking without K (select without --k): tune needs --k, and says so before loading the model
    out = cli("select", *common, "--selector", "random", "--out", str(tmp_path / "r.json"))
    assert "ranked all 16 heads (random)" in out and json.loads((tmp_path / "r.json").read_text())["k"] is None
    bad = _cli("train", *common, "--heads", str(tmp_path / "r.json"), "--model", "no-such-model")
    assert bad.returncode == 2 and "--k is required" in bad.stderr, bad.stderr
    out = cli("train", *common, "--limit", "4", "--heads", str(tmp_path / "r.json"), "--k", "2", "--phase2-epochs",
              "1", "--batch-size", "4", "--out", str(tmp_path / "ad2"))
    assert "trained offsets on 2 heads" in out
    # fit: both phases in one command, the ranking saved beside the adapter
    out = cli("fit", *common, "--limit", "8", "--k", "3", "--phase1-epochs", "1", "--phase2-epochs", "1", "--out",
              str(tmp_path / "fitted"))
    assert "trained offsets on 3 heads" in out and (tmp_path / "fitted" / "offsets.safetensors").is_file()
    fitted = json.loads((tmp_path / "fitted" / "heads.json").read_text())
    assert fitted["k"] == 3 and len(fitted["ranking"]) == 16
    # the phase-1 knobs of fit are the ones select takes: the same flags give the same ranking
    cli("select", *common, "--limit", "8", "--k", "3", "--phase1-epochs", "1", "--out", str(tmp_path / "h3.json"))
    assert json.loads((tmp_path / "h3.json").read_text())["ranking"] == fitted["ranking"]


def test_cli_select_rejects_k_below_one_before_loading_a_model(monkeypatch, capsys):
    from lofit_ray import models
    from lofit_ray.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert main(["select", "--model", "tiny-llama", "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lofit-ray select: error: --k 0") and "at least 1" in err
    assert main(["select", "--model", "tiny-llama", "--phase1-lr", "-1"]) == 2  # config checks name flag and field
    assert "--phase1-lr (phase1.lr)" in capsys.readouterr().err


def test_cli_search_config_error_exits_before_ray(tmp_path):
    """A bad --set value exits 2 naming the field, before Ray starts or MLflow creates its store."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["LOFIT_HOME"] = str(tmp_path / "home")
    res = _cli("search", "--config", str(repo / "configs" / "smoke.yaml"), "--set", "search.space.l1=[-1]",
               env=env, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("search: config error:")
    assert "search.space.l1" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_cli_modules_import_alone_without_a_cycle():
    """Each lofit_ray.cli module imports on its own (fresh, with the others unloaded), and none imports
    the package's __init__ names or a sibling other than common."""
    import ast
    from pathlib import Path

    cli_dir = Path(__file__).resolve().parents[1] / "lofit_ray" / "cli"
    modules = sorted(p.stem for p in cli_dir.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert {"common", "core", "baselines", "head_sets", "search", "old_spellings"} <= set(modules)
    for name in modules:
        tree = ast.parse((cli_dir / f"{name}.py").read_text())
        siblings = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        siblings |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1
                     and n.module is None for a in n.names}
        assert siblings <= ({"common"} if name != "common" else set()), (name, siblings)
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    for m in [m for m in sys.modules if m == 'lofit_ray.cli' or m.startswith('lofit_ray.cli.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module('lofit_ray.cli.' + name)\n"
            "from lofit_ray.cli import build_parser\n"
            "build_parser()\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_skipping_frozen_layers_trains_the_same_offsets(family):
    """Phase 2 with the layers below the lowest selected head cached equals running the full model."""
    loaded = load_model(f"tiny-{family}")
    examples = get_task("truthfulqa").train_examples(limit=8)
    trained = []
    for skip in (True, False):
        offsets = HeadOffsets(loaded.layout, offset_heads=[(2, 1), (3, 0)], seed=0)
        history = _train_offsets(loaded, offsets, examples, TrainingConfig(batch_size=4), 2, 1e-2,
                                 start_layer=offsets.lowest_layer() if skip else 0)
        trained.append((offsets.offset.detach(), history[-1]["loss"]))
    torch.testing.assert_close(trained[0][0], trained[1][0], atol=1e-6, rtol=0)
    assert trained[0][1] == pytest.approx(trained[1][1], abs=1e-5)
    assert len(list(o_projs(loaded.model))) == 4  # the decoder got its full layer list back


def test_generation_batched_by_length_and_stopped_early_scores_like_one_prompt_at_a_time(smollm2):
    """MQuAKE items on the real model: length-sorted batches that stop each row once its match is settled
    give every item the same (strict, lenient) match as unbatched generation to max_new_tokens."""
    from lofit_ray.evaluate import generate
    from lofit_ray.tasks import match_item, match_settled

    items = get_task("mquake").eval_items(limit=8)
    prompts = [item.prompt for item in items]
    full = [generate(smollm2, [p], items[0].max_new_tokens, batch_size=1)[0] for p in prompts]
    fast = generate(smollm2, prompts, items[0].max_new_tokens, batch_size=4,
                    settled=lambda i, text: match_settled(text, items[i]))
    assert [match_item(t, item) for t, item in zip(fast, items)] == [match_item(t, item) for t, item in zip(full, items)]
    def tokens(texts):
        return sum(len(smollm2.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    assert tokens(fast) < tokens(full)  # rows did stop early


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gemma3-wide"])
def test_packed_training_batches_give_the_padded_log_probs_and_gradients(spec):
    """batching.pack (several sequences per row, attention kept within each), with and without each pair's
    prompt run once for both answers, against one right-padded sequence per row: the same per-sequence
    log-probs and the same offset gradients, with and without the frozen layers below the heads cached
    (the path phase 2 takes)."""
    from lofit_ray import batching, frozen_layers
    from lofit_ray.losses import answer_logprobs

    loaded = load_model(spec)
    examples = get_task("truthfulqa").train_examples(limit=6)
    encoded = batching.encode_examples(loaded.tokenizer, examples, 64)
    padded = batching.batch_items(encoded, 0)
    packed, shared = (batching.batch_items(encoded, 0, packed=True, share_prompts=s) for s in (False, True))
    assert packed.input_ids.numel() < padded.input_ids.numel()  # fewer pad tokens
    real = [int((b.sequence >= 0).sum()) for b in (packed, shared)]
    prompts = sum(c.answer_start for c, _ in encoded)
    assert shared.group is not None and real[1] == real[0] - prompts  # each prompt once
    layout = loaded.layout
    offsets = HeadOffsets(layout, offset_heads=[(1, 0), (layout.num_layers - 1, 1)], seed=0).attach(loaded.model)
    try:
        results = []
        for batch in (padded, packed, shared):
            logp = answer_logprobs(loaded.model, batch)
            logp.sum().backward()
            results.append((logp.detach(), offsets.offset.grad.clone()))
            offsets.offset.grad = None
        for logp, grad in results[1:]:
            torch.testing.assert_close(logp, results[0][0], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(grad, results[0][1], atol=1e-4, rtol=1e-4)
        flat = [s for pair in encoded for s in pair]
        hidden = frozen_layers.capture(loaded.model, flat, 1, 0)
        rows = [hidden[2 * i] for i in range(len(encoded))] + [hidden[2 * i + 1] for i in range(len(encoded))]
        for batch in (packed, shared):
            with frozen_layers.tail_only(loaded.model, 1):
                tail = answer_logprobs(loaded.model, batch, inputs_embeds=frozen_layers.embeds_batch(batch, rows))
            torch.testing.assert_close(tail.detach(), results[0][0], atol=1e-4, rtol=1e-5)
    finally:
        offsets.detach()
