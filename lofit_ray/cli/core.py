"""`lofit-ray prepare-model | select | train | fit | eval | compare | export | ui`: LoFiT's two phases and their outputs.

    lofit-ray select  --model smollm2-135m --task truthfulqa --out heads.json [--k 16] [--selector l1|gates|grad|grad_x_act|random]
    lofit-ray train   --model smollm2-135m --task truthfulqa --heads heads.json --k 16 --out adapter/
    lofit-ray fit     --model smollm2-135m --task truthfulqa --k 16 --out adapter/      (select, then train)
    lofit-ray eval    --task truthfulqa [--adapter adapter/ | lora-adapter/ | models:/NAME@champion]
    lofit-ray export  --adapter adapter/ --out merged/

Training flags come from the config dataclasses (TrainingConfig, Phase1Config, Phase2Config), so the defaults
are the same as in a search job's YAML. A knob that both phases have carries its phase, as in search.space:
--phase1-lr, --phase1-epochs, --phase2-lr, --phase2-epochs.
"""
from __future__ import annotations

import ipaddress
import sys
import time
import urllib.parse
from pathlib import Path

from ..config import Phase1Config, Phase2Config, TrainingConfig
from .common import (TRACKING_URI_HELP, add_allow_base_mismatch, add_eval_batch_size, add_model_command, check_k,
                     config_from_args, format_intervals, load, require, resolve_adapter, task_from_args,
                     write_json)


def _heads(pairs) -> str:
    return ", ".join(f"L{l}H{h}" for l, h in pairs)


def cmd_prepare_model(args):
    from ..models import local_dir

    for spec in args.models:
        print(f"{spec}: {local_dir(spec)}")


def _ranked(args, training: TrainingConfig, phase1: Phase1Config, for_training: bool = False):
    """Phase 1 on --train-split: (the loaded model, the task, its training examples, the head set). A random
    ranking reads no data unless phase 2 follows (for_training)."""
    from ..selectors import select_heads

    loaded = load(args)
    layout = loaded.layout
    if args.k is not None and args.k > layout.total_heads:
        raise ValueError(f"--k {args.k} is larger than {args.model}'s {layout.total_heads} heads ({layout.num_layers} "
                         f"layers x {layout.num_heads}); choose K in 1..{layout.total_heads}")
    task = task_from_args(args, train=args.train_split)
    examples = [] if phase1.selector == "random" and not for_training else \
        task.train_examples(args.train_split, limit=args.limit)
    head_set = select_heads(loaded, [] if phase1.selector == "random" else examples, training, phase1,
                            task=task.name, progress=True)
    return loaded, task, examples, head_set.with_k(args.k) if args.k is not None else head_set


def cmd_select(args):
    check_k(args.k)
    training, phase1 = config_from_args(TrainingConfig, args), config_from_args(Phase1Config, args)
    start = time.time()
    loaded, _, _, head_set = _ranked(args, training, phase1)
    head_set.to_json(args.out)
    took = f"-> {args.out} [{time.time() - start:.0f}s]"
    total = loaded.layout.total_heads
    if head_set.k is None:
        print(f"ranked all {total} heads ({head_set.method}) on {args.model}, best first: "
              f"{_heads((l, h) for l, h, _ in head_set.ranking[:8])} ... {took}; choose K with `lofit-ray train --k`")
    else:
        print(f"selected {head_set.k} of {total} heads ({head_set.method}) on {args.model}: "
              f"{_heads(head_set.top()[:8])}{' ...' if head_set.k > 8 else ''} {took}")


def _trained(adapter, out: str, start: float) -> None:
    adapter.save_pretrained(out)
    print(f"trained offsets on {len(adapter.config.heads)} heads ({adapter.num_parameters} parameters), "
          f"final loss {adapter.config.hparams['final_loss']:.4f} -> {out} [{time.time() - start:.0f}s]")


def cmd_train(args):
    from ..heads import HeadSet
    from ..train import train_offsets

    check_k(args.k)
    training, phase2 = config_from_args(TrainingConfig, args), config_from_args(Phase2Config, args)
    head_set = HeadSet.from_json(args.heads)
    if args.k is None and head_set.k is None:
        total = head_set.layout["num_layers"] * head_set.layout["num_heads"]
        raise ValueError(f"--k is required: {args.heads} ranks all {total} heads without a K (it was written by "
                         f"`lofit-ray select` without --k); pass --k, e.g. about 3-10% of the heads")
    if args.k is not None and args.k > len(head_set.ranking):
        raise ValueError(f"--k {args.k} is larger than the {len(head_set.ranking)} heads ranked in {args.heads}; "
                         f"lower --k")
    start = time.time()
    loaded = load(args, base_model=head_set.model)
    task = task_from_args(args, train=args.train_split)
    examples = task.train_examples(args.train_split, limit=args.limit)
    _trained(train_offsets(loaded, head_set, args.k, examples, training, phase2, task=task.name, progress=True),
             args.out, start)


