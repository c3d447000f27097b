"""The two LoFiT training loops in plain torch: phase 1 (scale A + L1) and phase 2 (offset v).

No Ray here. A `Stepper` does backward + optimizer step so the distributed layer
can swap in a DeepSpeed engine without touching the loop; `rank`/`world` shard
each global batch so N workers compute exactly what one process would.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import batching, frozen_prefix, losses
from .adapter import Adapter
from .heads import HeadSet, rank_by_norm
from .models import LoadedModel, cache_dir
from .offsets import HeadOffsets


class NaNLossError(FloatingPointError):
    """The loss stopped being finite; the message gives the step and the fix."""


@dataclass
class TrainConfig:
    epochs: int = 5
    lr: float = 5e-3
    batch_size: int = 8
    l1: float = 0.0  # phase 1 only: weight of sum |A|
    dpo_beta: float = 0.5
    max_length: int = 128
    seed: int = 42
    skip_frozen_layers: bool = True  # phase 2: cache the input of the lowest trained layer once per example

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.l1 < 0:
            raise ValueError(f"l1={self.l1} must be >= 0")


class TorchStepper:
    """Plain AdamW over the offsets' parameters."""

    def __init__(self, params, lr: float):
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def reference_logprobs(loaded: LoadedModel, encoded: list, cfg: TrainConfig, offsets: HeadOffsets | None = None,
                       use_cache: bool = True, progress: bool = False) -> torch.Tensor:
    """Base-model answer log-probs for preference pairs, [N, 2] (chosen, rejected).

    Computed once per (model fingerprint, token ids) and cached on disk: the DPO reference
    is the same frozen model with offsets off, so every trial and epoch can share it.
    """
    path = cache_dir() / "reference" / f"{losses.data_key(loaded.fingerprint, encoded, cfg.max_length)}.pt"
    if use_cache and path.is_file():
        return torch.load(path)
    out = []
    device = next(loaded.model.parameters()).device
    chunks = range(0, len(encoded), cfg.batch_size)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="reference log-probs", unit="batch")
    with torch.no_grad(), (offsets.disabled() if offsets is not None else contextlib.nullcontext()):
        for i in chunks:
            part = encoded[i: i + cfg.batch_size]
            logp = losses.answer_logprobs(loaded.model, batching.batch_items(part, _pad(loaded)).to(device))
            out.append(torch.stack([logp[: len(part)], logp[len(part):]], dim=1).cpu())
    ref = torch.cat(out)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(ref)}")
        torch.save(ref, tmp)
        tmp.replace(path)
    return ref


def _pad(loaded: LoadedModel) -> int:
    return loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0


