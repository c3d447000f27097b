"""Tests that guard the science: places where a silent regression would still let every other test pass.

DPO pushes toward the chosen answer; MC1/MC2 follow TruthfulQA's definitions and score only the answer's
tokens; train, selection carve and report share no question; cache and memo keys miss whenever what they
stand for changes; the hook, the merge and the export agree on real geometries (SmolLM2's tied embeddings,
Gemma-3's heads x head_dim != hidden_size).
"""
from __future__ import annotations

import copy
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lofit_ray import Adapter, HeadOffsets, HeadSet, Phase1Config, Phase2Config, TrainingConfig, train_offsets
from lofit_ray import batching, cache_version, losses, models, train
from lofit_ray.architectures import o_projs
from lofit_ray.evaluate import mc_metrics, mc_scores
from lofit_ray.heads import random_ranking
from lofit_ray.models import load_model
from lofit_ray.splits import build_splits
from lofit_ray.tasks import MCQuestion, PreferenceExample, get_task
from lofit_ray.tasks.truthfulqa import mc_prefix

IDS = torch.randint(0, 2000, (2, 13), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# -- 1. DPO direction ---------------------------------------------------------------------------

def test_dpo_loss_matches_hand_computed_values_and_pushes_toward_chosen():
    """dpo_loss reads [chosen..., rejected...] and rewards chosen-minus-rejected gains over the reference.

    pair 1: chosen gains -1.0 - (-1.5) = 0.5, rejected gains -3.0 - (-2.0) = -1.0: margin 1.5, beta*m = 0.75,
            loss log(1 + e^-0.75) = 0.3868710...
    pair 2: chosen gains 0.0, rejected gains -1.0 - (-2.0) = 1.0: margin -1.0, beta*m = -0.5,
            loss log(1 + e^0.5) = 0.9740770...
    mean 0.6804740...; swapping chosen and rejected would give 0.8054740..., pairs interleaved 0.9446006...
    """
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.0], requires_grad=True)  # c1, c2, r1, r2
    reference = torch.tensor([-1.5, -2.0, -2.0, -2.0])
    loss = losses.dpo_loss(policy, reference, beta=0.5)
    assert loss.item() == pytest.approx((0.3868710 + 0.9740770) / 2, abs=1e-6)
    loss.backward()
    # lowering the loss means raising the chosen log-probs and lowering the rejected ones
    assert (policy.grad[:2] < 0).all() and (policy.grad[2:] > 0).all()
    # beta scales the margin: at beta=0 every pair costs log 2
    assert losses.dpo_loss(policy, reference, beta=1e-9).item() == pytest.approx(math.log(2), abs=1e-6)


PAIRS = [(" blue", " green"), (" yes", " no"), (" Paris", " Rome"), (" true", " false")]


def _margins(loaded, examples, adapter=None) -> torch.Tensor:
    """Chosen-minus-rejected answer log-prob per pair, with the adapter hooked on (or the base model)."""
    tok = loaded.tokenizer
    encoded = batching.encode_examples(tok, examples, 128)
    batch = batching.batch_items(encoded, train.pad_id(loaded))
    n = len(examples)
    for i, ex in enumerate(examples):  # the layout the margin below assumes: [chosen..., rejected...]
        assert tok.decode(batch.input_ids[i][batch.answer_mask[i]]) == ex.chosen
        assert tok.decode(batch.input_ids[n + i][batch.answer_mask[n + i]]) == ex.rejected
    hooked = adapter.attach(loaded.model) if adapter is not None else None
    try:
        with torch.no_grad():
            logp = losses.answer_logprobs(loaded.model, batch)
    finally:
        if hooked is not None:
            hooked.detach()
    return logp[:n] - logp[n:]


def _private_reference_cache(monkeypatch, tmp_path):
    """Reference log-probs go to tmp_path/reference for this test only."""
    monkeypatch.setenv("LOFIT_REFERENCE_CACHE", str(tmp_path / "reference"))
    monkeypatch.setattr(train, "cache_dir", lambda: tmp_path)


def test_phase2_dpo_raises_the_chosen_minus_rejected_margin(tiny, tmp_path, monkeypatch):
    """Phase 2 on preference pairs moves every pair's margin up relative to the reference model."""
    _private_reference_cache(monkeypatch, tmp_path)
    examples = [PreferenceExample(f"Q: {q} A:", c, r) for q in ("Pick one.", "Which is right?") for c, r in PAIRS]
    head_set = HeadSet("tiny-llama", tiny.fingerprint, asdict(tiny.layout), random_ranking(tiny.layout, 0), k=4,
                       method="random")
    before = _margins(tiny, examples)
    adapter = train_offsets(tiny, head_set, None, examples, TrainingConfig(batch_size=4, seed=0),
                            Phase2Config(epochs=3, lr=5e-2))
    gain = _margins(tiny, examples, adapter) - before
    assert (gain > 0).all(), gain
    assert gain.mean() > 0.2, gain
    assert adapter.config.hparams["final_loss"] < math.log(2)


