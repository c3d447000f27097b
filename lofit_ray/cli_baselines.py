"""`lofit-ray iti`, `lofit-ray lora` and `lofit-ray lora-eval`: the baselines on the command line.

    lofit-ray iti  --model smollm2-135m --task truthfulqa --k 16 --out iti-adapter/
    lofit-ray eval --model smollm2-135m --task truthfulqa --adapter iti-adapter/
    lofit-ray lora --model smollm2-135m --task truthfulqa --out lora-adapter/ --eval
    lofit-ray lora-eval --model smollm2-135m --task truthfulqa --adapter lora-adapter/

`cli.build_parser` calls `add_baseline_parsers(sub)`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .cli import _add_model, _add_task, _add_train, _load, _task, _train_cfg


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise ValueError(f"--alphas {text!r}: give comma-separated numbers, e.g. 1,5,10,15") from exc
    if not values:
        raise ValueError("--alphas is empty; give comma-separated numbers, e.g. 1,5,10,15")
    return values


def _targets(values: list[str]) -> list[str]:
    return [t for v in values for t in v.split(",") if t]


def _scores(metrics: dict | None) -> str:
    if not metrics:
        return ""
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k in ("mc1", "mc2", "em", "em_lenient"))


def _two_split_task(args, train_split, eval_split):
    """The task with both a probing/training and an evaluation file (jsonl needs both paths)."""
    from .tasks import get_task

    if args.task == "jsonl":
        return get_task("jsonl", train_path=train_split, eval_path=eval_split)
    return _task(args, "eval")


def cmd_iti(args):
    from .baselines.iti import fit_iti

    start = time.time()
    alphas = _floats(args.alphas)
    loaded = _load(args)
    task = _two_split_task(args, args.probe_data, args.split)
    items = task.eval_items(args.split, limit=args.limit)
    probe_limit = args.probe_limit if args.probe_limit is not None else args.limit
    adapter, info = fit_iti(loaded, task, args.k, selection_items=items, alphas=alphas, limit=probe_limit,
                            probe_path=args.probe_data, batch_size=args.batch_size, max_length=args.max_length,
                            val_fraction=args.val_fraction, seed=args.seed, progress=True)
    out = adapter.save_pretrained(args.out)
    info["head_set"].to_json(out / "iti_heads.json")
    summary = {k: info[k] for k in ("alpha", "alpha_grid", "base", "heads", "probe_accuracy", "n_statements",
                                    "seconds")}
    summary.update(sigma=info["sigma"].tolist(), directions=info["directions"].tolist())
    (out / "iti_info.json").write_text(json.dumps(summary, indent=1))
    best = next(g for g in info["alpha_grid"] if g["alpha"] == info["alpha"])
    acc = sum(info["probe_accuracy"]) / len(info["probe_accuracy"])
    print(f"ITI on {args.k} of {loaded.layout.total_heads} heads of {args.model} ({info['n_statements']} statements, "
          f"mean probe acc {acc:.3f}): alpha={info['alpha']:g} {_scores(best)} (base {_scores(info['base'])}, "
          f"n={best['n']}), {adapter.num_parameters} parameters (0 trained by gradient) -> {args.out} "
          f"[{time.time() - start:.0f}s]")


def cmd_lora(args):
    from .baselines import lora

    start = time.time()
    targets = _targets(args.targets)
    loaded = _load(args)
    task = _two_split_task(args, args.split, args.eval_split) if args.eval else _task(args, "train")
    examples = task.train_examples(args.split, limit=args.limit)
    items = task.eval_items(args.eval_split, limit=args.eval_limit) if args.eval else None
    try:
        peft_model, info = lora.train_lora(loaded, examples, _train_cfg(args), rank=args.rank, alpha=args.alpha,
                                           targets=targets, dropout=args.dropout, max_grad_norm=args.max_grad_norm,
                                           progress=True)
    except ImportError as exc:
        raise ValueError(str(exc)) from exc
    metrics = None
    if items is not None:
        metrics = lora.evaluate_lora(loaded, peft_model, items, batch_size=args.batch_size, progress=True)
        info["eval"] = {**metrics, "split": args.eval_split or "val"}
    lora.save_lora(peft_model, args.out, loaded, info, task=task.name)
    n, total = info["trainable_parameters"], info["total_parameters"]
    line = (f"LoRA r={args.rank} alpha={args.alpha:g} on {','.join(targets)} of {args.model}: {n} trainable "
            f"parameters ({100 * n / total:.2f}% of {total / 1e6:.1f}M), {info['objective']} final loss "
            f"{info['final_loss']:.4f}")
    if metrics:
        line += f", {args.eval_split or 'val'} {_scores(metrics)} (n={metrics['n']})"
    print(f"{line} -> {args.out} [{time.time() - start:.0f}s]")


def cmd_lora_eval(args):
    from .baselines import lora

    start = time.time()
    loaded = _load(args)
    task = _task(args, "eval")
    items = task.eval_items(args.split, limit=args.limit)
    try:
        peft_model = lora.load_lora(loaded, args.adapter)
    except ImportError as exc:
        raise ValueError(str(exc)) from exc
    metrics = lora.evaluate_lora(loaded, peft_model, items, batch_size=args.batch_size, progress=True)
    n = lora.count_lora_parameters(peft_model)
    metrics.update(model=args.model, task=task.name, adapter=args.adapter, method="lora", split=args.split or "val",
                   lora_parameters=n, wall_seconds=round(time.time() - start, 1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1))
    print(f"{task.name} LoRA {args.adapter} ({n} parameters) on {args.model}: {_scores(metrics)} "
          f"(n={metrics['n']}, {metrics['wall_seconds']}s){' -> ' + args.out if args.out else ''}")


def add_baseline_parsers(subparsers) -> None:
    from .baselines.iti import DEFAULT_ALPHAS
    from .baselines.lora import DEFAULT_ALPHA, DEFAULT_LR, DEFAULT_RANK, DEFAULT_TARGETS

    p = subparsers.add_parser("iti", help="baseline: Inference-Time Intervention on the top-K probed heads; "
                                          "writes an adapter dir that `eval --adapter` accepts")
    _add_model(p)
    _add_task(p, "evaluation split name or file alpha is chosen on (default: val)")
    p.add_argument("--k", type=int, required=True, help="heads to intervene on (use LoFiT's K to compare)")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
                   help="comma-separated intervention strengths to choose from (default %(default)s)")
    p.add_argument("--probe-data", default=None,
                   help="split name or file of the labelled statements the probes train on (default: train)")
    p.add_argument("--probe-limit", type=int, default=None, help="probe on the first N items (default: --limit)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of items held out to score the probes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="keep the last N tokens of each statement")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="iti-adapter")
    p.set_defaults(func=cmd_iti)

    p = subparsers.add_parser("lora", help="baseline: LoRA via peft on the task's SFT/DPO objective")
    _add_model(p)
    _add_task(p, "training split name or file (default: train)")
    _add_train(p, lr=DEFAULT_LR, epochs=5)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="LoRA scaling numerator (scale = alpha/rank)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help="module names to adapt, space- or comma-separated (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    p.add_argument("--eval", action="store_true", help="score the evaluation split after training")
    p.add_argument("--eval-split", default=None, help="evaluation split name or file for --eval (default: val)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N evaluation items")
    p.add_argument("--out", default="lora-adapter")
    p.set_defaults(func=cmd_lora)

    p = subparsers.add_parser("lora-eval", help="score a LoRA adapter dir written by `lofit-ray lora`")
    _add_model(p)
    _add_task(p, "evaluation split name or file (default: val)")
    p.add_argument("--adapter", required=True, help="directory written by `lofit-ray lora`")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.set_defaults(func=cmd_lora_eval)
