"""Benchmark the LoFiT core on SmolLM2-135M (CPU fp32 by default) and merge the results into a JSON file.

    python jobs/bench_core.py [--only phase1,phase2,mc,gen,selectors] [--model smollm2-135m] [--out jobs/results/bench_core.json]

Wrap timed runs in `flock /tmp/heavy.lock ...` on a shared machine: two torch jobs on 2 cores ruin timings.
Sections (default: all; --only picks some, and only those keys of the JSON are replaced):

  phase1  one phase-1 step (scales A on every head, 8 x 128 synthetic tokens) with the library's vectorized hook,
          with a reference-style per-head Python loop, and a plain frozen forward+backward (median of --repeats).
  phase2  phase-2 DPO epochs on TruthfulQA training pairs, side by side in one process, same heads, pairs,
          batch size, max_length, seed, epochs and step count for every variant (lofit_ray/bench/phase2.py):
          the library (train_loop), the reference-style loop (every lever off; lofit_ray/bench/reference.py),
          leave-one-out ablations (the library with ONE lever put back: ratio_vs_library is what that lever
          alone is worth on top of the others), bench_all_levers (only with --phase2-variants all: checks the
          ablation loop against train_loop) and library_repeat (run-to-run noise).
          s/epoch = median of the epochs after the first (the first is the warm-up); setup_s (one-time reference
          log-probs / frozen-layer capture) is reported apart and folded into `s_per_epoch_amortized_5` (a
          5-epoch run, the default Phase2Config). Every variant's per-step DPO losses are compared with the
          library's (same trajectory up to float error), so the comparison is apples to apples.
  mc      TruthfulQA MC scoring of every question here (train + val of fold 0: 408, about a 409-question test
          fold; --mc-questions N for the first N) with the library's packed scorer, against a FLOP floor
          (mc_flop_floor) at this machine's measured fp32 matmul peak; and, side by side on --mc-side-by-side
          questions, the previous scorer (per_question_mc_scores: primer cache, one padded batch per question).
  gen     lofit_ray.evaluate.evaluate on --gen-items MQuAKE val items: tokens/s (prompt + generated) and the same
          style of FLOP floor (gen_flop_floor).
  selectors  every head selector ranking the same --selector-examples examples of TruthfulQA and MQuAKE, side
          by side: seconds and the ratio to l1's (lofit_ray/bench/selector_timing.py).

FLOP floor: lofit_ray/bench/flops.py (forward only; the peak is the best of a few timed 2048^3 fp32 matmuls
with the same thread count). It ignores memory bandwidth, which bounds small-batch generation far above it,
so gen's ratio is expected to be large.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .. import HeadOffsets, HeadSet, load_model, losses
from .flops import gen_flop_floor, matmul_peak_flops, mc_flop_floor
from .phase2 import LEVERS, VARIANTS, run_variants, summarize
from .reference import per_head_loop_hooks, per_question_mc_scores
from .selector_timing import time_selectors
from .timing import git_commit, log, synthetic_batch, timed
from ..config import Phase1Config, TrainingConfig
from ..tasks import get_task

SECTIONS = ("phase1", "phase2", "mc", "gen", "selectors")
SECTION_KEYS = {"phase1": "phase1", "phase2": "phase2", "mc": "mc_scoring", "gen": "generation",
                "selectors": "selectors"}
# The 8 heads the previous version of this bench selected (1 phase-1 epoch on 64 TruthfulQA pairs, smollm2-135m):
# the default phase-2 head set, so the section needs no phase-1 run. --heads / --select-heads override it.
DEFAULT_HEADS = [(11, 6), (10, 8), (18, 0), (16, 4), (14, 2), (15, 3), (15, 2), (11, 8)]
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "bench_all_levers")


def bench_phase1(loaded, args) -> dict:
    model, layout = loaded.model, loaded.layout
    batch = synthetic_batch(model.config.vocab_size, 8, 128, 32)
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
    handles = per_head_loop_hooks(model, offsets.scale, layout.head_dim)
    log("phase1: reference per-head loop hook")
    try:
        res["reference_loop_step_s"] = timed(lofit_step, args.repeats)
    finally:
        for h in handles:
            h.remove()
    res["lofit_overhead_vs_plain"] = res["lofit_phase1_step_s"] / res["plain_forward_backward_s"] - 1
    res["reference_loop_vs_lofit"] = res["reference_loop_step_s"] / res["lofit_phase1_step_s"]
    return res


def phase2_heads(loaded, args, examples) -> tuple[list[tuple[int, int]], str]:
    if args.heads:
        return HeadSet.from_json(args.heads).top(args.k), f"top {args.k} of {args.heads}"
    if args.select_heads:
        from ..selectors import select_heads

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
    keep = None if args.phase2_variants == "all" else args.phase2_variants.split(",")
    runs, warmup_s = run_variants(loaded, examples, heads, training, epochs, lr, keep)
    variants, levers = summarize(runs, len(examples))
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


def bench_mc(loaded, args, peak: float) -> dict:
    """The library's MC scoring on every TruthfulQA question here (train + val of the fold: 408, about the
    409 of a test fold) against its FLOP floor, and side by side with the previous scorer on a subset."""
    from ..evaluate import mc_metrics, mc_scores

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
    before = per_question_mc_scores(loaded, subset)
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
    from ..evaluate import evaluate

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
    """The JSON at `path` (if any) with `update`'s sections replacing its own."""
    return {**(json.loads(path.read_text()) if path.is_file() else {}), **update}


def main(argv=None, results: Path = Path("jobs") / "results") -> int:
    """The benchmark's command line; `results` is where its JSON goes by default (jobs/bench_core.py: jobs/results)."""
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
                        help=f"'all' or a comma-separated subset of: {', '.join(VARIANTS)} (default: all but "
                             "bench_all_levers, which checks that the ablation loop with every lever on matches train_loop)")
    parser.add_argument("--mc-questions", type=int, default=0, help="mc: first N questions (0: all 408)")
    parser.add_argument("--mc-side-by-side", type=int, default=50, help="mc: questions timed with both scorers")
    parser.add_argument("--gen-items", type=int, default=16)
    parser.add_argument("--selector-examples", type=int, default=96, help="selectors: training examples per task "
                        "(96: the reproduction's)")
    parser.add_argument("--out", default=str(results / "bench_core.json"))
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    bad = sorted(set(args.phase2_variants.split(",")) - set(VARIANTS) - {"all"})
    if bad:
        parser.error(f"--phase2-variants: unknown {bad}; choose from {','.join(VARIANTS)} or all")

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
        peak = matmul_peak_flops()
        log(f"peak {peak / 1e9:.1f} GFLOP/s")
    runners = {"phase1": lambda: bench_phase1(loaded, args), "phase2": lambda: bench_phase2(loaded, args),
               "mc": lambda: bench_mc(loaded, args, peak), "gen": lambda: bench_gen(loaded, args, peak),
               "selectors": lambda: time_selectors(loaded, args.selector_examples, args.k)}
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

