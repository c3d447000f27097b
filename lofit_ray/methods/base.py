"""What every method of the comparison is: its search space, what its result depends on, how it trains.

A method is one object in one file (this folder). `jobs/reproduce.py` and `lofit-ray study` ask it, through the
Runner (lofit_ray.experiments.runner), for three things:
  * `space`: the name of its search space in `search.spaces` (lofit_ray.config.MethodSpaces);
  * `setting_part(cfg, task)`: the config its result depends on beyond the shared part, so --resume re-runs
    exactly the cells whose setting changed;
  * `trained(runner, task, k, seed, params, on_epoch)`: a context manager holding the runner's model with the
    method trained at `params` inside the with-block (as before after it), yielding what the record keeps;
  * `fixed_params(cfg)`: the `params` it trains at when nothing is searched (search.num_trials: 0).
A new method is a new file with a subclass, listed in methods/__init__.py.
"""
from __future__ import annotations

import contextlib
import dataclasses

from ..config.fields import ConfigError
from ..config.sections import optimizer_settings

# Where a searched name's value sits in the config when nothing is searched: (section, field). Any other name is
# the field of that name in the method's own section (lora.lr, lora.rank, reft.depth).
FIXED_FROM = {"phase1_lr": ("phase1", "lr"), "l1": ("phase1", "l1"), "l0": ("phase1", "l0"),
              "phase2_lr": ("phase2", "lr")}


class Method:
    name = ""
    per_k = False  # one cell per K and seed; False: one per seed (lora, reft), or one per task (zero_shot)
    seeded = True  # cells per seed (zero_shot: one cell per task)
    epoched = True  # reports a selection score after each epoch (ASHA may stop it early)
    searched = True  # has a search (zero_shot has none)
    selector: str | None = None  # heads ranked by this lofit_ray.selectors selector (phase-2 methods)
    logs_ranking = False  # its cell's MLflow run shows the phase-1 ranking's heatmap

    @property
    def space(self) -> str:
        """Its field of search.spaces."""
        return self.name

    def setting_part(self, cfg, task: str) -> dict:
        return {}

    def fixed_params(self, cfg) -> dict:
        """Each name of its search space at the config's own value: a fixed protocol instead of a search."""
        params = {}
        for field in dataclasses.fields(getattr(cfg.search.spaces, self.space)):
            section, name = FIXED_FROM.get(field.name, (self.name, field.name))
            value = getattr(getattr(cfg, section, None), name, None)
            if value is None:
                raise ConfigError(f"search.num_trials: 0 trains every method at its config values, but {self.name} "
                                  f"has no {section}.{name} (it searches {field.name}); search it (num_trials >= 1) "
                                  f"or drop {self.name} from methods")
            params[field.name] = value
        return params

    @contextlib.contextmanager
    def trained(self, runner, task: str, k: int | None, seed: int, params: dict, on_epoch=None):
        yield {}


class HeadMethod(Method):
    """Phase 2 (offsets v) on K heads; subclasses say which heads (`head_set`)."""

    per_k = True

    def setting_part(self, cfg, task: str) -> dict:
        optimizer = optimizer_settings(cfg.phase2)
        return {"phase2_epochs": cfg.phase2.epochs, **({"phase2_optimizer": optimizer} if optimizer else {})}

    def head_set(self, runner, task: str, k: int, seed: int, params: dict):
        """(HeadSet, what the record keeps about where the heads came from)."""
        raise NotImplementedError

    def ranked(self, runner, task: str, k: int, seed: int, phase1):
        """The top-K of the runner's (memoized) phase-1 ranking of `task` at `phase1`."""
        entry = runner.ranking(task, seed, phase1)
        info = {"phase1_seconds": entry["seconds"], "phase1_reused": entry["reused"], "ranking_file": entry["file"]}
        return entry["head_set"].with_k(k), info

    @contextlib.contextmanager
    def trained(self, runner, task: str, k: int | None, seed: int, params: dict, on_epoch=None):
        from ..train import train_offsets

        _, splits = runner.splits(task)
        head_set, extra = self.head_set(runner, task, k, seed, params)
        phase2 = dataclasses.replace(runner.cfg.phase2, lr=float(params["phase2_lr"]),
                                     epochs=int(params.get("epochs", runner.cfg.phase2.epochs)))
        adapter = train_offsets(runner.loaded, head_set, k, splits.train, runner.training(seed), phase2, task=task,
                                on_epoch=on_epoch)
        extra["heads"] = head_set.top(k)
        if self.logs_ranking:
            extra["head_set"] = head_set  # its heatmap goes to the cell's MLflow run
        offsets = adapter.attach(runner.loaded.model)
        try:
            yield {"trainable_params": adapter.num_parameters, "adapter": adapter, **extra}
        finally:
            offsets.detach()