# -- 2. MC1 / MC2 ---------------------------------------------------------------------------------

L = math.log


@pytest.mark.parametrize("labels,best,scores,mc1,mc2", [
    # a tie between the best correct and the best incorrect answer is not a win (TruthfulQA uses >)
    ([1, 0], 0, [-1.0, -1.0], 0.0, 0.5),
    # several correct answers: MC1 asks about the BEST answer only, even when another correct one wins;
    # MC2 = (0.1 + 0.4) / (0.1 + 0.4 + 0.2 + 0.05) = 2/3
    ([1, 1, 0, 0], 0, [L(0.1), L(0.4), L(0.2), L(0.05)], 0.0, 2 / 3),
    ([1, 1, 0, 0], 1, [L(0.1), L(0.4), L(0.2), L(0.05)], 1.0, 2 / 3),
    # best=-1 means the first correct answer
    ([0, 1, 1], -1, [L(0.2), L(0.3), L(0.1)], 1.0, 4 / 6),
    # MC2 normalises over the choices (0.1 raw mass -> 0.5), and survives log-probs whose exp underflows
    ([1, 0], 0, [L(0.1), L(0.1)], 0.0, 0.5),
    ([1, 0, 0], 0, [-1000 + L(0.3), -1000 + L(0.1), -1000 + L(0.6)], 0.0, 0.3),
    ([1, 0, 0], 0, [-1000 + L(0.6), -1000 + L(0.1), -1000 + L(0.3)], 1.0, 0.6),
])
def test_mc_metrics_hand_computed(labels, best, scores, mc1, mc2):
    """MC1: the best answer strictly beats every incorrect one; MC2: normalised mass on the correct ones."""
    item = MCQuestion("q", [f" {i}" for i in range(len(labels))], labels=labels, best=best)
    m = mc_metrics([item], [scores])
    assert m["mc1"] == mc1
    assert m["mc2"] == pytest.approx(mc2, abs=1e-9)


def test_mc_metrics_average_over_questions():
    items = [MCQuestion("a", [" x", " y"], [1, 0]), MCQuestion("b", [" x", " y"], [1, 0])]
    m = mc_metrics(items, [[L(0.75), L(0.25)], [L(0.2), L(0.8)]])
    assert m == pytest.approx({"mc1": 0.5, "mc2": (0.75 + 0.2) / 2})


def _manual_choice_scores(loaded, item, extra: int) -> list[float]:
    """Full-sequence log-probs of each choice's tokens, plus the `extra` prompt tokens just before them."""
    tok, model = loaded.tokenizer, loaded.model
    prefix = tok(item.prefix, add_special_tokens=True)["input_ids"]
    out = []
    for choice in item.choices:
        ids = prefix + tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        per_token = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # [t-1] = log p(ids[t] | ids[:t])
        out.append(per_token[len(prefix) - 1 - extra:].sum().item())
    return out


def test_mc_scores_sum_only_the_answer_tokens_after_the_answer_cue(tiny):
    """The reference eval drops the 3 tokens of "\\nA:" from each choice's sum; here they end the prefix and
    are never scored. Including them would shift every score by about 3 x log(vocab) on a random model."""
    items = [MCQuestion(q, [" Yes.", " No, never."], [1, 0], prefix=mc_prefix(q))
             for q in ("Is the sky blue?", "Can pigs fly?")]
    cue = tiny.tokenizer(items[0].prefix, add_special_tokens=True)["input_ids"][-3:]
    assert tiny.tokenizer.decode(cue) == "\nA:"
    for share_prefix in (True, False):
        scores = mc_scores(tiny, items, share_prefix=share_prefix)
        for item, got in zip(items, scores):
            answer_only = _manual_choice_scores(tiny, item, extra=0)
            with_cue = _manual_choice_scores(tiny, item, extra=3)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(answer_only), atol=2e-3, rtol=1e-4)
            assert all(abs(a - b) > 1.0 for a, b in zip(answer_only, with_cue))


# -- 3. Disjoint splits ------------------------------------------------------------------------------

