"""Benchmark the LoFiT core on SmolLM2-135M (CPU fp32 by default) and merge the results into a JSON file.

    python jobs/bench_core.py [--only phase1,phase2,mc,gen] [--model smollm2-135m] [--out jobs/results/bench_core.json]

Wrap timed runs in `flock /tmp/heavy.lock ...` on a shared machine: two torch jobs on 2 cores ruin timings.
Sections (default: all; --only picks some, and only those keys of the JSON are replaced):

  phase1  one phase-1 step (scales A on every head, 8 x 128 synthetic tokens) with the library's vectorized hook,
          with a reference-style per-head Python loop, and a plain frozen forward+backward (median of --repeats).
  phase2  phase-2 DPO epochs on TruthfulQA training pairs, side by side in one process, same heads, pairs,
          batch size, max_length, seed, epochs and step count for every variant:
            reference        written here, not in the library: a hook on every layer's o_proj looping over every
                             head with clone() and z + v per head (v = 0 and frozen on unselected heads, as the
                             paper's code holds a v per head), torch.autograd.set_detect_anomaly(True), the DPO
                             reference log-probs recomputed every step by a no-grad forward of the same batch with
                             the offsets off, and full-vocabulary logits at every position (model(...).logits,
                             log_softmax over [B, T, V], then gather the answer tokens), all layers run,
                             one right-padded sequence per row;
            library          lofit_ray.train.train_loop with a TorchStepper, as train_offsets runs it: vectorized
                             hook on the selected layers only, no anomaly detection, reference log-probs computed
                             once (setup, not per step), LM head at answer positions only, the frozen layers below
                             the lowest head run once per example (setup) and never again, several sequences
                             packed into each row (batching.pack);
            lib_with_* / lib_without_*  leave-one-out ablations (names in LEVERS): the library's behaviour with
                             ONE lever put back to the reference's (a loop written here from library pieces:
                             losses.answer_logprobs, frozen_layers, HeadOffsets, reference_logprobs);
                             ratio_vs_library = its s/epoch over the library's: what that lever alone is worth on
                             top of the others. With a lever off and layer skipping on, the per-step reference
                             forward also starts from the cached hidden states (what a natural implementation does);
            bench_all_levers the same bench loop with every lever on: checks the ablation loop matches the library
                             (not in the default run, to keep it near 6 minutes: --phase2-variants all);
            library_repeat   the library again at the end: the run-to-run noise (and drift) of the measurement.
          s/epoch = median of the epochs after the first (the first is the warm-up); setup_s (one-time reference
          log-probs / frozen-layer capture) is reported apart and folded into `s_per_epoch_amortized_5` (a
          5-epoch run, the default Phase2Config). Every variant's per-step DPO losses are compared with the
          library's (same trajectory up to float error), so the comparison is apples to apples.
  mc      TruthfulQA MC scoring of every question here (train + val of fold 0: 408, about a 409-question test
          fold; --mc-questions N for the first N) with the library's packed scorer, against a FLOP floor
          (mc_flop_floor) at this machine's measured fp32 matmul peak; and, side by side on --mc-side-by-side
          questions, the previous scorer (previous_mc_scores: primer cache, one padded batch per question).
  gen     lofit_ray.evaluate.evaluate on --gen-items MQuAKE val items: tokens/s (prompt + generated) and the same
          style of FLOP floor (gen_flop_floor).

FLOP floor (documented approximation; forward only, no backward):
  2 x (non-embedding params) per token the model reads (embedding lookups cost nothing; the tied/untied LM head is
  excluded here) + 2 x vocab x hidden per token whose next-token distribution is needed (MC: answer tokens only;
  generation: each generated token) + attention 4 x layers x (heads x head_dim) x context per token, context = the
  number of keys that token attends to (its 1-based position: QK^T and AV, 2 FLOPs per multiply-add each). The peak
  is the best of a few timed 2048^3 fp32 matmuls (3 per timing) with the same thread count. The floor ignores
  memory bandwidth, which bounds small-batch generation far above it, so gen's ratio is expected to be large.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray import HeadOffsets, HeadSet, load_model
from lofit_ray import batching, frozen_layers, losses
from lofit_ray.architectures import o_projs
from lofit_ray.batching import Batch
from lofit_ray.config import Phase1Config, TrainingConfig
from lofit_ray.tasks import get_task
from lofit_ray.train import TorchStepper, epoch_order, pad_id, reference_logprobs, train_loop

SECTIONS = ("phase1", "phase2", "mc", "gen")
SECTION_KEYS = {"phase1": "phase1", "phase2": "phase2", "mc": "mc_scoring", "gen": "generation"}
# The phase-1 keys an older version of this file wrote at the top level: moved under "phase1" on merge.
LEGACY_PHASE1_KEYS = ("repeats", "batch", "plain_forward_backward_s", "lofit_phase1_step_s", "reference_loop_step_s",
                      "lofit_overhead_vs_plain", "reference_loop_vs_lofit")
# The 8 heads the previous version of this bench selected (1 phase-1 epoch on 64 TruthfulQA pairs, smollm2-135m):
# the default phase-2 head set, so the section needs no phase-1 run. --heads / --select-heads override it.
DEFAULT_HEADS = [(11, 6), (10, 8), (18, 0), (16, 4), (14, 2), (15, 3), (15, 2), (11, 8)]
# Each lever of the library, and the name of the variant that is the library with that one lever set back to the
# reference's behaviour (leave-one-out).
LEVERS = {"vectorized_hook": "lib_with_per_head_loop_hook", "anomaly_detection_off": "lib_with_anomaly_detection",
          "cached_reference": "lib_with_reference_recomputed_each_step", "answer_only_logits": "lib_with_full_vocab_logits",
          "skip_frozen_layers": "lib_without_layer_skipping", "packed_batches": "lib_with_padded_batches"}
DEFAULT_VARIANTS = ("library", "reference", *LEVERS.values(), "library_repeat")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lofit_ray", "jobs/bench_core.py"],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------------------------
# phase 1: hook overhead on one step
# --------------------------------------------------------------------------------------------------------------
def fixed_batch(vocab: int, batch: int = 8, length: int = 128, answer: int = 32) -> Batch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, length), generator=gen)
    return batching.collate([batching.Sequence(row.tolist(), length - answer) for row in ids], 0)


def reference_loop_hooks(model, scale: torch.Tensor, head_dim: int):
    """The paper-style implementation: a Python loop over heads with slice assignment."""
    handles = []
    for layer, proj in enumerate(o_projs(model)):
        def hook(module, args, layer=layer):
            x = args[0]
            out = x.clone()
            for h in range(scale.shape[1]):
                sl = slice(h * head_dim, (h + 1) * head_dim)
                out[..., sl] = x[..., sl] * (1 + scale[layer, h])
            return (out,)
        handles.append(proj.register_forward_pre_hook(hook))
    return handles


def bench_phase1(loaded, args) -> dict:
    model, layout = loaded.model, loaded.layout
    batch = fixed_batch(model.config.vocab_size)
    embed = model.get_input_embeddings()
    res = {"batch": "8 x 128 tokens (32 answer tokens), synthetic", "repeats": args.repeats}

    def plain_step():
        inputs = embed(batch.input_ids).detach().requires_grad_(True)
        (-losses.answer_logprobs(model, batch, inputs_embeds=inputs).sum()).backward()

    offsets = HeadOffsets(layout, scale=True, seed=0)

    def lofit_step():
        (-losses.answer_logprobs(model, batch).sum() + 1e-3 * offsets.scale.abs().sum()).backward()
        offsets.scale.grad = None

    log("phase1: plain forward+backward")
    res["plain_forward_backward_s"] = timed(plain_step, args.repeats)
    offsets.attach(model)
    log("phase1: library (vectorized) hook")
    try:
        res["lofit_phase1_step_s"] = timed(lofit_step, args.repeats)
    finally:
        offsets.detach()
    handles = reference_loop_hooks(model, offsets.scale, layout.head_dim)
    log("phase1: reference per-head loop hook")
    try:
        res["reference_loop_step_s"] = timed(lofit_step, args.repeats)
    finally:
        for h in handles:
            h.remove()
    res["lofit_overhead_vs_plain"] = res["lofit_phase1_step_s"] / res["plain_forward_backward_s"] - 1
    res["reference_loop_vs_lofit"] = res["reference_loop_step_s"] / res["lofit_phase1_step_s"]
    return res


# --------------------------------------------------------------------------------------------------------------
# phase 2: the reference-style loop, the library's loop, and leave-one-out ablations
# --------------------------------------------------------------------------------------------------------------
class LoopOffsets:
    """Reference-style offsets hook: on EVERY layer's o_proj, clone the input and loop over EVERY head in Python,
    out[..., head] = x[..., head] + v[layer, head]. v is the trainable HeadOffsets.offset row on selected heads and
    a frozen zero elsewhere (the paper's code keeps a v per head), so it trains exactly what the library trains."""

    def __init__(self, offsets: HeadOffsets):
        self.offsets = offsets
        self.layout = offsets.layout
        self.rows = {head: row for row, head in enumerate(offsets.offset_heads)}
        self.enabled = True
        self._handles: list = []

    def attach(self, model) -> "LoopOffsets":
        H, D = self.layout.num_heads, self.layout.head_dim
        zero = torch.zeros(D)
        for layer, proj in enumerate(o_projs(model)):
            def hook(module, args, layer=layer):
                if not self.enabled:
                    return None
                x = args[0]
                out = x.clone()
                for h in range(H):
                    sl = slice(h * D, (h + 1) * D)
                    row = self.rows.get((layer, h))
                    v = self.offsets.offset[row] if row is not None else zero
                    out[..., sl] = x[..., sl] + v.to(x.dtype)
                return (out,) + tuple(args[1:])
            self._handles.append(proj.register_forward_pre_hook(hook))
        return self

    detach = HeadOffsets.detach  # both only need self._handles / self.enabled
    disabled = HeadOffsets.disabled


def full_vocab_logprobs(model, batch: Batch, inputs_embeds=None) -> torch.Tensor:
    """The reference way: logits at every position over the whole vocabulary, log_softmax over [B, T, V], then
    gather the answer tokens. Same value as losses.answer_logprobs (which runs the LM head at answer positions only).
    use_cache=False as in answer_logprobs, so only the logits differ."""
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.input_ids}
    logits = model(**inputs, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    rows, cols = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
    return token_logp.new_zeros(batch.num_sequences).index_add(0, batch.sequence[rows, cols + 1], token_logp[rows, cols])


def bench_loop(loaded, examples, heads, training: TrainingConfig, epochs: int, lr: float, *, vectorized_hook: bool,
               anomaly_detection_off: bool, cached_reference: bool, answer_only_logits: bool, skip_frozen_layers: bool,
               packed_batches: bool, label: str) -> dict:
    """Phase-2 DPO with each lever switchable; with all on it does what train_loop does (same order, batches, init,
    optimizer), with all off it is the reference-style loop. Returns per-epoch times, per-step losses, setup time."""
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
                    batch = batching.batch_items([encoded[i] for i in idx], pad, packed=packed_batches)
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


def phase2_heads(loaded, args, examples) -> tuple[list[tuple[int, int]], str]:
    if args.heads:
        return HeadSet.from_json(args.heads).top(args.k), f"top {args.k} of {args.heads}"
    if args.select_heads:
        from lofit_ray.selectors import select_heads

        log("phase2: selecting heads (1 phase-1 epoch)")
        head_set = select_heads(loaded, examples, TrainingConfig(), Phase1Config(epochs=1, lr=1e-2, l1=1e-3))
        return head_set.top(args.k), f"top {args.k} of a 1-epoch phase-1 run on the same pairs"
    L, H = loaded.layout.num_layers, loaded.layout.num_heads
    if all(l < L and h < H for l, h in DEFAULT_HEADS):
        return DEFAULT_HEADS[: args.k], "the 8 heads an earlier version of this bench selected (DEFAULT_HEADS)"
    heads = list(dict.fromkeys((L // 3 + i % (L - L // 3), (3 * i) % H) for i in range(args.k)))  # another model
    return heads, "a fixed spread over the upper two thirds of the layers (DEFAULT_HEADS do not fit this model)"


def bench_phase2(loaded, args) -> dict:
    examples = get_task("truthfulqa").train_examples(limit=args.phase2_pairs)
    heads, source = phase2_heads(loaded, args, examples)
    training = TrainingConfig(batch_size=8, max_length=128)
    epochs, lr = args.phase2_epochs, 1e-2
    all_on = {lever: True for lever in LEVERS}
    plan = [("library", None)]
    plan.append(("reference", {lever: False for lever in LEVERS}))
    plan += [(variant, {**all_on, lever: False}) for lever, variant in LEVERS.items()]
    plan += [("bench_all_levers", all_on), ("library_repeat", None)]
    keep = set(args.phase2_variants.split(",")) if args.phase2_variants != "all" else {name for name, _ in plan}
    unknown = keep - {name for name, _ in plan}
    if unknown:
        raise SystemExit(f"--phase2-variants: unknown {sorted(unknown)}; choose from {[n for n, _ in plan]}")
    plan = [p for p in plan if p[0] in keep]
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
    for name, levers in plan:
        log(f"phase2: {name} ({len(examples)} pairs x {epochs} epochs)")
        t0 = time.perf_counter()
        if levers is None:
            runs[name] = library_loop(loaded, examples, heads, training, epochs, lr, name)
        else:
            runs[name] = bench_loop(loaded, examples, heads, training, epochs, lr, label=name, **levers)
        runs[name]["wall_s"] = time.perf_counter() - t0
        runs[name]["levers"] = levers or all_on

    base = runs.get("library")
    variants = {}
    for name, run in runs.items():
        after_warmup = run["epoch_s"][1:] or run["epoch_s"]
        s_epoch = statistics.median(after_warmup)
        steps_after = run["step_s"][run["steps"]:] or run["step_s"]
        v = {"levers_on": [lever for lever in LEVERS if run["levers"][lever]],
             "s_per_epoch": s_epoch, "epoch_s": run["epoch_s"], "setup_s": run["setup_s"],
             "median_step_s": statistics.median(steps_after) if steps_after else None,
             "s_per_epoch_amortized_5": (run["setup_s"] + 5 * s_epoch) / 5, "wall_s": run["wall_s"],
             "pairs": len(examples), "steps_per_epoch": run["steps"], "epochs": len(run["epoch_s"]),
             "first_step_loss": run["step_losses"][0]}
        if base is not None:
            n = min(len(base["step_losses"]), len(run["step_losses"]))
            v["first_step_loss_diff_vs_library"] = abs(run["step_losses"][0] - base["step_losses"][0])
            v["max_step_loss_diff_vs_library"] = max(abs(a - b) for a, b in
                                                     zip(base["step_losses"][:n], run["step_losses"][:n]))
            v["final_offset_max_diff_vs_library"] = (run["final_offset"] - base["final_offset"]).abs().max().item()
        variants[name] = v
    ref = variants.get("reference")
    for name, v in variants.items():
        if ref is not None:
            v["speedup_vs_reference"] = ref["s_per_epoch"] / v["s_per_epoch"]
            v["speedup_vs_reference_amortized_5"] = ref["s_per_epoch_amortized_5"] / v["s_per_epoch_amortized_5"]
        if base is not None:
            v["ratio_vs_library"] = v["s_per_epoch"] / variants["library"]["s_per_epoch"]
    levers = {}
    if "library" in variants:
        for lever in LEVERS:
            name = LEVERS[lever]
            if name in variants:
                levers[lever] = {"slowdown_when_off": variants[name]["ratio_vs_library"],
                                 "slowdown_when_off_amortized_5": variants[name]["s_per_epoch_amortized_5"]
                                 / variants["library"]["s_per_epoch_amortized_5"]}
    res = {"warmup_s": warmup_s, "heads": [list(h) for h in heads], "heads_source": source, "lowest_layer": min(l for l, _ in heads),
           "pairs": len(examples), "batch_size": training.batch_size, "max_length": training.max_length,
           "seed": training.seed, "epochs": epochs, "lr": lr, "dpo_beta": training.dpo_beta,
           "task": "truthfulqa train_examples(limit=pairs)", "timing": "s_per_epoch = median of epochs 2..n "
           "(epoch 1 is the warm-up); every variant sees the same batches in the same order",
           "ablation": "leave-one-out: each lib_with*/lib_without* variant is the library's behaviour with one lever "
           "set back to the reference's; lever_contributions[lever].slowdown_when_off = its s/epoch over the "
           "library's", "variant_of_lever": LEVERS,
           "variants": variants, "lever_contributions": levers}
    if "library_repeat" in variants and "library" in variants:
        res["noise_library_repeat_over_first"] = variants["library_repeat"]["s_per_epoch"] / variants["library"]["s_per_epoch"]
    return res


# --------------------------------------------------------------------------------------------------------------
# FLOP floors
# --------------------------------------------------------------------------------------------------------------
def measure_peak_flops(n: int = 2048, per_timing: int = 3, timings: int = 5) -> float:
    """This machine's fp32 matmul rate: the best of `timings` timings of `per_timing` n x n @ n x n products."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(timings):
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        best = min(best, time.perf_counter() - start)
    return per_timing * 2 * n ** 3 / best


def model_dims(loaded) -> dict:
    model, layout = loaded.model, loaded.layout
    embed = model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in model.get_decoder().parameters())
    return {"non_embedding_params": decoder - embed.numel(), "vocab": embed.shape[0], "hidden": embed.shape[1],
            "layers": layout.num_layers, "attn_width": layout.num_heads * layout.head_dim}


def _span_ctx(start: int, length: int) -> int:
    """Sum of contexts (keys attended) of tokens at 0-based positions start .. start+length-1: position p sees p+1."""
    return length * start + length * (length + 1) // 2


def forward_flops(dims: dict, tokens: int, head_tokens: int, context_sum: int) -> dict:
    body = 2 * dims["non_embedding_params"] * tokens
    head = 2 * dims["vocab"] * dims["hidden"] * head_tokens
    attention = 4 * dims["layers"] * dims["attn_width"] * context_sum
    return {"flops": body + head + attention, "body_flops": body, "lm_head_flops": head, "attention_flops": attention}


def mc_flop_floor(loaded, items, peak_flops: float) -> dict:
    """The least work MC scoring can do: the shared primer once, each question's own prefix tokens once, each
    choice's answer tokens once (LM head at answer tokens only); see the module docstring for the FLOP model."""
    tok = loaded.tokenizer
    prefixes = [tok(item.prefix, add_special_tokens=True)["input_ids"] for item in items]
    shared = 0
    if len(prefixes) > 1:
        first, limit = prefixes[0], min(len(p) for p in prefixes) - 1
        while shared < limit and all(p[shared] == first[shared] for p in prefixes):
            shared += 1
    tokens, answer, ctx = shared, 0, _span_ctx(0, shared)
    for item, prefix in zip(items, prefixes):
        own = len(prefix) - shared
        tokens += own
        ctx += _span_ctx(shared, own)
        for choice in item.choices:
            a = len(tok(choice, add_special_tokens=False)["input_ids"])
            tokens += a
            answer += a
            ctx += _span_ctx(len(prefix), a)
    flops = forward_flops(model_dims(loaded), tokens, answer, ctx)
    return {"primer_tokens": shared, "tokens": tokens, "answer_tokens": answer, **flops,
            "peak_flops": peak_flops, "floor_s": flops["flops"] / peak_flops}


def gen_flop_floor(loaded, prompt_lens: list[int], gen_lens: list[int], peak_flops: float) -> dict:
    """Greedy generation's least work: each prompt token and each generated token through the body once, the LM
    head once per generated token; attention over each token's real context."""
    tokens = sum(prompt_lens) + sum(gen_lens)
    ctx = sum(_span_ctx(0, p) + _span_ctx(p, g) for p, g in zip(prompt_lens, gen_lens))
    flops = forward_flops(model_dims(loaded), tokens, sum(gen_lens), ctx)
    return {"prompt_tokens": sum(prompt_lens), "generated_tokens": sum(gen_lens), "tokens": tokens, **flops,
            "peak_flops": peak_flops, "floor_s": flops["flops"] / peak_flops}


# --------------------------------------------------------------------------------------------------------------
# MC scoring and generation
# --------------------------------------------------------------------------------------------------------------
def previous_mc_scores(loaded, items) -> list[list[float]]:
    """MC scoring as it was before the packed scorer (kept here only as the side-by-side baseline): the primer's
    cache once, then one batch per question of its prefix + each choice, so the question's own tokens ran once
    per choice and every batch padded to its longest choice."""
    from lofit_ray.batching import Sequence, collate
    from lofit_ray.evaluate import _common_prefix

    tok, model = loaded.tokenizer, loaded.model
    prefixes = [tok(item.prefix, add_special_tokens=True)["input_ids"] for item in items]
    shared = _common_prefix(prefixes)
    scores = []
    with torch.no_grad():
        cache = model.get_decoder()(input_ids=torch.tensor([prefixes[0][:shared]]), use_cache=True).cache
        for item, prefix in zip(items, prefixes):
            own = prefix[shared:]
            seqs = [Sequence(own + tok(c, add_special_tokens=False)["input_ids"], len(own)) for c in item.choices]
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(seqs))
            scores.append(losses.answer_logprobs(model, collate(seqs, tok.pad_token_id or 0), past_key_values=past).tolist())
    return scores


def bench_mc(loaded, args, peak: float) -> dict:
    """The library's MC scoring on every TruthfulQA question here (train + val of the fold: 408, about the
    409 of a test fold) against its FLOP floor, and side by side with the previous scorer on a subset."""
    from lofit_ray.evaluate import mc_metrics, mc_scores

    task = get_task("truthfulqa")
    items = task.eval_items(path="train") + task.eval_items(path="val")
    items = items[: args.mc_questions] if args.mc_questions else items
    log("mc: warm-up (2 questions, untimed)")
    mc_scores(loaded, items[:2])
    log(f"mc: {len(items)} questions, the library's scorer")
    t0 = time.perf_counter()
    scores = mc_scores(loaded, items)
    elapsed = time.perf_counter() - t0
    floor = mc_flop_floor(loaded, items, peak)
    res = {"questions": len(items), "choices": sum(len(i.choices) for i in items), "eval_s": elapsed,
           "floor_s": floor["floor_s"], "eval_s_over_floor": elapsed / floor["floor_s"], "floor": floor,
           "metrics": mc_metrics(items, scores)}
    subset = items[: args.mc_side_by_side]
    log(f"mc: side by side on {len(subset)} questions: previous scorer, then the library's")
    t0 = time.perf_counter()
    before = previous_mc_scores(loaded, subset)
    t1 = time.perf_counter()
    after = mc_scores(loaded, subset)
    t2 = time.perf_counter()
    res["side_by_side"] = {
        "questions": len(subset), "previous_s": t1 - t0, "library_s": t2 - t1, "speedup": (t1 - t0) / (t2 - t1),
        "max_abs_logprob_diff": max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)),
        "metrics_previous": mc_metrics(subset, before), "metrics_library": mc_metrics(subset, after)}
    return res


def _eos_ids(loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def bench_gen(loaded, args, peak: float) -> dict:
    from lofit_ray.evaluate import evaluate

    items = get_task("mquake").eval_items(limit=args.gen_items)
    model, eos = loaded.model, _eos_ids(loaded)
    calls = []
    original = model.generate

    def counting_generate(*a, **kw):  # measures what the library does; changes nothing
        out = original(*a, **kw)
        ids = kw.get("input_ids", a[0] if a else None)
        mask = kw.get("attention_mask")
        width = ids.shape[1]
        prompt = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), width)).tolist()
        new = out[:, width:].tolist()
        gen = [next((j + 1 for j, t in enumerate(row) if t in eos), len(row)) for row in new]
        calls.append({"prompt": prompt, "gen": gen, "rows": ids.shape[0], "width": width,
                      "new_steps": out.shape[1] - width})
        return out

    log("gen: warm-up (1 item, untimed)")
    evaluate(loaded, items[:1])
    model.generate = counting_generate
    log(f"gen: evaluate() on {len(items)} MQuAKE val items")
    try:
        t0 = time.perf_counter()
        metrics = evaluate(loaded, items)
        elapsed = time.perf_counter() - t0
    finally:
        del model.generate  # back to the class's method
    res = {"items": len(items), "eval_s": elapsed, "metrics": metrics, "max_new_tokens": items[0].max_new_tokens}
    if calls:
        prompt_lens = [p for c in calls for p in c["prompt"]]
        gen_lens = [g for c in calls for g in c["gen"]]
        res.update(generate_calls=len(calls), padded_positions_run=sum(c["rows"] * (c["width"] + c["new_steps"])
                                                                      for c in calls))
    else:  # the library no longer calls model.generate: count prompts, assume max_new_tokens each (an upper bound)
        prompt_lens = [len(loaded.tokenizer(i.prompt)["input_ids"]) for i in items]
        gen_lens = [i.max_new_tokens for i in items]
        res["generated_tokens_estimated"] = "model.generate was not called; generated = max_new_tokens per item"
    res.update(prompt_tokens=sum(prompt_lens), generated_tokens=sum(gen_lens),
               tokens_per_s=(sum(prompt_lens) + sum(gen_lens)) / elapsed, generated_tokens_per_s=sum(gen_lens) / elapsed)
    floor = gen_flop_floor(loaded, prompt_lens, gen_lens, peak)
    res.update(floor=floor, floor_s=floor["floor_s"], eval_s_over_floor=elapsed / floor["floor_s"])
    return res


