"""Head selectors (lofit_ray.selectors) on tiny random models: what each ranks, and why.

The distributed versions (Ray Train + DeepSpeed equal to one process) are in test_service.py.
"""
from __future__ import annotations

import pytest
import torch

from lofit_ray import Phase1Config, TrainingConfig, select_heads
from lofit_ray.architectures import o_projs
from lofit_ray.config import ConfigError
from lofit_ray.heads import random_ranking
from lofit_ray.models import load_model
from lofit_ray.offsets import HeadOffsets
from lofit_ray.selectors import HeadGates
from lofit_ray.tasks import PreferenceExample, SFTExample
from lofit_ray.train import phase1_key, train_loop

PLANTED = {(1, 2), (3, 0)}


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama in which only two heads reach the output (the others' o_proj columns are zero), so only
    those two can matter to any loss."""
    loaded = load_model("tiny-llama", seed=5)
    D = loaded.layout.head_dim
    with torch.no_grad():
        for layer, proj in enumerate(o_projs(loaded.model)):
            for head in range(loaded.layout.num_heads):
                if (layer, head) not in PLANTED:
                    proj.weight[:, head * D:(head + 1) * D] = 0
    return loaded


SFT = [SFTExample(f"Q: item {i} A:", " yes") for i in range(16)]
DPO = [PreferenceExample(f"Q: colour {i}? A:", " blue", " green") for i in range(8)]


@pytest.mark.parametrize("selector", ["l1", "gates", "grad", "grad_x_act"])
def test_every_selector_ranks_the_planted_heads_first(planted, selector):
    phase1 = Phase1Config(selector=selector, epochs=3, lr=2e-2, l1=1e-3, l0=1e-2)
    head_set = select_heads(planted, SFT, TrainingConfig(batch_size=8, seed=0), phase1)
    assert set(head_set.top(2)) == PLANTED
    scores = [s for _, _, s in head_set.ranking]
    assert len(scores) == planted.layout.total_heads and scores == sorted(scores, reverse=True)
    assert head_set.method == ("lofit" if selector == "l1" else selector)
    assert head_set.hparams["selector"] == selector and head_set.hparams["selector_seconds"] > 0
    if selector.startswith("grad"):  # heads that never reach the output have exactly no gradient
        assert scores[1] > 0 and max(scores[2:]) == 0.0
    else:
        assert scores[1] > scores[2]


def _mean_loss(loaded, examples, training, offsets) -> float:
    """The mean batch loss of one pass, no steps (what the grad selector differentiates)."""
    class NoStep:
        def backward(self, loss):
            pass

        def step(self):
            pass

    with torch.no_grad():
        history = train_loop(loaded, examples, training, 1, NoStep(), base_model=offsets.disabled)
    return history[0]["loss"]


@pytest.mark.parametrize("examples", [SFT, DPO], ids=["sft", "dpo"])
def test_grad_scores_are_the_gradient_norm_of_the_loss_in_each_heads_offset(tiny, examples):
    """Finite differences along the gradient's own direction give its norm: for the top head, moving v by
    +-eps along dL/dv changes the mean loss by 2 eps ||dL/dv||."""
    training = TrainingConfig(batch_size=4, seed=1)
    head_set = select_heads(tiny, examples, training, Phase1Config(selector="grad"))
    layer, head, score = head_set.ranking[0]
    assert score > 0
    # the gradient's direction for that head, by autograd on a one-head offset
    probe = HeadOffsets(tiny.layout, offset_heads=[(layer, head)], init_std=0.0).attach(tiny.model)
    try:
        class Accumulate:
            def backward(self, loss):
                loss.backward()

            def step(self):
                pass

        train_loop(tiny, examples, training, 1, Accumulate(), base_model=probe.disabled)
        direction = probe.offset.grad[0] / probe.offset.grad[0].norm()
        eps, losses = 1e-3, []
        for sign in (1, -1):
            with torch.no_grad():
                probe.offset.copy_(sign * eps * direction[None])
            losses.append(_mean_loss(tiny, examples, training, probe))
    finally:
        probe.detach()
    assert (losses[0] - losses[1]) / (2 * eps) == pytest.approx(score, rel=2e-2)


def test_grad_x_act_bounds_the_first_order_effect_of_removing_each_head(tiny):
    """Scaling a head's output by (1 - eps) changes the loss by -eps sum_t dL/dz_t . z_t to first order;
    grad_x_act sums |dL/dz_t . z_t| per token, so it bounds that change for every head."""
    training = TrainingConfig(batch_size=16, seed=0)  # one batch: the score is that batch's
    head_set = select_heads(tiny, SFT, training, Phase1Config(selector="grad_x_act"))
    scores = {(l, h): s for l, h, s in head_set.ranking}
    base = HeadOffsets(tiny.layout, scale=True, init_std=0.0).attach(tiny.model)
    try:
        reference = _mean_loss(tiny, SFT, training, base)
        eps = 1e-3
        for (layer, head), score in list(scores.items())[:6]:
            with torch.no_grad():
                base.scale.zero_()
                base.scale[layer, head] = -eps
            change = abs(_mean_loss(tiny, SFT, training, base) - reference) / eps
            assert change <= score * 1.02 + 1e-6, (layer, head, change, score)
    finally:
        base.detach()
    assert max(scores.values()) > 0


def test_gates_penalty_closes_gates_and_the_draws_are_seeded(tiny):
    training = TrainingConfig(batch_size=8, seed=2)
    weak = select_heads(tiny, SFT, training, Phase1Config(selector="gates", epochs=2, lr=5e-2, l0=0.0))
    strong = select_heads(tiny, SFT, training, Phase1Config(selector="gates", epochs=2, lr=5e-2, l0=1.0))
    again = select_heads(tiny, SFT, training, Phase1Config(selector="gates", epochs=2, lr=5e-2, l0=1.0))
    mean = lambda hs: sum(s for _, _, s in hs.ranking) / len(hs.ranking)
    assert mean(strong) < mean(weak)  # the expected-L0 penalty closes gates
    assert strong.ranking == again.ranking  # same seed, same gate draws, same ranking
    joint = select_heads(tiny, SFT, training, Phase1Config(selector="gates", epochs=1, gate_parts="joint"))
    assert joint.ranking != weak.ranking


def test_hard_concrete_gates_follow_their_definition(tiny):
    gates = HeadGates(tiny.layout, separate=True, seed=0)
    with torch.no_grad():
        gates.log_alpha.fill_(0.0)
    # P(open) = sigmoid(log_alpha - beta log(-gamma/zeta)) = sigmoid(-(2/3) log(0.1/1.1)) at log_alpha 0
    expected = torch.sigmoid(torch.tensor(-(2 / 3) * torch.log(torch.tensor(0.1 / 1.1)).item()))
    torch.testing.assert_close(gates.open_probability(), torch.full_like(gates.log_alpha, expected.item()))
    draws = torch.stack([gates.sample_gates() for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert (draws > 0).float().mean().item() == pytest.approx(expected.item(), abs=0.02)  # empirical P(open)
    gates.eval()
    torch.testing.assert_close(gates.sample_gates(), torch.full_like(gates.log_alpha, 0.5))  # sigmoid(0) stretched


def test_random_selector_is_the_seeded_control_and_needs_no_data(tiny):
    head_set = select_heads(tiny, [], TrainingConfig(seed=7), Phase1Config(selector="random"))
    assert head_set.ranking == random_ranking(tiny.layout, 7) and head_set.method == "random"


def test_the_memo_key_holds_only_what_the_selector_reads():
    training = TrainingConfig()
    key = lambda **kw: phase1_key("fp", "data", "task", training, Phase1Config(**kw))
    assert key(selector="grad", lr=1e-2, l1=1e-3) == key(selector="grad", lr=5e-3, l1=0.0)
    assert key(selector="random", epochs=1) == key(selector="random", epochs=9)
    assert key(selector="l1", l1=1e-3) != key(selector="l1", l1=1e-4)
    assert key(selector="gates", l0=1e-3) != key(selector="gates", l0=1e-2)
    assert key(selector="gates", l1=1e-3) == key(selector="gates", l1=1e-4)
    assert len({key(selector=s) for s in ("l1", "gates", "grad", "grad_x_act", "random")}) == 5


@pytest.mark.parametrize("kwargs,message", [
    ({"selector": "l0"}, "phase1.selector: 'l0' is not one of l1, gates, grad, grad_x_act, random"),
    ({"gate_parts": "both"}, "phase1.gate_parts: 'both' is not separate or joint"),
    ({"l0": -1.0}, "phase1.l0"),
])
def test_selector_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Phase1Config(**kwargs)