def _question(x) -> str:
    """The question a row asks, normalised (whitespace, case), whatever shape the row has."""
    if isinstance(x, PreferenceExample):  # TruthfulQA training pair: "Q: {question} A:"
        text = x.prompt.removeprefix("Q: ").removesuffix(" A:")
    elif isinstance(x, MCQuestion):
        text = x.question
    else:
        text = x.prompt
    return " ".join(text.split()).casefold()


@pytest.mark.parametrize("name", ["truthfulqa", "mquake", "clutrr"])
def test_train_selection_and_report_share_no_question(name):
    """No question is trained on and then used to select hyperparameters or to report (CLUTRR's files repeat
    some rows, within train and between train and val)."""
    s = build_splits(get_task(name))
    train_q, select_q, report_q = ({_question(x) for x in part} for part in (s.train, s.select, s.report))
    assert train_q and select_q and report_q
    for (a, qa), (b, qb) in [(("train", train_q), ("select", select_q)), (("train", train_q), ("report", report_q)),
                             (("select", select_q), ("report", report_q))]:
        shared = qa & qb
        assert not shared, f"{name}: {len(shared)} question(s) in both {a} and {b}, e.g. {sorted(shared)[0][:120]!r}"


# -- 4. Cache and memo keys --------------------------------------------------------------------------

P1 = dict(fingerprint="fp-a", train_hash="data-a", task="truthfulqa", training=TrainingConfig(),
          phase1=Phase1Config())
P1_CHANGES = {
    "l1": dict(phase1=Phase1Config(l1=1e-3)),
    "lr": dict(phase1=Phase1Config(lr=1e-2)),
    "epochs": dict(phase1=Phase1Config(epochs=2)),
    "selector": dict(phase1=Phase1Config(selector="gates")),
    "batch_size": dict(training=TrainingConfig(batch_size=4)),
    "max_length": dict(training=TrainingConfig(max_length=64)),
    "dpo_beta": dict(training=TrainingConfig(dpo_beta=0.1)),
    "seed": dict(training=TrainingConfig(seed=1)),
    "data": dict(train_hash="data-b"),
    "fingerprint": dict(fingerprint="fp-b"),
    "task": dict(task="mquake"),
}


def _phase1_key(**kw):
    return train.phase1_key(**{**P1, **kw})


def test_phase1_key_hits_on_equal_inputs():
    same = dict(fingerprint="fp-a", train_hash="data-a", task="truthfulqa", training=TrainingConfig(),
                phase1=Phase1Config())
    assert train.phase1_key(**same) == _phase1_key()


@pytest.mark.parametrize("field", sorted(P1_CHANGES))
def test_phase1_key_misses_when_an_input_changes(field):
    """The phase-1 memo must not serve a ranking computed under different settings."""
    change = P1_CHANGES[field]
    assert all(P1[k] != v for k, v in change.items())
    assert _phase1_key(**change) != _phase1_key()


def test_both_keys_miss_when_the_code_version_changes(monkeypatch):
    encoded = [(batching.Sequence([1, 2, 3], 2), batching.Sequence([1, 2, 4], 2))]
    before = _phase1_key(), losses.data_key("fp-a", encoded, 128)
    monkeypatch.setattr(cache_version, "CACHE_VERSION", cache_version.CACHE_VERSION + "-edited")
    assert _phase1_key() != before[0]
    assert losses.data_key("fp-a", encoded, 128) != before[1]


def test_cache_version_follows_the_source_of_every_module_behind_the_caches(tmp_path, monkeypatch):
    """Editing any module that computes a cached value gives a new CACHE_VERSION."""
    src = Path(cache_version.__file__).parent
    for name in cache_version.CODE_MODULES:
        shutil.copy(src / name, tmp_path / name)
    assert cache_version.source_hash(tmp_path) == cache_version.CACHE_VERSION
    seen = {cache_version.CACHE_VERSION}
    expected = ("train.py", "losses.py", "offsets.py", "batching.py", "frozen_layers.py", "architectures.py", "heads.py",
                "selectors.py")
    assert set(cache_version.CODE_MODULES) == set(expected)
    for name in expected:
        with open(tmp_path / name, "a") as f:
            f.write("\n# edited\n")
        seen.add(cache_version.source_hash(tmp_path))
    assert len(seen) == len(expected) + 1


