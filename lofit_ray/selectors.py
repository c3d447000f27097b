"""Head selection (phase 1): rank every head of a model, for phase 2 to cut at K.

Every selector has one signature and one result, a HeadSet that ranks all heads best first with a
score each (so one ranking serves every K, and the memo, heatmaps and `heads compare` work for all):

- l1: the paper's phase 1. Learn a scale A on every head (z <- z * (1 + A)) with loss + l1 * sum|A|,
  rank by ||A||_2.
- gates: JoLA (Lai, Fraser & Titov, ICML 2025). Every head gets a scale A and an offset v behind
  HardConcrete gates (Louizos, Welling & Kingma, ICLR 2018), z <- z * (1 + g_m A) + g_a v, trained with
  loss + l0 * E[number of open gates]; rank by the chance that a head's edit is on.
- grad: attribution, no training. One pass over the data at v = 0; rank by ||dL/dv||, the first-order
  effect of a LoFiT offset on each head.
- grad_x_act: the same pass; rank by sum over tokens of |dL/dz . z|, the first-order effect of removing
  each head's output (attribution patching).
- random: the seeded control.

Selectors that train or take gradients run `train.train_loop`, so Ray Train workers shard them exactly as
they shard phase 1 (`rank`/`world`); the gradient selectors average their sums over workers. No Ray here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from . import losses
from .config import SELECTORS, Phase1Config, TrainingConfig
from .heads import HeadSet, random_ranking, rank_by_score
from .models import LoadedModel
from .offsets import INIT_STD, HeadOffsets
from .train import phase_stepper, train_loop

# HardConcrete's stretch and temperature, the values of Louizos et al. (2018) that JoLA keeps.
GATE_BETA, GATE_GAMMA, GATE_ZETA = 2 / 3, -0.1, 1.1


class HeadGates(HeadOffsets):
    """JoLA's gated edit of every head: z <- z * (1 + g_m * A) + g_a * v, with g ~ HardConcrete(log_alpha).

    separate=True gives each head two gates (g_m for the scale, g_a for the offset, as in JoLA); False,
    one gate for both. A training forward draws fresh gates from a seeded generator (one draw per forward,
    so workers that step in lockstep draw the same gates); in eval mode the gates are their deterministic
    estimate.
    """

    def __init__(self, layout, *, separate: bool = True, seed: int = 0):
        super().__init__(layout, scale=True, seed=seed)
        L, H, D = layout.num_layers, layout.num_heads, layout.head_dim
        gen = torch.Generator().manual_seed(seed + 1)
        self.bias = nn.Parameter(torch.randn(L, H, D, generator=gen) * INIT_STD)
        self.log_alpha = nn.Parameter(torch.randn(2 if separate else 1, L, H, generator=gen) * 0.01)
        self._noise = torch.Generator().manual_seed(seed + 2)
        self._gates: torch.Tensor | None = None

    def sample_gates(self) -> torch.Tensor:
        """[parts, layers, heads] gate values in [0, 1]: a HardConcrete draw (training) or its estimate (eval)."""
        log_alpha = self.log_alpha
        if self.training:
            u = torch.rand(log_alpha.shape, generator=self._noise).clamp(1e-6, 1 - 1e-6).to(log_alpha.device)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / GATE_BETA)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        """P(gate != 0) per [part, layer, head]: the expected-L0 term, differentiable in log_alpha."""
        return torch.sigmoid(self.log_alpha - GATE_BETA * math.log(-GATE_GAMMA / GATE_ZETA))

    def head_scores(self) -> torch.Tensor:
        """[layers, heads]: the chance that a head's edit is on at all (either gate open)."""
        closed = (1 - self.open_probability().detach().float()).prod(dim=0)
        return 1 - closed

    def transform(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer == 0 or self._gates is None:  # layer 0 runs first in every forward: draw this forward's gates
            self._gates = self.sample_gates()
        H, D = self.layout.num_heads, self.layout.head_dim
        gate_m, gate_a = self._gates[0, layer], self._gates[-1, layer]
        z = x.unflatten(-1, (H, D))
        scale = (gate_m[:, None] * self.scale[layer]).to(z.dtype)
        z = z * (1 + scale) + (gate_a[:, None] * self.bias[layer]).to(z.dtype)
        return z.flatten(-2)


class AttributionOffsets(HeadOffsets):
    """A zero offset v on every head (z <- z + v, v = 0) whose gradient is dL/dv; with `times_activation`
    each backward also adds sum over tokens of |dL/dz . z| per head into `attribution` [layers, heads]."""

    def __init__(self, layout, *, times_activation: bool = False):
        heads = [(l, h) for l in range(layout.num_layers) for h in range(layout.num_heads)]
        super().__init__(layout, offset_heads=heads, init_std=0.0)
        self.times_activation = times_activation
        self.attribution = torch.zeros(layout.num_layers, layout.num_heads)

    def transform(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        out = super().transform(layer, x)
        if self.times_activation and out.requires_grad:
            H, D = self.layout.num_heads, self.layout.head_dim
            z = x.detach().unflatten(-1, (H, D))

            def add(grad: torch.Tensor) -> None:
                per_token = (grad.unflatten(-1, (H, D)) * z).sum(-1).abs()  # [..., heads]
                self.attribution[layer] += per_token.reshape(-1, H).sum(0).float().cpu()

            out.register_hook(add)
        return out


class GradientSum:
    """A stepper that takes no step: each batch's gradients add up in .grad (one pass, no optimizer)."""

    lr = 0.0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def _mean_over_workers(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Each worker's sum over its share of every batch -> the single-process value. A rank's loss is
    `world` times its share of the global batch loss (train_loop's normalisation), so the mean is exact."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
        tensor /= world
    return tensor


def _l1(loaded, examples, training, phase1, make_stepper, loop_kwargs) -> tuple[torch.Tensor, list]:
    offsets = HeadOffsets(loaded.layout, scale=True, seed=training.seed).attach(loaded.model)
    stepper = make_stepper(offsets) if make_stepper else phase_stepper([offsets.scale], phase1, len(examples), training)
    try:
        history = train_loop(loaded, examples, training, phase1.epochs, stepper,
                             penalty=(lambda: phase1.l1 * losses.l1_penalty(offsets.scale)) if phase1.l1 else None,
                             base_model=offsets.disabled, label="phase 1 ", **loop_kwargs)
    finally:
        offsets.detach()
    return offsets.scale.detach().float().norm(dim=-1).cpu(), history


def _gates(loaded, examples, training, phase1, make_stepper, loop_kwargs) -> tuple[torch.Tensor, list]:
    gates = HeadGates(loaded.layout, separate=phase1.gate_parts == "separate", seed=training.seed)
    gates.attach(loaded.model)
    stepper = (make_stepper(gates) if make_stepper else
               phase_stepper(list(gates.parameters()), phase1, len(examples), training))
    try:
        history = train_loop(loaded, examples, training, phase1.epochs, stepper,
                             penalty=(lambda: phase1.l0 * gates.open_probability().sum()) if phase1.l0 else None,
                             base_model=gates.disabled, label="gates ", **loop_kwargs)
    finally:
        gates.detach()
    return gates.head_scores().cpu(), history


def _gradient(loaded, examples, training, phase1, make_stepper, loop_kwargs) -> tuple[torch.Tensor, list]:
    probe = AttributionOffsets(loaded.layout, times_activation=phase1.selector == "grad_x_act")
    probe.attach(loaded.model)
    world = loop_kwargs.get("world", 1)
    try:
        history = train_loop(loaded, examples, training, 1, GradientSum(), base_model=probe.disabled,
                             label=f"{phase1.selector} ", **loop_kwargs)
    finally:
        probe.detach()
    steps = math.ceil(len(examples) / training.batch_size)
    if phase1.selector == "grad":  # the gradient of the mean batch loss: ||dL/dv|| per head
        grad = probe.offset.grad.detach().float().cpu().reshape(loaded.layout.num_layers, loaded.layout.num_heads, -1)
        scores = _mean_over_workers(grad.contiguous(), world).norm(dim=-1) / steps
    else:
        scores = _mean_over_workers(probe.attribution.clone(), world) / steps
    probe.offset.grad = None
    return scores, history


_TRAINERS: dict[str, Callable] = {"l1": _l1, "gates": _gates, "grad": _gradient, "grad_x_act": _gradient}


def select_heads(loaded: LoadedModel, examples: list, training: TrainingConfig, phase1: Phase1Config, *,
                 task: str = "", make_stepper: Callable[[nn.Module], object] | None = None,
                 **loop_kwargs) -> HeadSet:
    """Phase 1 with `phase1.selector`: the ranking of ALL heads, best first, each with its score.

    K is not chosen here: phase 2 cuts the ranking (`train_offsets(..., k)`), so one ranking serves
    every K. `make_stepper(module)` (default plain AdamW) lets Ray Train workers train with DeepSpeed;
    `loop_kwargs` go to train_loop (rank/world sharding, a precomputed DPO reference, progress).
    """
    assert phase1.selector in SELECTORS  # Phase1Config checked it, with the fix in the message
    start = time.time()
    if phase1.selector == "random":
        ranking, history = random_ranking(loaded.layout, training.seed), []
    else:
        scores, history = _TRAINERS[phase1.selector](loaded, examples, training, phase1, make_stepper, loop_kwargs)
        ranking = rank_by_score(scores)
    return HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(loaded.layout),
                   ranking=ranking, method="lofit" if phase1.selector == "l1" else phase1.selector, task=task,
                   seed=training.seed,
                   hparams={"training": asdict(training), "phase1": asdict(phase1), "selector": phase1.selector,
                            "selector_seconds": round(time.time() - start, 3),
                            "final_loss": history[-1]["loss"] if history else None, "history": history})
