"""What a reproduce job reads or computes once and reuses across cells: each task's splits, and each phase-1
ranking (in memory, and as files under <out-dir>/heads/ that --resume and later runs reuse). Both write what
they hold into the record (its `splits` and `phase1` sections), so the record says what every cell was fed."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..config import Phase1Config, ReproduceConfig
from ..heads import HeadSet
from ..models import spec_slug
from ..selectors import select_heads
from ..split_specs import split_spec, splits_from_spec
from ..train import phase1_key
from .record import Results, write_atomic

HEADS_DIR = "heads"  # <out-dir>/heads/: phase-1 rankings, reused by --resume


class SplitCache:
    """(task, TaskSplits) per task name, read once; `clear` when the model changes a task's prompts (a task
    whose prompts follow the model's chat template)."""

    def __init__(self, cfg: ReproduceConfig, results: Results):
        self.cfg, self.results = cfg, results
        self._by_task: dict = {}

    def get(self, task_name: str, loaded):
        """`loaded`: the model now held (None before the first load); only a chat-template task reads it."""
        if task_name not in self._by_task:
            t = dataclasses.replace(self.cfg.tasks[task_name])
            t.data_dir = t.data_dir or self.cfg.data_dir
            task, s = splits_from_spec(split_spec(t, loaded.spec if t.chat_template else None))
            self._by_task[task_name] = (task, s)
            self.results.doc["splits"][task_name] = {
                "train": t.train,
                "report": t.report or f"a {t.report_fraction:.0%} carve of '{t.train}' (carve_seed {t.carve_seed})",
                "carve": s.carve, "limit_train": t.limit_train,
                "n_train": len(s.train), "n_select": len(s.select), "n_report": len(s.report),
                "train_hash": s.train_hash(), "objective": task.objective, "eval_kind": task.eval_kind}
        return self._by_task[task_name]

    def clear(self) -> None:
        self._by_task.clear()


class RankingCache:
    """Phase-1 rankings by (model, task, seed, phase-1 settings): `memo` in memory (the Runner's, which the
    methods also use, and which it clears with each new model) and a file each under <out-dir>/heads/."""

    def __init__(self, results: Results, memo: dict):
        self.results, self.memo = results, memo

    @property
    def out_dir(self) -> Path:
        return self.results.out_dir

    def path(self, model: str, task_name: str, seed: int, key: str) -> Path:
        return self.out_dir / HEADS_DIR / f"{spec_slug(model)}__{task_name}__seed{seed}__{key[:8]}.json"

    def get(self, loaded, task_name: str, seed: int, phase1: Phase1Config, splits, training) -> dict:
        """Phase 1 of `loaded` on the train split: computed once, saved under <out-dir>/heads/ (reused by
        --resume, by every trial with the same phase-1 values, and by transfer_heads)."""
        memo = phase1_key(loaded.cache_key, splits.train_hash(), task_name, training, phase1)
        if memo in self.memo:
            return self.memo[memo]
        path = self.path(loaded.spec, task_name, seed, memo)
        entry = None
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == memo:
                entry = {**saved, "head_set": HeadSet(**saved["head_set"]), "reused": True}
        if entry is None:
            start = time.time()
            head_set = select_heads(loaded, splits.train, training, phase1, task=task_name)
            entry = {"key": memo, "seconds": round(time.time() - start, 2), "head_set": head_set,
                     "final_loss": head_set.hparams.get("final_loss"), "reused": False}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**entry, "head_set": json.loads(head_set.to_json())}, indent=1))
        entry["file"] = str(path.relative_to(self.out_dir))
        name = f"{loaded.spec}|{task_name}|seed={seed}|" + (
            f"lr={phase1.lr:g}|l1={phase1.l1:g}" if phase1.selector == "l1" else
            "|".join(f"{key}={value}" for key, value in phase1.settings().items() if key != "epochs"))
        self.results.doc["phase1"][name] = {
            k: entry[k] for k in ("key", "seconds", "final_loss", "file")}
        self.memo[memo] = entry
        return entry