def epoch_order(n: int, cfg: TrainConfig, epoch: int) -> list[int]:
    """The seeded example order of one epoch, wrapped around to fill whole global batches."""
    steps = math.ceil(n / cfg.batch_size)
    order = list(range(n))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    return (order * (1 + cfg.batch_size * steps // n))[: cfg.batch_size * steps]


def train_offsets(
    loaded: LoadedModel,
    offsets: HeadOffsets,
    examples: list,
    cfg: TrainConfig,
    *,
    stepper=None,
    rank: int = 0,
    world: int = 1,
    reference: torch.Tensor | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train whatever trainable tensors `offsets` holds on SFT or DPO examples; returns per-epoch stats.

    The global batch of cfg.batch_size is split evenly over `world` ranks; every rank runs
    the same number of steps (the epoch's order wraps around to fill the last batch).
    """
    if not examples:
        raise ValueError("no training examples: the training split is empty")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of workers ({world})")
    model = loaded.model
    device = next(model.parameters()).device
    offsets.attach(model)
    encoded = batching.encode_examples(loaded.tokenizer, examples, cfg.max_length)
    is_dpo = isinstance(encoded[0], tuple)
    if is_dpo and reference is None:
        reference = reference_logprobs(loaded, encoded, cfg, offsets)
    start_layer = offsets.lowest_layer() if offsets.scale is None and cfg.skip_frozen_layers else 0
    cached = None
    if start_layer > 0:  # layers below the lowest trained head are fixed: run them once, not every epoch
        flat = [s for item in encoded for s in (item if is_dpo else (item,))]
        hidden = frozen_prefix.capture(model, flat, start_layer, _pad(loaded), cfg.batch_size)
        cached = [tuple(hidden[2 * i: 2 * i + 2]) for i in range(len(encoded))] if is_dpo else hidden
    stepper = stepper or TorchStepper([p for p in offsets.parameters() if p.requires_grad], cfg.lr)
    per_rank = cfg.batch_size // world
    steps = math.ceil(len(encoded) / cfg.batch_size)
    history = []
    for epoch in range(cfg.epochs):
        order = epoch_order(len(encoded), cfg, epoch)
        start, total, bar = time.time(), 0.0, None
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step in range(steps):
            global_idx = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            idx = global_idx[rank * per_rank: (rank + 1) * per_rank]
            batch = batching.batch_items([encoded[i] for i in idx], _pad(loaded)).to(device)
            if cached is not None:
                rows = [cached[i] for i in idx]
                rows = [c for c, _ in rows] + [r for _, r in rows] if is_dpo else rows
                with frozen_prefix.tail_only(model, start_layer):
                    logp = losses.answer_logprobs(model, batch, inputs_embeds=frozen_prefix.embeds_batch(batch, rows))
            else:
                logp = losses.answer_logprobs(model, batch)
            if is_dpo:
                ref = reference[idx].to(device)
                loss = losses.dpo_loss(logp, torch.cat([ref[:, 0], ref[:, 1]]), cfg.dpo_beta)
            else:
                # Normalise by the whole global batch's answer tokens (times world, as ranks' grads are
                # averaged) so N workers compute exactly the single-process gradient.
                tokens = sum(len(encoded[i].ids) - max(encoded[i].answer_start, 1) for i in global_idx)
                loss = -logp.sum() * world / max(tokens, 1)
            if offsets.scale is not None and cfg.l1:
                loss = loss + cfg.l1 * losses.l1_penalty(offsets.scale)
            if not torch.isfinite(loss):
                raise NaNLossError(
                    f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} (lr={cfg.lr}); "
                    f"lower the learning rate or check the data for empty answers"
                )
            stepper.backward(loss)
            stepper.step()
            total += loss.item()
            if bar:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update()
        if bar:
            bar.close()
        stats = {"epoch": epoch + 1, "loss": total / steps, "epoch_seconds": time.time() - start}
        history.append(stats)
        if on_epoch:
            on_epoch(epoch + 1, stats)
    return history


def select_heads(loaded: LoadedModel, examples: list, cfg: TrainConfig, k: int, task: str = "",
                 **train_kwargs) -> HeadSet:
    """Phase 1: learn A over every head with an L1 penalty, rank heads by ||A||_2."""
    layout = loaded.layout
    if not 0 < k <= layout.total_heads:
        raise ValueError(f"K={k} is larger than the model's {layout.total_heads} heads "
                         f"({layout.num_layers} layers x {layout.num_heads}); choose K in 1..{layout.total_heads}")
    offsets = HeadOffsets(layout, scale=True, seed=cfg.seed)
    try:
        history = train_offsets(loaded, offsets, examples, cfg, **train_kwargs)
    finally:
        offsets.detach()
    return HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(layout),
                   ranking=rank_by_norm(offsets.scale), k=k, method="lofit", task=task,
                   hparams={**asdict(cfg), "phase": 1, "final_loss": history[-1]["loss"]}, seed=cfg.seed)


def tune_bias(loaded: LoadedModel, head_set: HeadSet, examples: list, cfg: TrainConfig, k: int | None = None,
              task: str = "", **train_kwargs) -> Adapter:
    """Phase 2: fresh offsets v on the top-K heads of a head set, everything else frozen."""
    if head_set.fingerprint != loaded.fingerprint:
        raise ValueError(f"head set was computed on model {head_set.model} ({head_set.fingerprint}), "
                         f"not on {loaded.spec} ({loaded.fingerprint}); select heads on this model first")
    heads = head_set.top(k)
    offsets = HeadOffsets(loaded.layout, bias_heads=heads, seed=cfg.seed)
    try:
        history = train_offsets(loaded, offsets, examples, cfg, **train_kwargs)
    finally:
        offsets.detach()
    return Adapter.from_offsets(offsets, loaded, task=task, head_set=head_set,
                                hparams={**asdict(cfg), "phase": 2, "final_loss": history[-1]["loss"]})