def cmd_fit(args):
    """Both phases in this process, no Ray: rank the heads, train offsets on the top K, save both."""
    from ..train import train_offsets

    check_k(args.k)
    training = config_from_args(TrainingConfig, args)
    phase1, phase2 = config_from_args(Phase1Config, args), config_from_args(Phase2Config, args)
    start = time.time()
    loaded, task, examples, head_set = _ranked(args, training, phase1, for_training=True)
    adapter = train_offsets(loaded, head_set, args.k, examples, training, phase2, task=task.name, progress=True)
    _trained(adapter, args.out, start)
    head_set.to_json(Path(args.out) / "heads.json")
    print(f"heads ({head_set.method}, top {args.k} of {loaded.layout.total_heads}): {_heads(head_set.top()[:8])}"
          f"{' ...' if args.k > 8 else ''}; the whole ranking -> {Path(args.out) / 'heads.json'}")


def _is_lora(ref: str) -> bool:
    from ..baselines.lora import META_NAME

    return (Path(ref) / META_NAME).is_file()


def cmd_eval(args):
    from ..evaluate import evaluate_items
    from ..evidence import with_intervals, write_rows

    start = time.time()
    adapter, lora_dir, label, base, extra = None, None, "0-shot", None, {}
    if args.adapter and _is_lora(args.adapter):
        import json

        from ..baselines.lora import META_NAME

        lora_dir = args.adapter
        base = json.loads((Path(lora_dir) / META_NAME).read_text()).get("base_model")
    elif args.adapter:
        adapter = resolve_adapter(args.adapter)
        base = adapter.config.base_model
    loaded = load(args, base_model=base)
    task = task_from_args(args, eval=args.eval_split)
    items = task.eval_items(args.eval_split, limit=args.limit)
    if lora_dir is not None:
        require("peft", "baselines")
        from ..baselines import lora

        peft_model = lora.load_lora(loaded, lora_dir, allow_base_mismatch=args.allow_base_mismatch)
        loaded, n = lora.lora_loaded(loaded, peft_model), lora.count_lora_parameters(peft_model)
        label, extra = f"LoRA {lora_dir} ({n} parameters)", {"method": "lora", "lora_parameters": n}
    elif adapter is not None:
        adapter.attach(loaded.model, loaded.fingerprint, model_name=args.model,
                       allow_base_mismatch=args.allow_base_mismatch)
        label = f"adapter {args.adapter} ({len(adapter.config.heads)} heads)"
    metrics, rows = evaluate_items(loaded, items, batch_size=args.batch_size, progress=True)
    metrics.update(with_intervals(rows))
    metrics.update(model=args.model, task=task.name, adapter=args.adapter, split=args.eval_split or "val", **extra,
                   wall_seconds=round(time.time() - start, 1))
    written = ""
    if args.out:
        write_json(args.out, metrics)
        written = f" -> {args.out}, {write_rows(items_path(args.out), rows)}"
    print(f"{task.name} {label} on {args.model}: {format_intervals(metrics)} (n={metrics['n']}, 95% intervals, "
          f"{metrics['wall_seconds']}s){written}")


