"""Each head selector's ranking time on the same data, side by side in one process (jobs/bench_core.py
--only selectors): what head selection costs, as a ratio to the paper's l1."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict

from ..config import Phase1Config
from ..config.loading import load_config
from ..config.reproduce_job import ReproduceConfig
from ..selectors import select_heads
from ..tasks import get_task
from .timing import log

# l1 runs first and last: their mean is the denominator, their spread the run-to-run noise
ORDER = ("l1", "gates", "grad", "grad_x_act", "l1")


def time_selectors(loaded, n_examples: int, k: int, tasks=("truthfulqa", "mquake")) -> dict:
    """Seconds per selector on the first `n_examples` training examples of each task, with the reproduction's
    training and phase-1 settings (configs/reproduce.yaml: l1 and gates train its phase-1 epochs, grad and
    grad_x_act take one pass; lr, l1 and l0, which it searches, are fixed at values from its grids), the
    ratio to l1's mean and the layers of each top `k`. An untimed grad pass first fills the DPO reference
    cache and warms the kernels."""
    shipped = load_config("reproduce", schema=ReproduceConfig)
    training = shipped.training
    configs = {s: dataclasses.replace(shipped.phase1, selector=s, lr=5e-3, l1=1e-3, l0=1e-3) for s in ORDER}
    res = {"examples": n_examples, "k": k, "training": asdict(training), "order": list(ORDER), "tasks": {},
           "settings": {s: phase1.settings() for s, phase1 in configs.items()}}  # what each selector reads
    for task in tasks:
        examples = get_task(task).train_examples(limit=n_examples)
        log(f"selectors: {task} warm-up (one untimed grad pass)")
        select_heads(loaded, examples, training, Phase1Config(selector="grad"), task=task)
        runs = []
        for selector in ORDER:
            t0 = time.perf_counter()
            head_set = select_heads(loaded, examples, training, configs[selector], task=task)
            seconds = time.perf_counter() - t0
            runs.append({"selector": selector, "seconds": seconds,
                         "top_k_layers": sorted(int(layer) for layer, _ in head_set.top(k))})
            log(f"selectors: {task} {selector} {seconds:.1f}s")
        l1 = [r["seconds"] for r in runs if r["selector"] == "l1"]
        for r in runs:
            r["over_l1"] = r["seconds"] / (sum(l1) / len(l1))
        res["tasks"][task] = {"runs": runs, "l1_first_over_last": l1[0] / l1[-1]}
    return res
