"""The one training loop (plain torch), and LoFiT's two phases on top of it.

`train_loop` runs epochs of SFT or DPO steps over whatever parameters its `stepper` updates:
the selectors' scales and gates (phase 1, lofit_ray.selectors), the offsets v (phase 2) or LoRA's
matrices (baselines.lora). A stepper
does backward + optimizer step, so the distributed layer swaps in a DeepSpeed engine and LoRA
adds gradient clipping without touching the loop. `rank`/`world` shard each global batch so
N workers compute exactly what one process would. No Ray here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from . import batching, cache_version, faults, frozen_layers, losses
from .adapter import Adapter
from .config import Phase1Config, Phase2Config, TrainingConfig
from .heads import HeadSet
from .models import LoadedModel, cache_dir
from .offsets import HeadOffsets



REFERENCE_TOKENS = 1024  # padded tokens per forward when computing DPO reference log-probs (no gradients)


class NaNLossError(FloatingPointError):
    """The loss stopped being finite; the message gives the step and the fix."""


class TorchStepper:
    """AdamW over `params`, with optional gradient-norm clipping and an lr that stays constant or decays linearly
    to 0 over `total_steps` (lr_schedule="linear": what the paper's code gets from transformers' Trainer)."""

    def __init__(self, params, lr: float, max_grad_norm: float = 0.0, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", total_steps: int = 0):
        self.params = list(params)
        self.lr, self.max_grad_norm = lr, max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = linear_decay(self.optimizer, total_steps) if lr_schedule == "linear" else None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x (total - step) / total, no warmup: transformers' default schedule, which the paper's code trains with."""
    if total_steps < 1:
        raise ValueError(f"a linear lr schedule needs the number of steps (got total_steps={total_steps})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total_steps - step) / total_steps))


def total_steps(num_examples: int, training: TrainingConfig, epochs: int) -> int:
    """Optimizer steps of train_loop over `num_examples` (every epoch runs ceil(n / batch) global steps)."""
    return epochs * math.ceil(num_examples / training.batch_size)


def phase_stepper(params, phase: Phase1Config | Phase2Config, num_examples: int,
                  training: TrainingConfig) -> TorchStepper:
    """The stepper of a LoFiT phase: its lr, lr_schedule and max_grad_norm, over its epochs of these examples."""
    return TorchStepper(params, phase.lr, max_grad_norm=phase.max_grad_norm, lr_schedule=phase.lr_schedule,
                        total_steps=total_steps(num_examples, training, phase.epochs))


def reference_logprobs(loaded: LoadedModel, encoded: list, training: TrainingConfig,
                       base_model: Callable[[], contextlib.AbstractContextManager] | None = None,
                       use_cache: bool = True, progress: bool = False) -> torch.Tensor:
    """Base-model answer log-probs for preference pairs, [N, 2] (chosen, rejected).

    The DPO reference is the frozen model with the trainable edit off (`base_model()` switches it
    off: offsets.disabled, peft's disable_adapter), so every trial and epoch can share it: it is
    cached on disk per (model fingerprint, token ids).
    """
    path = (Path(os.environ.get("LOFIT_REFERENCE_CACHE") or cache_dir() / "reference")  # tests: a temp dir
            / f"{losses.data_key(loaded.cache_key, encoded, training.max_length)}.pt")
    if use_cache and path.is_file():
        return torch.load(path)
    device = next(loaded.model.parameters()).device
    # No gradients here, so batches can be large: pairs sorted by length, about REFERENCE_TOKENS per forward.
    chunks = batching.by_token_budget([max(len(c.ids), len(r.ids)) for c, r in encoded], REFERENCE_TOKENS // 2)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="reference log-probs", unit="batch")
    ref = torch.zeros(len(encoded), 2)
    with torch.no_grad(), (base_model() if base_model is not None else contextlib.nullcontext()):
        for chunk in chunks:
            logp = losses.answer_logprobs(loaded.model, batching.batch_items([encoded[i] for i in chunk],
                                                                             pad_id(loaded)).to(device)).cpu()
            ref[chunk] = torch.stack([logp[: len(chunk)], logp[len(chunk):]], dim=1)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(ref)}")
        torch.save(ref, tmp)
        tmp.replace(path)
    return ref


def pad_id(loaded: LoadedModel) -> int:
    return loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0


def epoch_order(n: int, training: TrainingConfig, epoch: int) -> list[int]:
    """The seeded example order of one epoch, wrapped around to fill whole global batches."""
    steps = math.ceil(n / training.batch_size)
    order = list(range(n))
    random.Random(training.seed * 1000 + epoch).shuffle(order)
    return (order * (1 + training.batch_size * steps // n))[: training.batch_size * steps]


def train_loop(
    loaded: LoadedModel,
    examples: list,
    training: TrainingConfig,
    epochs: int,
    stepper,
    *,
    model: torch.nn.Module | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    start_layer: int = 0,
    reference: torch.Tensor | None = None,
    base_model: Callable[[], contextlib.AbstractContextManager] | None = None,
    rank: int = 0,
    world: int = 1,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    label: str = "",
) -> list[dict]:
    """Train what `stepper` updates on SFT or DPO examples; returns per-epoch stats.

    model: the module to run (default loaded.model; LoRA passes the peft-wrapped one).
    penalty: added to the loss each step (phase 1's L1 on A). start_layer > 0: the layers below it
    hold nothing trainable, so their output is computed once per example, not every epoch.
    The global batch of training.batch_size is split evenly over `world` ranks; every rank runs the
    same number of steps (the epoch's order wraps around to fill the last batch).
    """
    if not examples:
        raise ValueError("no training examples: the training split is empty")
    batch_size = training.batch_size
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of workers ({world})")
    model = model if model is not None else loaded.model
    device = next(model.parameters()).device
    encoded = batching.encode_examples(loaded.tokenizer, examples, training.max_length)
    is_dpo = isinstance(encoded[0], tuple)
    if is_dpo and reference is None:
        reference = reference_logprobs(loaded, encoded, training, base_model)
    cached = None
    if start_layer > 0:  # layers below the lowest trained head are fixed: run them once, not every epoch
        flat = [s for item in encoded for s in (item if is_dpo else (item,))]
        hidden = frozen_layers.capture(model, flat, start_layer, pad_id(loaded), batch_size)
        cached = [tuple(hidden[2 * i: 2 * i + 2]) for i in range(len(encoded))] if is_dpo else hidden
    per_rank = batch_size // world
    steps = math.ceil(len(encoded) / batch_size)
    history = []
    for epoch in range(epochs):
        order = epoch_order(len(encoded), training, epoch)
        start, total, bar = time.time(), 0.0, None
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"{label}epoch {epoch + 1}/{epochs}", unit="step")
        for step in range(steps):
            global_idx = order[step * batch_size: (step + 1) * batch_size]
            idx = global_idx[rank * per_rank: (rank + 1) * per_rank]
            batch = batching.batch_items([encoded[i] for i in idx], pad_id(loaded), packed=True).to(device)
            if cached is not None:
                rows = [cached[i] for i in idx]
                rows = [c for c, _ in rows] + [r for _, r in rows] if is_dpo else rows
                with frozen_layers.tail_only(model, start_layer):
                    logp = losses.answer_logprobs(model, batch, inputs_embeds=frozen_layers.embeds_batch(batch, rows))
            else:
                logp = losses.answer_logprobs(model, batch)
            if is_dpo:
                ref = reference[idx].to(device)
                loss = losses.dpo_loss(logp, torch.cat([ref[:, 0], ref[:, 1]]), training.dpo_beta)
            else:
                # Normalise by the whole global batch's answer tokens (times world, as ranks' grads are
                # averaged) so N workers compute exactly the single-process gradient.
                tokens = sum(len(encoded[i].ids) - max(encoded[i].answer_start, 1) for i in global_idx)
                loss = -logp.sum() * world / max(tokens, 1)
            if penalty is not None:
                loss = loss + penalty()
            if not torch.isfinite(loss):
                raise NaNLossError(
                    f"{label}loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr={getattr(stepper, 'lr', '?')}); lower the learning rate or check the data for empty answers"
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
        faults.kill_point("worker.kill", rank=rank, epoch=epoch + 1)
        faults.hold_point("worker.hold", rank=rank, epoch=epoch + 1)  # tests: the node goes down here
    return history


def train_offsets(loaded: LoadedModel, head_set: HeadSet, k: int | None, examples: list, training: TrainingConfig,
                 phase2: Phase2Config, *, task: str = "", **loop_kwargs) -> Adapter:
    """Phase 2: fresh offsets v on the top-K heads of a head set (its own K when k is None), all else frozen.

    The adapter records the training, phase-2 and (from the head set) phase-1 settings it came from.
    """
    if head_set.fingerprint != loaded.fingerprint:
        raise ValueError(f"head set was computed on model {head_set.model} ({head_set.fingerprint}), "
                         f"not on {loaded.spec} ({loaded.fingerprint}); select heads on this model first")
    head_set = head_set.with_k(k) if k is not None else head_set
    offsets = HeadOffsets(loaded.layout, offset_heads=head_set.top(), seed=training.seed).attach(loaded.model)
    start_layer = offsets.lowest_layer() if phase2.skip_frozen_layers else 0
    try:
        stepper = phase_stepper([offsets.offset], phase2, len(examples), training)
        history = train_loop(loaded, examples, training, phase2.epochs, stepper,
                             start_layer=start_layer, base_model=offsets.disabled, label="phase 2 ", **loop_kwargs)
    finally:
        offsets.detach()
    hparams = {"k": head_set.k, "training": asdict(training), "phase2": asdict(phase2),
               "final_loss": history[-1]["loss"]}
    if "phase1" in head_set.hparams:
        hparams["phase1"] = head_set.hparams["phase1"]
    return Adapter.from_offsets(offsets, loaded, task=task, head_set=head_set, hparams=hparams)


def phase1_key(fingerprint: str, train_hash: str, task: str, training: TrainingConfig, phase1: Phase1Config) -> str:
    """The memo key of a phase-1 ranking: everything it depends on (model and dtype: LoadedModel.cache_key, data,
    task, training, the selector's settings, code), no K."""
    payload = json.dumps({"fp": fingerprint, "data": train_hash, "task": task, "training": asdict(training),
                          "phase1": phase1.settings(), "code": cache_version.CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
