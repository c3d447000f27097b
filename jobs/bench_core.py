"""Benchmark the LoFiT core on SmolLM2-135M (CPU fp32 by default) and write JSON.

    python jobs/bench_core.py [--model smollm2-135m] [--out jobs/results/bench_core.json]

Measures (median of --repeats timed steps after one warm-up):
  * phase-1 step (scales A on every head) vs a plain frozen forward+backward of the same model and
    batch (8 x 128 tokens, gradients flowing to the input embeddings): the hook overhead;
  * a reference-style hook (per-head Python loop with slice assignment, as the paper's code does);
  * phase-2 epoch time on a real head set with and without skipping the frozen layers below it;
  * TruthfulQA MC scoring of 50 questions with the shared-prefix KV cache vs full prompts.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import lofit_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofit_ray import HeadOffsets, HeadSet, load_model
from lofit_ray.config import Phase1Config, Phase2Config, TrainingConfig
from lofit_ray.architectures import o_projs
from lofit_ray.batching import Batch
from lofit_ray.evaluate import mc_scores
from lofit_ray.losses import answer_logprobs
from lofit_ray.tasks import get_task
from lofit_ray.train import TorchStepper, train_loop


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fixed_batch(vocab: int, batch: int = 8, length: int = 128, answer: int = 32) -> Batch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, -answer:] = True
    return Batch(ids, torch.ones_like(ids), mask)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", default=None, help="head set JSON for the phase-2 timing (default: a LoFiT run)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--phase2-pairs", type=int, default=64)
    parser.add_argument("--mc-questions", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_core.json"))
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    model, layout = loaded.model, loaded.layout
    batch = fixed_batch(model.config.vocab_size)
    embed = model.get_input_embeddings()
    results = {"model": args.model, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "batch": "8 x 128 tokens (32 answer tokens)",
               "repeats": args.repeats}

    def plain_step():
        inputs = embed(batch.input_ids).detach().requires_grad_(True)
        (-answer_logprobs(model, batch, inputs_embeds=inputs).sum()).backward()

    offsets = HeadOffsets(layout, scale=True, seed=0)

    def lofit_step():
        (-answer_logprobs(model, batch).sum() + 1e-3 * offsets.scale.abs().sum()).backward()
        offsets.scale.grad = None

    results["plain_forward_backward_s"] = timed(plain_step, args.repeats)
    offsets.attach(model)
    results["lofit_phase1_step_s"] = timed(lofit_step, args.repeats)
    offsets.detach()
    handles = reference_loop_hooks(model, offsets.scale, layout.head_dim)
    results["reference_loop_step_s"] = timed(lofit_step, args.repeats)
    for h in handles:
        h.remove()
    results["lofit_overhead_vs_plain"] = results["lofit_phase1_step_s"] / results["plain_forward_backward_s"] - 1
    results["reference_loop_vs_lofit"] = results["reference_loop_step_s"] / results["lofit_phase1_step_s"]

    # Phase 2 on a real head set: skipping the frozen layers below the lowest selected head.
    if args.heads:
        head_set = HeadSet.from_json(args.heads)
    else:
        from lofit_ray.train import select_heads

        head_set = select_heads(loaded, get_task("truthfulqa").train_examples(limit=args.phase2_pairs),
                                TrainingConfig(), Phase1Config(epochs=1, lr=1e-2, l1=1e-3))
    heads = head_set.top(args.k)
    examples = get_task("truthfulqa").train_examples(limit=args.phase2_pairs)
    epoch = {}
    for skip in (False, True):
        off = HeadOffsets(layout, offset_heads=heads, seed=0).attach(model)
        phase2 = Phase2Config(epochs=2, lr=1e-2, skip_frozen_layers=skip)
        history = train_loop(loaded, examples, TrainingConfig(), phase2.epochs, TorchStepper([off.offset], phase2.lr),
                             start_layer=off.lowest_layer() if skip else 0, base_model=off.disabled)
        off.detach()
        epoch[skip] = {"first_epoch_s": history[0]["epoch_seconds"], "second_epoch_s": history[1]["epoch_seconds"]}
    results["phase2"] = {"heads": [list(h) for h in heads], "lowest_layer": min(l for l, _ in heads),
                         "pairs": len(examples), "full_model": epoch[False], "skip_frozen_layers": epoch[True],
                         "speedup_second_epoch": epoch[False]["second_epoch_s"] / epoch[True]["second_epoch_s"]}

    # MC scoring with the shared primer cache vs full prompts.
    items = get_task("truthfulqa").eval_items(limit=args.mc_questions)
    t0 = time.perf_counter()
    cached = mc_scores(loaded, items, share_prefix=True)
    t1 = time.perf_counter()
    full = mc_scores(loaded, items, share_prefix=False)
    t2 = time.perf_counter()
    diff = max(abs(a - b) for x, y in zip(cached, full) for a, b in zip(x, y))
    results["mc_scoring"] = {"questions": len(items), "shared_prefix_s": t1 - t0, "full_prompt_s": t2 - t1,
                             "speedup": (t2 - t1) / (t1 - t0), "max_abs_logprob_diff": diff}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
