"""LoReFT (Wu et al., "ReFT: Representation Finetuning for Language Models", NeurIPS 2024), the nearest peer
of LoFiT: edit a frozen model's hidden representations instead of its weights.

The intervention, on the residual stream after one decoder layer, at every position:

    h <- h + R^T (W h + b - R h)

R is a rank x hidden matrix with orthonormal rows (torch's orthogonal parametrization), W and b a learned
linear map into that subspace. Trained by LoFiT's own loop (`train.train_loop`: same batching, SFT/DPO
losses and DPO reference), so a ReFT run differs from a LoFiT run only in what is trained.

Why not `pyreft`: pyreft 0.1.0 pins transformers==4.45.1, which this project's transformers (5.x) replaces,
so the published intervention is implemented here on a forward hook, like LoFiT's own. Differences from
pyreft's usual recipe: the edit applies at every position (pyreft often edits only the first and last few
prompt tokens), and one layer at rank 1 keeps the trainable count near LoFiT's K x head_dim.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations

from ..architectures import decoder_layers
from ..config import ReftConfig, TrainingConfig
from ..offsets import switched_off
from ..train import TorchStepper, train_loop


class LoReFT(nn.Module):
    """The LoReFT edit of one decoder layer's output, hooked on with `attach` and removed with `detach`."""

    def __init__(self, hidden: int, layer: int, rank: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # R's random orthonormal start and W's init
        self.layer, self.rank = layer, rank
        self.rotate = parametrizations.orthogonal(nn.Linear(hidden, rank, bias=False))  # R: rows orthonormal
        self.learned = nn.Linear(hidden, rank)  # W h + b
        self.enabled = True
        self._handle = None

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotate.weight.to(h.dtype)
        return h + (self.learned(h.float()).to(h.dtype) - h @ R.T) @ R

    def attach(self, model: nn.Module) -> "LoReFT":
        self.detach()
        layers = decoder_layers(model)
        if not 0 <= self.layer < len(layers):
            raise ValueError(f"layer {self.layer} is outside this model's {len(layers)} decoder layers")
        self.to(next(model.parameters()).device)

        def hook(module, args, output):
            if not self.enabled:
                return None
            if isinstance(output, tuple):
                return (self.edit(output[0]),) + tuple(output[1:])
            return self.edit(output)

        self._handle = layers[self.layer].register_forward_hook(hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def disabled(self):
        """The base model (the DPO reference) without removing the hook."""
        return switched_off(self)

    @property
    def num_parameters(self) -> int:
        """R (rank x hidden), W (rank x hidden) and b (rank): the count the ReFT paper reports."""
        hidden = self.learned.in_features
        return 2 * self.rank * hidden + self.rank


def reft_layer(num_layers: int, depth: float) -> int:
    """The decoder layer at `depth` (0 = the first layer's output, 1 = the last's)."""
    return min(num_layers - 1, max(0, round(depth * (num_layers - 1))))


def train_reft(loaded, examples: list, training: TrainingConfig, reft: ReftConfig, *,
               on_epoch: Callable[[int, dict], None] | None = None, progress: bool = False) -> tuple[LoReFT, dict]:
    """Train a LoReFT edit with LoFiT's loop; returns (the edit, attached to loaded.model, and its info).

    Whatever stops training (a NaN loss, an on_epoch that raises) detaches the edit first.
    """
    start = time.time()
    config = loaded.model.config
    layer = reft_layer(config.num_hidden_layers, reft.depth)
    edit = LoReFT(config.hidden_size, layer, reft.rank, seed=training.seed).attach(loaded.model)
    try:
        history = train_loop(loaded, examples, training, reft.epochs, TorchStepper(edit.parameters(), reft.lr),
                             base_model=edit.disabled, on_epoch=on_epoch, progress=progress, label="ReFT ")
    except BaseException:
        edit.detach()
        raise
    return edit, {"trainable_parameters": edit.num_parameters, "layer": layer, "history": history,
                  "final_loss": history[-1]["loss"], "seconds": round(time.time() - start, 2)}
