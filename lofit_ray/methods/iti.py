"""Inference-Time Intervention: probe every head, shift the top K along their truthful directions by alpha."""
import contextlib

from .base import Method


class Iti(Method):
    name = "iti"
    per_k = True
    epoched = False  # nothing is trained per epoch: each alpha is one evaluation

    def setting_part(self, cfg, task: str) -> dict:
        return {"iti_val_fraction": cfg.iti.val_fraction}

    def fit(self, runner, task: str, k: int, seed: int) -> dict:
        """The probes at K: fitted once per (model, task, K, seed) and kept, so each alpha costs one evaluation."""
        from ..baselines.iti import fit_iti

        key = ("iti", runner.loaded.spec, task, k, seed)
        if key not in runner.memo:
            task_obj, splits = runner.splits(task)
            # Probe only on the rows phase 2 trains on: never on the selection carve or the report split.
            prompts = [ex.prompt for ex in splits.train]
            statements = [st for st in task_obj.labelled_statements(runner.cfg.tasks[task].train)
                          if any(st[0].startswith(p) for p in prompts)]
            _, info = fit_iti(runner.loaded, task_obj.name, k, alphas=[1.0], statements=statements,
                              batch_size=runner.cfg.eval_batch_size, val_fraction=runner.cfg.iti.val_fraction,
                              seed=seed, score_base=False)
            runner.memo[key] = info
        return runner.memo[key]

    @contextlib.contextmanager
    def trained(self, runner, task, k, seed, params, on_epoch=None):
        from ..baselines.iti import iti_adapter

        fit = self.fit(runner, task, k, seed)
        adapter = iti_adapter(runner.loaded, fit["heads"], fit["directions"], fit["sigma"], float(params["alpha"]),
                              task=task, head_set=fit["head_set"])
        offsets = adapter.attach(runner.loaded.model)
        try:
            yield {"trainable_params": adapter.num_parameters, "adapter": adapter,
                   "heads": [list(h) for h in fit["heads"]], "probe_accuracy": fit["probe_accuracy"],
                   "n_statements": fit["n_statements"]}
        finally:
            offsets.detach()