def items_path(out: str) -> Path:
    """Where `eval --out metrics.json` puts its per-item rows: metrics.items.jsonl beside it."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".items.jsonl")


def cmd_compare(args):
    from ..evidence import compare_rows, describe, read_rows, verdict

    def rows_of(ref: str) -> tuple[list[dict], str]:
        path = Path(ref)
        if path.suffix == ".json" and items_path(ref).is_file():
            path = items_path(ref)
        if path.is_file():
            return read_rows(path), str(path)
        if ref.endswith((".json", ".jsonl")):
            raise FileNotFoundError(f"{ref}: no such file; write one with `lofit-ray eval --out {ref}`")
        from .. import tracking

        return tracking.load_item_rows(tracking.resolve_tracking_uri(args.tracking_uri), ref)

    (a, where_a), (b, where_b) = rows_of(args.a), rows_of(args.b)
    result = compare_rows(a, b, seed=args.seed)
    print(f"A = {where_a}\nB = {where_b}\nA - B over the same {len(a)} items, 95% paired bootstrap "
          f"(10,000 resamples, seed {args.seed}):")
    for col, diff in result.items():
        print(f"  {describe(col, diff)}  {verdict(diff)}")
    write_json(args.out, {"a": where_a, "b": where_b, "paired": result})


def cmd_export(args):
    start = time.time()
    adapter = resolve_adapter(args.adapter)
    loaded = load(args, base_model=adapter.config.base_model)
    adapter.check_compatible(loaded.model, loaded.fingerprint, model_name=args.model,
                             allow_base_mismatch=args.allow_base_mismatch)
    out = adapter.export(loaded, args.out)
    print(f"merged {len(adapter.config.heads)} head offsets into o_proj biases -> {out} "
          f"(load with AutoModelForCausalLM.from_pretrained) [{time.time() - start:.0f}s]")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The runs view with a search's trials flat (MLflow folds child runs under their parent only when sorted by
# creation time), best selection score first.
TRIALS_BEST_FIRST = urllib.parse.urlencode({"workflowType": "machine_learning",
                                            "searchFilter": "tags.`lofit.kind` = 'trial'",  # tracking.KIND_TAG
                                            "orderByKey": "metrics.`sel_metric`", "orderByAsc": "false"},
                                           quote_via=urllib.parse.quote)


def cmd_ui(args):
    """Open the MLflow UI on the default store, bound to loopback unless told otherwise."""
    import subprocess

    require("mlflow", "service")
    from ..tracking import experiments, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if not _loopback(args.host):
        print(f"warning: --host {args.host} serves the MLflow UI beyond this machine: anyone who can reach port "
              f"{args.port} can read every run and artifact and change the registry (MLflow has no login here); "
              f"keep the default 127.0.0.1 and use an SSH tunnel unless the network is trusted", file=sys.stderr)
    # MLflow 3 opens in GenAI mode ("Evaluations") unless the link asks for model training
    base = f"http://{args.host}:{args.port}/#/experiments"
    print(f"MLflow UI for {uri} at {base}?workflowType=machine_learning (Ctrl-C to stop)", flush=True)
    for experiment_id, name in experiments(uri):
        print(f"  {name}: trials, best first: {base}/{experiment_id}/runs?{TRIALS_BEST_FIRST}", flush=True)
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                    "--port", str(args.port), "--workers", "1"], check=False)


def add_parsers(sub) -> None:
    p = sub.add_parser("prepare-model", help="convert bundled/GGUF models to the safetensors cache once")
    p.add_argument("models", nargs="+")
    p.set_defaults(func=cmd_prepare_model)

    p = add_model_command(sub, "select", "phase 1: rank every head (the paper: scales A with an L1 penalty), "
                          "write the ranking as JSON", cmd_select, ("train",), (TrainingConfig, Phase1Config))
    p.add_argument("--k", type=int, default=None,
                   help="store K as the head set's default for `train` (about 3-10%% of all heads); "
                        "default: none, give --k to `train`")
    p.add_argument("--out", default="heads.json")

    p = add_model_command(sub, "train", "phase 2: learn offsets on the top-K heads of a head set, write an adapter "
                          "dir", cmd_train, ("train",), (TrainingConfig, Phase2Config), default_from_adapter=True)
    p.add_argument("--heads", required=True, help="head set JSON from `lofit-ray select` (its model is the default "
                                                  "--model)")
    p.add_argument("--k", type=int, default=None,
                   help="take the top K heads of the ranking (default: the head set's own K; required if it has none)")
    p.add_argument("--out", default="adapter")

    p = add_model_command(sub, "fit", "both phases in one process, no Ray: rank the heads, train offsets on the top "
                          "K, write the adapter dir (with heads.json)", cmd_fit, ("train",),
                          (TrainingConfig, Phase1Config, Phase2Config))
    p.add_argument("--k", type=int, required=True, help="heads phase 2 trains (about 3-10%% of all heads)")
    p.add_argument("--out", default="adapter")

    p = add_model_command(sub, "eval", "score the base model or an adapter (LoFiT, ITI or LoRA); writes JSON "
                          "metrics with n, intervals and wall time", cmd_eval, ("eval",), default_from_adapter=True)
    p.add_argument("--adapter", default=None, help="adapter directory (from train, fit, iti or lora) or "
                                                   "models:/NAME@ALIAS")
    add_allow_base_mismatch(p)
    add_eval_batch_size(p)
    p.add_argument("--out", default=None, help="metrics JSON; the per-item rows go beside it (NAME.items.jsonl)")

    p = sub.add_parser("compare", help="paired difference of two recorded evaluations of the same items, "
                       "with its 95%% interval and p-value")
    p.add_argument("a", help="`eval --out` file (.json or .items.jsonl), MLflow run id or models:/NAME@ALIAS, "
                             "each optionally #RECORD (e.g. RUN_ID#report_zero_shot-smollm2-135m)")
    p.add_argument("b", help="the same kinds as A")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="also write the result as JSON")
    p.set_defaults(func=cmd_compare)

    p = add_model_command(sub, "export", "merge an adapter into o_proj biases and save a plain transformers model",
                          cmd_export, default_from_adapter=True)
    p.add_argument("--adapter", required=True, help="adapter directory or models:/NAME@ALIAS")
    add_allow_base_mismatch(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser("ui", help="open the MLflow UI on the lofit-ray store (127.0.0.1 by default)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback prints a warning")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