# --------------------------------------------------------------------------------------------------------------
def merge_into(path: Path, update: dict) -> dict:
    """Read the JSON at `path` (if any), move an older flat phase-1 layout under "phase1", apply `update`."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    if "plain_forward_backward_s" in old and "phase1" not in old:
        old["phase1"] = {k: old.pop(k) for k in LEGACY_PHASE1_KEYS if k in old}
        old["phase1"]["note"] = "from an earlier version of this bench (flat layout)"
    old.update(update)
    return old


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="phase1: timed steps after one warm-up")
    parser.add_argument("--heads", default=None, help="phase2: head set JSON (default: DEFAULT_HEADS)")
    parser.add_argument("--select-heads", action="store_true", help="phase2: run 1 phase-1 epoch to pick the heads")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--phase2-pairs", type=int, default=64)
    parser.add_argument("--phase2-epochs", type=int, default=2, help="per variant; epoch 1 is the warm-up")
    parser.add_argument("--phase2-variants", default=",".join(DEFAULT_VARIANTS),
                        help="'all' or a comma-separated subset of: library, reference, " + ", ".join(LEVERS.values())
                             + ", bench_all_levers, library_repeat (default: all but bench_all_levers, which "
                             "checks that the ablation loop with every lever on matches train_loop)")
    parser.add_argument("--mc-questions", type=int, default=0, help="mc: first N questions (0: all 408)")
    parser.add_argument("--mc-side-by-side", type=int, default=50, help="mc: questions timed with both scorers")
    parser.add_argument("--gen-items", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_core.json"))
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    loaded = load_model(args.model)
    meta = {"model": args.model, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    stamp = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": git_commit()}
    update = dict(meta)
    peak = None
    if "mc" in only or "gen" in only:
        log("measuring fp32 matmul peak")
        peak = measure_peak_flops()
        log(f"peak {peak / 1e9:.1f} GFLOP/s")
    runners = {"phase1": lambda: bench_phase1(loaded, args), "phase2": lambda: bench_phase2(loaded, args),
               "mc": lambda: bench_mc(loaded, args, peak), "gen": lambda: bench_gen(loaded, args, peak)}
    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.perf_counter()
        res = runners[section]()
        res.update(stamp, wall_s=time.perf_counter() - t0, threads=torch.get_num_threads())
        if peak is not None and section in ("mc", "gen"):
            res["peak_gflops_measured"] = peak / 1e9
        update[SECTION_KEYS[section]] = res
        log(f"{section} done in {res['wall_s']:.0f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = merge_into(out, update)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps({k: update[k] for k in update if k not in meta}, indent=1))
    log(f"total {time.perf_counter() - t_all:.0f}s; merged {', '.join(SECTION_KEYS[s] for s in only)} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
