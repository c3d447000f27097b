"""Helpers the benchmarks share: timing, the code version a number came from, a fixed synthetic batch."""
from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import torch

from ..batching import Batch, Sequence, collate

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn() after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(step, steps: int, warmup: int, sync=lambda: None) -> tuple[float, float]:
    """(median seconds, last value) of `steps` calls of step() after `warmup` untimed ones; sync() around each
    timed call (torch.cuda.synchronize on a GPU)."""
    for _ in range(warmup):
        step()
    times, value = [], float("nan")
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        value = step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def git_commit(paths: tuple[str, ...] = ("lofit_ray", "jobs")) -> str:
    """HEAD's short hash, '+dirty' when `paths` have uncommitted changes: which code a number came from."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True,
                               cwd=REPO, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synthetic_batch(vocab: int, batch: int, length: int, answer: int) -> Batch:
    """Seeded random token ids, `batch` rows of `length`, the last `answer` tokens of each row the answer:
    the same batch on every run and machine."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, length), generator=gen)
    return collate([Sequence(row.tolist(), length - answer) for row in ids], 0)
