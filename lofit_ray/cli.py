"""The `lofit-ray` command line: thin wrappers over the core, one sub-command per step.

    lofit-ray prepare-model smollm2-135m
    lofit-ray select  --model smollm2-135m --task truthfulqa --k 16 --out heads.json   [--random]
    lofit-ray tune    --model smollm2-135m --task truthfulqa --heads heads.json --out adapter/
    lofit-ray eval    --model smollm2-135m --task truthfulqa [--adapter adapter/ | models:/NAME@champion]
    lofit-ray export  --model smollm2-135m --adapter adapter/ --out merged/
    lofit-ray heads   list | show | compare | promote   (reads MLflow)
    lofit-ray ui                                     (MLflow UI on the default store, 127.0.0.1)
    lofit-ray iti | lora | lora-eval                 (baselines)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path


def _add_model(p):
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, gemma3-270m), local checkpoint dir, .gguf file, cached HF id, "
                        "or tiny-<family>")
    p.add_argument("--dtype", default="float32", help="float32 on CPU; bfloat16 on GPU")
    p.add_argument("--device", default="cpu")


def _add_task(p, split_help: str):
    p.add_argument("--task", default="truthfulqa", help="truthfulqa | mquake | clutrr | jsonl")
    p.add_argument("--data-dir", default=None, help="folder with task data (default $LOFIT_DATA_DIR or ../shared/data)")
    p.add_argument("--split", default=None, help=split_help)
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")


def _add_train(p, lr: float, epochs: int):
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dpo-beta", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=42)


def _task(args, split_role: str):
    from .tasks import get_task

    if args.task == "jsonl":
        kw = {"train_path": args.split} if split_role == "train" else {"eval_path": args.split}
        return get_task("jsonl", **kw)
    return get_task(args.task, data_dir=args.data_dir)


def _train_cfg(args, l1: float = 0.0):
    from .train import TrainConfig

    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, l1=l1, dpo_beta=args.dpo_beta,
                       max_length=args.max_length, seed=args.seed)


def _load(args):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def cmd_prepare_model(args):
    from .models import local_dir

    for spec in args.models:
        print(f"{spec}: {local_dir(spec)}")


def cmd_select(args):
    from .heads import HeadSet, random_ranking
    from .train import select_heads

    start = time.time()
    loaded = _load(args)
    task = _task(args, "train")
    if args.random:
        layout = loaded.layout
        head_set = HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(layout),
                           ranking=random_ranking(layout, args.seed), k=args.k, method="random", task=task.name,
                           seed=args.seed)
    else:
        examples = task.train_examples(args.split, limit=args.limit)
        head_set = select_heads(loaded, examples, _train_cfg(args, l1=args.l1), k=args.k, task=task.name,
                                progress=True)
    head_set.to_json(args.out)
    top = ", ".join(f"L{l}H{h}" for l, h in head_set.top()[:8])
    print(f"selected {head_set.k} of {loaded.layout.total_heads} heads ({head_set.method}) on {args.model}: {top}"
          f"{' ...' if head_set.k > 8 else ''} -> {args.out} [{time.time() - start:.0f}s]")


def cmd_tune(args):
    from .heads import HeadSet
    from .train import tune_bias

    start = time.time()
    head_set = HeadSet.from_json(args.heads)
    loaded = _load(args)
    task = _task(args, "train")
    examples = task.train_examples(args.split, limit=args.limit)
    adapter = tune_bias(loaded, head_set, examples, _train_cfg(args), k=args.k, task=task.name, progress=True)
    adapter.save_pretrained(args.out)
    print(f"tuned offsets on {len(adapter.config.heads)} heads ({adapter.num_parameters} parameters), "
          f"final loss {adapter.config.hparams['final_loss']:.4f} -> {args.out} [{time.time() - start:.0f}s]")


def resolve_adapter(ref: str):
    """A local adapter directory, or an MLflow registry URI such as models:/NAME@champion."""
    from .adapter import Adapter

    if ref.startswith(("models:/", "runs:/")):
        from .tracking import download_adapter

        return Adapter.from_pretrained(download_adapter(ref))
    return Adapter.from_pretrained(ref)


def cmd_eval(args):
    from .evaluate import evaluate

    start = time.time()
    loaded = _load(args)
    task = _task(args, "eval")
    items = task.eval_items(args.split, limit=args.limit)
    label = "0-shot"
    if args.adapter:
        adapter = resolve_adapter(args.adapter)
        adapter.attach(loaded.model, loaded.fingerprint)
        label = f"adapter {args.adapter} ({len(adapter.config.heads)} heads)"
    metrics = evaluate(loaded, items, batch_size=args.batch_size, progress=True)
    metrics.update(model=args.model, task=task.name, adapter=args.adapter, split=args.split or "val",
                   wall_seconds=round(time.time() - start, 1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1))
    scores = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k in ("mc1", "mc2", "em", "em_lenient"))
    print(f"{task.name} {label} on {args.model}: {scores} (n={metrics['n']}, {metrics['wall_seconds']}s)"
          f"{' -> ' + args.out if args.out else ''}")


def cmd_export(args):
    start = time.time()
    loaded = _load(args)
    adapter = resolve_adapter(args.adapter)
    adapter.check_compatible(loaded.model, loaded.fingerprint)
    out = adapter.export(loaded, args.out)
    print(f"merged {len(adapter.config.heads)} head offsets into o_proj biases -> {out} "
          f"(load with AutoModelForCausalLM.from_pretrained) [{time.time() - start:.0f}s]")


def cmd_ui(args):
    """Open the MLflow UI on the default store, bound to loopback unless told otherwise."""
    import subprocess

    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                    "--port", str(args.port), "--workers", "1"], check=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert bundled/GGUF models to the safetensors cache once")
    p.add_argument("models", nargs="+")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("select", help="phase 1: learn head scales with L1, write a ranked head set JSON")
    _add_model(p)
    _add_task(p, "training split name or file (default: train)")
    _add_train(p, lr=5e-3, epochs=5)
    p.add_argument("--l1", type=float, default=5e-4, help="weight of the L1 penalty on the scales A")
    p.add_argument("--k", type=int, required=True, help="heads to keep (about 3-10%% of all heads)")
    p.add_argument("--random", action="store_true", help="a seeded random head set of size K (control)")
    p.add_argument("--out", default="heads.json")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("tune", help="phase 2: learn offsets on the top-K heads of a head set, write an adapter dir")
    _add_model(p)
    _add_task(p, "training split name or file (default: train)")
    _add_train(p, lr=1e-2, epochs=5)
    p.add_argument("--heads", required=True, help="head set JSON from `lofit-ray select`")
    p.add_argument("--k", type=int, default=None, help="take the top K of the head set (default: its own K)")
    p.add_argument("--out", default="adapter")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="score the base model or an adapter; writes JSON metrics with n and wall time")
    _add_model(p)
    _add_task(p, "evaluation split name or file (default: val)")
    p.add_argument("--adapter", default=None, help="adapter directory or models:/NAME@ALIAS")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge an adapter into o_proj biases and save a plain transformers model")
    _add_model(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ui", help="open the MLflow UI on the lofit-ray store (127.0.0.1 by default)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ~/.lofit-ray/mlflow.db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    from .cli_baselines import add_baseline_parsers

    add_baseline_parsers(sub)
    try:
        from .cli_heads import add_heads_parser
    except ImportError:  # the MLflow layer is optional
        pass
    else:
        add_heads_parser(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"lofit-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