def test_one_value_changed_in_the_last_layer_misses_every_cache_keyed_on_the_weights(tmp_path, monkeypatch):
    """A checkpoint rewritten in place (same path, same size) with one value of its last layer changed gets
    a new fingerprint of the same form, so the phase-1 memo key and the DPO reference cache both miss. The load
    dtype changes the cache key, not the fingerprint (an adapter still applies)."""
    monkeypatch.setenv("LOFIT_REFERENCE_CACHE", str(tmp_path / "reference"))
    source = load_model("tiny-llama")
    directory = tmp_path / "ckpt"
    source.model.save_pretrained(directory)
    source.tokenizer.save_pretrained(directory)
    size = (directory / "model.safetensors").stat().st_size
    pairs = batching.encode_examples(source.tokenizer, [PreferenceExample("Q: sky? A:", " blue", " green")], 64)
    training = TrainingConfig()

    before = load_model(str(directory))
    ref_before = train.reference_logprobs(before, pairs, training)
    with torch.no_grad():
        source.model.model.layers[-1].mlp.down_proj.weight[0, 0] += 1.0
    source.model.save_pretrained(directory)
    assert (directory / "model.safetensors").stat().st_size == size
    after = load_model(str(directory))

    assert after.fingerprint != before.fingerprint and len(after.fingerprint) == len(before.fingerprint) == 16
    p1 = dict(train_hash="data-a", task="truthfulqa", training=training, phase1=Phase1Config())
    assert train.phase1_key(after.cache_key, **p1) != train.phase1_key(before.cache_key, **p1)
    ref_after = train.reference_logprobs(after, pairs, training)
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 2  # a second entry: the first was not served
    assert not torch.equal(ref_after, ref_before)
    half = load_model(str(directory), dtype="bfloat16")
    assert half.fingerprint == after.fingerprint and half.cache_key != after.cache_key
    # a model built in memory (no files) is hashed in full too
    assert models.fingerprint(source.model) != load_model("tiny-llama").fingerprint


def test_a_file_is_hashed_once_and_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    """The index answers while the file's size and mtime are unchanged (a planted hash is read back, so it was
    not recomputed); a new mtime hashes the bytes again. A HF-cache blob link is known by the blob's name."""
    import hashlib
    import json
    import os

    from lofit_ray import content_hash

    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 10_000)  # 2.5 MB: more than one read chunk
    real = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert content_hash.file_hash(weights) == real
    index = json.loads(content_hash.index_path().read_text())
    index[str(weights.resolve())]["sha256"] = "planted"
    content_hash.index_path().write_text(json.dumps(index))
    assert content_hash.file_hash(weights) == "planted"  # an index hit: the bytes were not read
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert content_hash.file_hash(weights) == real  # same size, new mtime: hashed again

    blob = tmp_path / "hub" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    (tmp_path / "hub" / "snapshot.safetensors").symlink_to(blob)
    assert content_hash.file_hash(tmp_path / "hub" / "snapshot.safetensors") == "ab" * 32


def _pairs(c=(1, 5, 6), r=(1, 5, 7), start=2):
    return [(batching.Sequence(list(c), start), batching.Sequence(list(r), start))]


DATA_CHANGES = {
    "fingerprint": lambda: losses.data_key("fp-b", _pairs(), 128),
    "max_length": lambda: losses.data_key("fp-a", _pairs(), 64),
    "token ids": lambda: losses.data_key("fp-a", _pairs(c=(1, 5, 8)), 128),
    "answer start": lambda: losses.data_key("fp-a", _pairs(start=1), 128),
    "chosen and rejected swapped": lambda: losses.data_key("fp-a", _pairs(c=(1, 5, 7), r=(1, 5, 6)), 128),
}


@pytest.mark.parametrize("field", sorted(DATA_CHANGES))
def test_reference_data_key_misses_when_an_input_changes(field):
    """The reference log-prob cache must not serve log-probs of another model, text or truncation."""
    base = losses.data_key("fp-a", _pairs(), 128)
    assert losses.data_key("fp-a", _pairs(), 128) == base
    assert DATA_CHANGES[field]() != base


