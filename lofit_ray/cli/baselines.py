"""`lofit-ray iti`, `lofit-ray lora` and `lofit-ray lora-eval`: the baselines on the command line.

    lofit-ray iti  --model smollm2-135m --task truthfulqa --k 16 --out iti-adapter/
    lofit-ray eval --model smollm2-135m --task truthfulqa --adapter iti-adapter/
    lofit-ray lora --model smollm2-135m --task truthfulqa --out lora-adapter/ --eval
    lofit-ray lora-eval --model smollm2-135m --task truthfulqa --adapter lora-adapter/

ITI's flags come from ItiConfig, LoRA's from LoraConfig + TrainingConfig (the defaults of a YAML job).
"""
from __future__ import annotations

import json
import time

from ..config import ItiConfig, LoraConfig, TrainingConfig
from .common import (EVAL_SPLIT_HELP, TRAIN_SPLIT_HELP, add_allow_base_mismatch, add_config_flags,
                     add_eval_batch_size, add_model_command, check_k, config_from_args, format_scores, load, require,
                     task_from_args, write_json)


def cmd_iti(args):
    from ..baselines.iti import fit_iti

    check_k(args.k)
    iti = config_from_args(ItiConfig, args)
    training = config_from_args(TrainingConfig, args, fields=("batch_size", "seed"))
    start = time.time()
    loaded = load(args)
    task = task_from_args(args, train=args.probe_data, eval=args.split)
    items = task.eval_items(args.split, limit=args.limit)
    probe_limit = args.probe_limit if args.probe_limit is not None else args.limit
    adapter, info = fit_iti(loaded, task, args.k, selection_items=items, alphas=iti.alphas, limit=probe_limit,
                            probe_path=args.probe_data, batch_size=training.batch_size, max_length=args.max_length,
                            val_fraction=iti.val_fraction, seed=training.seed, progress=True)
    out = adapter.save_pretrained(args.out)
    info["head_set"].to_json(out / "iti_heads.json")
    summary = {k: info[k] for k in ("alpha", "alpha_grid", "base", "heads", "probe_accuracy", "n_statements",
                                    "seconds")}
    summary.update(sigma=info["sigma"].tolist(), directions=info["directions"].tolist())
    (out / "iti_info.json").write_text(json.dumps(summary, indent=1))
    best = next(g for g in info["alpha_grid"] if g["alpha"] == info["alpha"])
    acc = sum(info["probe_accuracy"]) / len(info["probe_accuracy"])
    print(f"ITI on {args.k} of {loaded.layout.total_heads} heads of {args.model} ({info['n_statements']} statements, "
          f"mean probe acc {acc:.3f}): alpha={info['alpha']:g} {format_scores(best)} (base "
          f"{format_scores(info['base'])}, n={best['n']}), {adapter.num_parameters} parameters (0 trained by "
          f"gradient) -> {args.out} [{time.time() - start:.0f}s]")


def cmd_lora(args):
    require("peft", "baselines")
    from ..baselines import lora

    training = config_from_args(TrainingConfig, args)
    lora_cfg = config_from_args(LoraConfig, args)
    start = time.time()
    loaded = load(args)
    task = task_from_args(args, train=args.split, eval=args.eval_split if args.eval else None)
    examples = task.train_examples(args.split, limit=args.limit)
    items = task.eval_items(args.eval_split, limit=args.eval_limit) if args.eval else None
    peft_model, info = lora.train_lora(loaded, examples, training, lora_cfg, progress=True)
    metrics = None
    if items is not None:
        metrics = lora.evaluate_lora(loaded, peft_model, items, batch_size=training.batch_size, progress=True)
        info["eval"] = {**metrics, "split": args.eval_split or "val"}
    lora.save_lora(peft_model, args.out, loaded, info, task=task.name)
    n, total = info["trainable_parameters"], info["total_parameters"]
    line = (f"LoRA r={lora_cfg.rank} alpha={lora_cfg.alpha:g} on {','.join(lora_cfg.targets)} of {args.model}: {n} "
            f"trainable parameters ({100 * n / total:.2f}% of {total / 1e6:.1f}M), {info['objective']} final loss "
            f"{info['final_loss']:.4f}")
    if metrics:
        line += f", {args.eval_split or 'val'} {format_scores(metrics)} (n={metrics['n']})"
    print(f"{line} -> {args.out} [{time.time() - start:.0f}s]")


def cmd_lora_eval(args):
    require("peft", "baselines")
    from ..baselines import lora

    start = time.time()
    loaded = load(args)
    task = task_from_args(args, eval=args.split)
    items = task.eval_items(args.split, limit=args.limit)
    peft_model = lora.load_lora(loaded, args.adapter, allow_base_mismatch=args.allow_base_mismatch)
    metrics = lora.evaluate_lora(loaded, peft_model, items, batch_size=args.batch_size, progress=True)
    n = lora.count_lora_parameters(peft_model)
    metrics.update(model=args.model, task=task.name, adapter=args.adapter, method="lora", split=args.split or "val",
                   lora_parameters=n, wall_seconds=round(time.time() - start, 1))
    write_json(args.out, metrics)
    print(f"{task.name} LoRA {args.adapter} ({n} parameters) on {args.model}: {format_scores(metrics)} "
          f"(n={metrics['n']}, {metrics['wall_seconds']}s){' -> ' + args.out if args.out else ''}")


def add_parsers(sub) -> None:
    p = add_model_command(sub, "iti", "baseline: Inference-Time Intervention on the top-K probed heads; writes an "
                                      "adapter dir that `eval --adapter` accepts", cmd_iti,
                          "evaluation split name or file alpha is chosen on (default: val)", (ItiConfig,))
    add_config_flags(p, TrainingConfig, fields=("batch_size", "seed"))
    p.add_argument("--k", type=int, required=True, help="heads to intervene on (use LoFiT's K to compare)")
    p.add_argument("--probe-data", default=None,
                   help="split name or file of the labelled statements the probes train on (default: train)")
    p.add_argument("--probe-limit", type=int, default=None, help="probe on the first N items (default: --limit)")
    p.add_argument("--max-length", type=int, default=None,
                   help="keep the last N tokens of each statement (default: all)")
    p.add_argument("--out", default="iti-adapter")

    p = add_model_command(sub, "lora", "baseline: LoRA via peft on the task's SFT/DPO objective", cmd_lora,
                          TRAIN_SPLIT_HELP, (TrainingConfig, LoraConfig))
    p.add_argument("--eval", action="store_true", help="score the evaluation split after training")
    p.add_argument("--eval-split", default=None, help="evaluation split name or file for --eval (default: val)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N evaluation items")
    p.add_argument("--out", default="lora-adapter")

    p = add_model_command(sub, "lora-eval", "score a LoRA adapter dir written by `lofit-ray lora`", cmd_lora_eval,
                          EVAL_SPLIT_HELP)
    p.add_argument("--adapter", required=True, help="directory written by `lofit-ray lora`")
    add_allow_base_mismatch(p)
    add_eval_batch_size(p)
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
