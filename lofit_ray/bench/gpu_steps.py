"""One-shot GPU-readiness benchmark of LoFiT's training steps, written as JSON to jobs/results/.

    python jobs/bench_gpu.py    # GPU: smollm2-135m, bf16, 16 x 512 tokens -> jobs/results/bench_gpu.json
    python jobs/bench_gpu.py    # no GPU: tiny-llama, fp32, 4 x 64 -> jobs/results/bench_gpu_cpu_smoke.json
    python jobs/bench_gpu.py --model smollm2-135m --steps 20 --batch-size 16 --seq-len 512 --out x.json

Every case times one whole training step (forward, loss, backward, optimizer step, loss.item() as
train_loop does) on one fixed synthetic batch: seeded random token ids, the last quarter of each row
the answer. Reported: the median of --steps timed steps after --warmup untimed ones (torch.cuda.synchronize
around each on GPU). Cases (a case that fails records its error and the run goes on):
  phase1/<attn>          scales A on every head, SFT loss + L1 on A, AdamW; attn = sdpa, eager and
                         flash_attention_2 (only where flash_attn imports);
  phase2/<attn>          offsets v on K seeded heads in the upper two thirds of the layers, AdamW, run as
                         train_loop runs it by default: the layers below the lowest head are run once
                         (untimed) and each step runs only the layers from there up;
  phase1/per_head_loop   phase 1 (sdpa) with a paper-style hook, a Python loop over heads with slice
                         assignment, instead of the library's one-op-per-layer hook;
  phase1/zero<0..3>      phase 1 (sdpa) with A in a DeepSpeed engine (lofit_ray.distributed.DeepSpeedStepper)
                         at ZeRO stage 0-3, one process (gloo on CPU, nccl on GPU);
Numbers per case: seconds (median step), tokens_per_s = batch * seq_len / seconds (every token, not only
answer tokens), flops_per_token (the model FLOPs a step needs; formula in "flops_formula"), achieved_tflops
= tokens_per_s * flops_per_token, fraction_of_peak = achieved / peak, roofline_tokens_per_s = peak /
flops_per_token. The peak is measured here by a large matmul in the run's dtype (bf16 on GPU): what this
device sustains, not its datasheet figure. A CPU run says in "note" that it is NOT a GPU number.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch

from .. import HeadOffsets, load_model
from .flops import TRAINING_FLOPS_FORMULA, matmul_peak_flops, training_flops_per_token
from .reference import per_head_loop_hooks
from .timing import synthetic_batch, time_steps
from ..batching import Batch, Sequence
from ..config import Phase1Config, Phase2Config
from ..frozen_layers import capture, tail_only
from ..losses import answer_logprobs, l1_penalty
from ..train import TorchStepper

CPU_NOTE = "CPU smoke run on a tiny model: NOT a GPU number; run on a GPU machine for real numbers"


def training_step(stepper, loss_fn):
    """One timed unit: loss, backward, optimizer step, and the loss as a float (the sync point train_loop has)."""
    def step():
        loss = loss_fn()
        stepper.backward(loss)
        stepper.step()
        return loss.item()
    return step


@contextlib.contextmanager
def phase1(loaded, batch: Batch, hook: str = "vectorized", zero_stage: int | None = None, bf16: bool = False):
    model, cfg = loaded.model, Phase1Config()
    offsets = HeadOffsets(loaded.layout, scale=True, seed=0)
    handles = []
    if hook == "vectorized":
        offsets.attach(model)
    else:
        offsets.to(batch.input_ids.device)
        handles = per_head_loop_hooks(model, offsets.scale, loaded.layout.head_dim)
    try:
        if zero_stage is None:
            stepper = TorchStepper([offsets.scale], cfg.lr)
        else:
            from ..distributed import DeepSpeedStepper
            stepper = DeepSpeedStepper(offsets, cfg.lr, zero_stage, batch.input_ids.shape[0], bf16=bf16)
        answers = batch.answer_mask[:, 1:].sum().clamp(min=1)
        yield training_step(stepper, lambda: -answer_logprobs(model, batch).sum() / answers
                            + cfg.l1 * l1_penalty(offsets.scale))
    finally:
        offsets.detach()
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def phase2(loaded, batch: Batch, heads: list):
    model = loaded.model
    offsets = HeadOffsets(loaded.layout, offset_heads=heads, seed=0).attach(model)
    start = offsets.lowest_layer()
    try:
        seqs = [Sequence(row.tolist(), 0) for row in batch.input_ids.cpu()]
        hidden = torch.stack(capture(model, seqs, start, 0, len(seqs)))  # what train_loop caches once
        stepper, answers = TorchStepper([offsets.offset], Phase2Config().lr), batch.answer_mask[:, 1:].sum()

        def loss():
            with tail_only(model, start):
                return -answer_logprobs(model, batch, inputs_embeds=hidden).sum() / answers
        yield training_step(stepper, loss)
    finally:
        offsets.detach()


@contextlib.contextmanager
def single_process_group():
    """RANK/WORLD_SIZE/MASTER_* for one process (DeepSpeed looks for mpi4py without them); restored after."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    created = not torch.distributed.is_initialized()
    try:
        yield
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def versions() -> dict:
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for name in ("deepspeed", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # missing, or broken against this torch
            out[name] = f"unavailable: {type(exc).__name__}"
    return out


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.machine()


def main(argv=None, results: Path = Path("jobs") / "results") -> int:
    """The benchmark's command line; `results` is where its JSON goes by default (jobs/bench_gpu.py: jobs/results)."""
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m" if gpu else "tiny-llama")
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--steps", type=int, default=20 if gpu else 3, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3 if gpu else 1, help="untimed steps per case")
    parser.add_argument("--batch-size", type=int, default=16 if gpu else 4)
    parser.add_argument("--seq-len", type=int, default=512 if gpu else 64)
    parser.add_argument("--k", type=int, default=8, help="heads with an offset in the phase-2 cases")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(results / ("bench_gpu.json" if gpu else "bench_gpu_cpu_smoke.json")))
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    device = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    loaded = load_model(args.model, dtype=args.dtype, device=device)
    model, layout = loaded.model, loaded.layout
    batch = synthetic_batch(model.config.vocab_size, args.batch_size, args.seq_len, max(1, args.seq_len // 4)).to(device)
    tokens = batch.input_ids.numel()
    gen = torch.Generator().manual_seed(0)
    pool = [(l, h) for l in range(layout.num_layers // 3, layout.num_layers) for h in range(layout.num_heads)]
    heads = sorted(pool[i] for i in torch.randperm(len(pool), generator=gen)[: min(args.k, len(pool))].tolist())
    n = 8192 if gpu else 1024
    peak = {"tflops": matmul_peak_flops(getattr(torch, args.dtype), device, n=n, sync=sync) / 1e12,
            "matmul": f"best of 5 timings of 3 {n}x{n} @ {n}x{n} {args.dtype}"}
    full = training_flops_per_token(model, layout, batch, layout.num_layers)
    tail = training_flops_per_token(model, layout, batch, layout.num_layers - min(l for l, _ in heads))
    report = {
        "gpu": gpu, "device_name": torch.cuda.get_device_name(0) if gpu else cpu_name(),
        "note": CPU_NOTE if not gpu else f"GPU run ({args.dtype}) on one device",
        "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "answer_tokens_per_row": int(batch.answer_mask[0].sum()), "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layout": [layout.num_layers, layout.num_heads, layout.head_dim], "phase2_heads": [list(h) for h in heads],
        "peak": peak, "flops_formula": TRAINING_FLOPS_FORMULA, "cases": {},
    }

    def run(name: str, make, flops: float) -> None:
        entry: dict = {"flops_per_token": flops, "roofline_tokens_per_s": peak["tflops"] * 1e12 / flops}
        start = time.perf_counter()
        try:
            with make() as step:
                seconds, loss = time_steps(step, args.steps, args.warmup, sync)
            achieved = tokens / seconds * flops / 1e12
            entry.update(seconds=seconds, tokens_per_s=tokens / seconds, achieved_tflops=achieved,
                         fraction_of_peak=achieved / peak["tflops"], last_loss=loss)
        except Exception as exc:  # record and go on: one missing kernel must not lose the other numbers
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        entry["wall_s"] = time.perf_counter() - start
        report["cases"][name] = entry
        print(f"{name:24s} " + (f"{entry['tokens_per_s']:10.0f} tok/s  {entry['fraction_of_peak']:6.1%} of peak"
                                if "error" not in entry else entry["error"]), flush=True)

    original = model.config._attn_implementation
    for attn in ("sdpa", "eager", "flash_attention_2"):
        try:
            if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
                skipped = {"skipped": "flash_attn not installed"}
            elif attn == "flash_attention_2" and not gpu:
                skipped = {"skipped": "flash attention runs on CUDA GPUs only"}
            else:
                model.set_attn_implementation(attn)
                skipped = None
        except Exception as exc:  # e.g. flash attention on a CPU
            skipped = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if skipped:
            report["cases"].update({f"phase1/{attn}": skipped, f"phase2/{attn}": skipped})
            continue
        run(f"phase1/{attn}", lambda: phase1(loaded, batch), full)
        run(f"phase2/{attn}", lambda: phase2(loaded, batch, heads), tail)
    model.set_attn_implementation("sdpa")
    run("phase1/per_head_loop", lambda: phase1(loaded, batch, hook="loop"), full)
    with single_process_group():
        for stage in range(4):
            run(f"phase1/zero{stage}",
                lambda: phase1(loaded, batch, zero_stage=stage, bf16=args.dtype == "bfloat16"), full)
    model.set_attn_implementation(original)

    report["total_seconds"] = time.perf_counter() - began
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} in {report['total_seconds']:.0f}s" + ("" if gpu else f" ({CPU_NOTE})"))
    return 0