def test_reference_logprobs_on_disk_ignore_beta_but_not_max_length(tiny, tmp_path, monkeypatch):
    """beta does not enter the reference log-probs, so another beta reuses the file; another max_length
    (a different truncation) computes and stores a new one."""
    _private_reference_cache(monkeypatch, tmp_path)
    runs = []
    real = losses.answer_logprobs
    monkeypatch.setattr(losses, "answer_logprobs", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    examples = [PreferenceExample(f"Q: {i} A:", c, r) for i, (c, r) in enumerate(PAIRS)]
    training = TrainingConfig(batch_size=4, max_length=64, dpo_beta=0.5)

    def reference(t):
        return train.reference_logprobs(tiny, batching.encode_examples(tiny.tokenizer, examples, t.max_length), t)

    first = reference(training)
    assert len(runs) == 1 and len(list((tmp_path / "reference").glob("*.pt"))) == 1
    assert torch.equal(reference(replace(training, dpo_beta=0.1)), first)
    assert len(runs) == 1  # a hit: the model did not run
    again = reference(replace(training, max_length=48))
    assert len(runs) == 2 and len(list((tmp_path / "reference").glob("*.pt"))) == 2
    torch.testing.assert_close(again, first)  # these prompts are short: same values, still a separate entry


# -- 5. The real geometry -------------------------------------------------------------------------------

def _big_adapter(loaded, heads) -> Adapter:
    """Offsets large enough to move the logits visibly."""
    return Adapter.from_offsets(HeadOffsets(loaded.layout, offset_heads=heads, init_std=0.5, seed=3), loaded)


def _check_export_and_merge(loaded, adapter, directory, atol):
    from transformers import AutoModelForCausalLM

    base = _logits(loaded.model)
    hooks = adapter.attach(loaded.model)
    hooked = _logits(loaded.model)
    hooks.detach()
    assert (hooked - base).abs().max() > 50 * atol  # the comparison below is not vacuous
    merged = adapter.merge_and_unload(copy.deepcopy(loaded.model))
    torch.testing.assert_close(_logits(merged), hooked, atol=atol, rtol=0)
    del merged
    plain = AutoModelForCausalLM.from_pretrained(adapter.export(loaded, directory)).eval()
    torch.testing.assert_close(_logits(plain), hooked, atol=atol, rtol=0)
    assert torch.equal(_logits(loaded.model), base)  # the loaded model was left untouched
    return plain


def _check_hook_against_manual(loaded, heads):
    """At every layer, o_proj's output with the hook on equals o_proj applied to z * (1 + A) + v computed
    head by head from o_proj's raw input."""
    layout = loaded.layout
    H, D = layout.num_heads, layout.head_dim
    offsets = HeadOffsets(layout, scale=True, offset_heads=heads, init_std=0.3, seed=1)
    projs = o_projs(loaded.model)
    seen = {}
    # registered before the LoFiT hook, so it sees the raw head outputs
    handles = [p.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(("in", l), a[0].clone()))
               for l, p in enumerate(projs)]
    offsets.attach(loaded.model)
    handles += [p.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(("out", l), out.clone()))
                for l, p in enumerate(projs)]
    try:
        _logits(loaded.model)
    finally:
        for h in handles:
            h.remove()
        offsets.detach()
    with torch.no_grad():
        for layer, proj in enumerate(projs):
            x = seen["in", layer]
            assert x.shape[-1] == H * D == proj.in_features
            z = x.clone()
            for head in range(H):
                sl = slice(head * D, (head + 1) * D)
                z[..., sl] = x[..., sl] * (1 + offsets.scale[layer, head])
                for row, (l, h) in enumerate(offsets.offset_heads):
                    if (l, h) == (layer, head):
                        z[..., sl] += offsets.offset[row]
            torch.testing.assert_close(seen["out", layer], F.linear(z, proj.weight, proj.bias), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def wide():
    """A tiny Gemma-3 whose heads x head_dim (4 x 32) is twice its hidden_size (64), as Gemma-3-270M's."""
    loaded = load_model("tiny-gemma3-wide")
    layout, config = loaded.layout, loaded.model.config
    assert (layout.num_heads, layout.head_dim, config.hidden_size) == (4, 32, 64)
    return loaded


def test_wide_heads_hook_equals_manual_o_proj_input(wide):
    _check_hook_against_manual(wide, [(0, 3), (2, 0), (2, 1)])


def test_wide_heads_export_and_merge_equal_the_hook(wide, tmp_path):
    plain = _check_export_and_merge(wide, _big_adapter(wide, [(0, 3), (2, 0), (3, 2)]), tmp_path / "merged", 1e-4)
    assert plain.config.head_dim == 32 and plain.config.attention_bias is True


@pytest.mark.slow
def test_smollm2_hook_equals_manual_o_proj_input(smollm2):
    _check_hook_against_manual(smollm2, [(0, 8), (11, 2), (29, 0)])


@pytest.mark.slow
def test_smollm2_tied_embeddings_export_and_merge_equal_the_hook(smollm2, tmp_path):
    assert smollm2.model.config.tie_word_embeddings
    plain = _check_export_and_merge(smollm2, _big_adapter(smollm2, [(0, 8), (11, 2), (29, 0)]), tmp_path / "merged",
                                    2e-3)
    assert plain.config.tie_word_embeddings
    assert plain.get_output_embeddings().weight.data_ptr() == plain.get_input_embeddings().weight.data_ptr()
