"""Phase-2 training with each of the library's levers switchable, to time each one's contribution.

With every lever on, `lever_loop` does what train.train_loop does (same order, batches, init, optimizer);
with every lever off it is the reference-style loop: a per-head Python hook on every layer, anomaly detection
on, the DPO reference log-probs recomputed every step, full-vocabulary logits at every position, all layers
run, one right-padded sequence per row (so each pair's prompt runs twice). `library_loop` runs train_loop itself for the same numbers.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .. import batching, frozen_layers, losses
from ..batching import Batch
from ..config import TrainingConfig
from ..offsets import HeadOffsets
from ..train import TorchStepper, epoch_order, pad_id, reference_logprobs, train_loop
from .reference import LoopOffsets, full_vocab_logprobs
from .timing import log

# Each lever of the library, and the name of the variant that is the library with that one lever set back to the
# reference's behaviour (leave-one-out).
LEVERS = {"vectorized_hook": "lib_with_per_head_loop_hook", "anomaly_detection_off": "lib_with_anomaly_detection",
          "cached_reference": "lib_with_reference_recomputed_each_step", "answer_only_logits": "lib_with_full_vocab_logits",
          "skip_frozen_layers": "lib_without_layer_skipping", "packed_batches": "lib_with_padded_batches",
          "shared_prompts": "lib_with_unshared_prompts"}


def lever_loop(loaded, examples, heads, training: TrainingConfig, epochs: int, lr: float, *, vectorized_hook: bool,
               anomaly_detection_off: bool, cached_reference: bool, answer_only_logits: bool, skip_frozen_layers: bool,
               packed_batches: bool, shared_prompts: bool, label: str) -> dict:
    """Phase-2 DPO with each lever switchable. Returns per-epoch and per-step times, per-step losses, setup time.
    With a lever off and layer skipping on, the per-step reference forward also starts from the cached hidden
    states (what a natural implementation does). Prompts are shared only in packed batches."""
    model = loaded.model
    pad = pad_id(loaded)
    t_start = time.perf_counter()
    encoded = batching.encode_examples(loaded.tokenizer, examples, training.max_length)
    offsets = HeadOffsets(loaded.layout, offset_heads=heads, seed=training.seed)
    hooks = offsets.attach(model) if vectorized_hook else LoopOffsets(offsets).attach(model)
    start_layer = offsets.lowest_layer() if skip_frozen_layers else 0
    logprob_fn = losses.answer_logprobs if answer_only_logits else full_vocab_logprobs

    def logprobs(batch: Batch, idx: list[int]) -> torch.Tensor:
        if not start_layer:
            return logprob_fn(model, batch)
        rows = [cached[i] for i in idx]
        rows = [c for c, _ in rows] + [r for _, r in rows]
        with frozen_layers.tail_only(model, start_layer):
            return logprob_fn(model, batch, inputs_embeds=frozen_layers.embeds_batch(batch, rows))

    step_losses, epoch_s, step_s = [], [], []
    try:
        with torch.autograd.set_detect_anomaly(not anomaly_detection_off):
            cached = None
            if start_layer:
                flat = [s for pair in encoded for s in pair]
                hidden = frozen_layers.capture(model, flat, start_layer, pad, training.batch_size)
                cached = [tuple(hidden[2 * i: 2 * i + 2]) for i in range(len(encoded))]
            reference = None
            if cached_reference:  # exactly what train_loop does: once, full model, answer-only, offsets off
                reference = reference_logprobs(loaded, encoded, training, base_model=hooks.disabled, use_cache=False)
            setup_s = time.perf_counter() - t_start
            stepper = TorchStepper([offsets.offset], lr)
            steps = -(-len(encoded) // training.batch_size)
            for epoch in range(epochs):
                order = epoch_order(len(encoded), training, epoch)
                t_epoch = time.perf_counter()
                for step in range(steps):
                    t_step = time.perf_counter()
                    idx = order[step * training.batch_size: (step + 1) * training.batch_size]
                    batch = batching.batch_items([encoded[i] for i in idx], pad, packed=packed_batches,
                                                 share_prompts=shared_prompts)
                    logp = logprobs(batch, idx)
                    if reference is not None:
                        ref = reference[idx]
                        ref = torch.cat([ref[:, 0], ref[:, 1]])
                    else:  # recomputed every step: a no-grad forward of the same batch, offsets off
                        with torch.no_grad(), hooks.disabled():
                            ref = logprobs(batch, idx)
                    loss = losses.dpo_loss(logp, ref, training.dpo_beta)
                    stepper.backward(loss)
                    stepper.step()
                    step_losses.append(loss.item())
                    step_s.append(time.perf_counter() - t_step)
                epoch_s.append(time.perf_counter() - t_epoch)
                log(f"  {label}: epoch {epoch + 1}/{epochs} {epoch_s[-1]:.1f}s (loss {statistics.mean(step_losses[-steps:]):.5f})")
    finally:
        hooks.detach()
    return {"setup_s": setup_s, "epoch_s": epoch_s, "step_s": step_s, "step_losses": step_losses, "steps": steps,
            "final_offset": offsets.offset.detach().clone()}


class RecordingStepper(TorchStepper):
    """The library's TorchStepper, recording each step's loss (to compare variants) and when it finished."""

    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.losses: list[float] = []
        self.stamps: list[float] = []

    def backward(self, loss):
        self.losses.append(loss.item())
        super().backward(loss)

    def step(self):
        super().step()
        self.stamps.append(time.perf_counter())


def library_loop(loaded, examples, heads, training: TrainingConfig, epochs: int, lr: float, label: str) -> dict:
    """train_loop as train_offsets calls it (reference log-probs computed in this run: a fresh cache directory)."""
    offsets = HeadOffsets(loaded.layout, offset_heads=heads, seed=training.seed).attach(loaded.model)
    stepper = RecordingStepper([offsets.offset], lr)
    previous = os.environ.get("LOFIT_REFERENCE_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOFIT_REFERENCE_CACHE"] = tmp
        t0 = time.perf_counter()
        try:
            history = train_loop(loaded, examples, training, epochs, stepper, start_layer=offsets.lowest_layer(),
                                 base_model=offsets.disabled,
                                 on_epoch=lambda e, s: log(f"  {label}: epoch {e}/{epochs} {s['epoch_seconds']:.1f}s "
                                                           f"(loss {s['loss']:.5f})"))
        finally:
            offsets.detach()
            if previous is None:
                os.environ.pop("LOFIT_REFERENCE_CACHE", None)
            else:
                os.environ["LOFIT_REFERENCE_CACHE"] = previous
        total = time.perf_counter() - t0
    epoch_s = [h["epoch_seconds"] for h in history]
    steps = len(stepper.losses) // epochs
    return {"setup_s": total - sum(epoch_s), "epoch_s": epoch_s,
            "step_s": [b - a for a, b in zip(stepper.stamps, stepper.stamps[1:])], "step_losses": stepper.losses,
            "steps": steps, "final_offset": offsets.offset.detach().clone()}


VARIANTS = ("library", "reference", *LEVERS.values(), "bench_all_levers", "library_repeat")


def run_variants(loaded, examples, heads, training: TrainingConfig, epochs: int, lr: float,
                 keep: list[str] | None = None) -> tuple[dict, float]:
    """Run the variants named in `keep` (None: all of VARIANTS) in VARIANTS' order on the same heads and pairs:
    the library, the reference (every lever off), each leave-one-out variant, every lever on in lever_loop
    (checks that loop against train_loop), the library again (run-to-run noise). Returns (runs, warm-up s)."""
    all_on = {lever: True for lever in LEVERS}
    plan = {"library": None, "reference": {lever: False for lever in LEVERS},
            **{variant: {**all_on, lever: False} for lever, variant in LEVERS.items()},
            "bench_all_levers": all_on, "library_repeat": None}
    unknown = sorted(set(keep or ()) - set(plan))
    if unknown:
        raise ValueError(f"phase-2 variants: unknown {unknown}; choose from {list(plan)}")
    # Warm-up (untimed): one forward+backward and one no-grad forward of a real batch, so the first variant's
    # setup does not pay for first touches of the weights and first kernel choices.
    t0 = time.perf_counter()
    warm = batching.batch_items(batching.encode_examples(loaded.tokenizer, examples[:training.batch_size],
                                                         training.max_length), pad_id(loaded))
    embeds = loaded.model.get_input_embeddings()(warm.input_ids).detach().requires_grad_(True)
    losses.answer_logprobs(loaded.model, warm, inputs_embeds=embeds).sum().backward()
    with torch.no_grad():
        losses.answer_logprobs(loaded.model, warm)
    warmup_s = time.perf_counter() - t0
    log(f"phase2: warm-up {warmup_s:.1f}s")
    runs = {}
    for name, levers in plan.items():
        if keep is not None and name not in keep:
            continue
        log(f"phase2: {name} ({len(examples)} pairs x {epochs} epochs)")
        t0 = time.perf_counter()
        if levers is None:
            runs[name] = library_loop(loaded, examples, heads, training, epochs, lr, name)
        else:
            runs[name] = lever_loop(loaded, examples, heads, training, epochs, lr, label=name, **levers)
        runs[name]["wall_s"] = time.perf_counter() - t0
        runs[name]["levers"] = levers or all_on
    return runs, warmup_s


def summarize(runs: dict, pairs: int) -> tuple[dict, dict]:
    """Per variant: s/epoch (median after the warm-up epoch), setup, a 5-epoch amortized figure, the largest loss
    and offset differences from the library's run, and ratios to the library and the reference; per lever: its
    slowdown when off. Returns (variants, lever_contributions)."""
    base = runs.get("library")
    variants = {}
    for name, run in runs.items():
        s_epoch = statistics.median(run["epoch_s"][1:] or run["epoch_s"])
        steps_after = run["step_s"][run["steps"]:] or run["step_s"]
        v = {"levers_on": [lever for lever in LEVERS if run["levers"][lever]],
             "s_per_epoch": s_epoch, "epoch_s": run["epoch_s"], "setup_s": run["setup_s"],
             "median_step_s": statistics.median(steps_after) if steps_after else None,
             "s_per_epoch_amortized_5": (run["setup_s"] + 5 * s_epoch) / 5, "wall_s": run["wall_s"],
             "pairs": pairs, "steps_per_epoch": run["steps"], "epochs": len(run["epoch_s"]),
             "first_step_loss": run["step_losses"][0]}
        if base is not None:
            n = min(len(base["step_losses"]), len(run["step_losses"]))
            v["first_step_loss_diff_vs_library"] = abs(run["step_losses"][0] - base["step_losses"][0])
            v["max_step_loss_diff_vs_library"] = max(abs(a - b) for a, b in
                                                     zip(base["step_losses"][:n], run["step_losses"][:n]))
            v["final_offset_max_diff_vs_library"] = (run["final_offset"] - base["final_offset"]).abs().max().item()
        variants[name] = v
    ref, lib = variants.get("reference"), variants.get("library")
    for v in variants.values():
        if ref is not None:
            v["speedup_vs_reference"] = ref["s_per_epoch"] / v["s_per_epoch"]
            v["speedup_vs_reference_amortized_5"] = ref["s_per_epoch_amortized_5"] / v["s_per_epoch_amortized_5"]
        if lib is not None:
            v["ratio_vs_library"] = v["s_per_epoch"] / lib["s_per_epoch"]
    levers = {}
    if lib is not None:
        for lever, name in LEVERS.items():
            if name in variants:
                levers[lever] = {"slowdown_when_off": variants[name]["ratio_vs_library"],
                                 "slowdown_when_off_amortized_5": variants[name]["s_per_epoch_amortized_5"]
                                 / lib["s_per_epoch_amortized_5"]}
    return variants, levers
