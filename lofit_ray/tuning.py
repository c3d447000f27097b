"""The search: one implementation, run by the search service (`lofit-ray search`) and the study alike.

What a search is lives here once, so the same config searches the same way wherever it runs:
  - the space: each dimension a `config.Space`, drawn by `SpaceSampler` in a fixed order;
  - the proposals: Optuna's TPE (`tpe_sampler`), seeded by search.seed, random for the first half of the
    trials, then guided by the scores so far;
  - early stopping: ASHA, successive halving on the per-epoch selection score (search.grace_period,
    search.reduction_factor), as Optuna's pruner (`asha_pruner`) or Ray Tune's scheduler (`asha_scheduler`);
  - the winner: the best selection score; a tie goes to the earlier trial.

Two executors run the trials of that one search:
  - `run_in_process`: one after another in this process, its study kept in an Optuna journal file, so a killed
    run keeps the trials it finished. The study uses it: its cells reuse the loaded model and need no Ray.
  - `run_on_ray`: as Ray Tune trials spread over a cluster, `max_concurrent` at a time. The search service
    uses it: its trials are processes with their own resources, and Tune's state resumes them.
With one trial at a time and the same scores, both propose the same settings (tests/test_tuning.py).

The torch core never imports this module's Ray half; Ray and Optuna are imported where they are used.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .config import SearchPolicy, Space

# a trial's per-epoch scores go through report(epoch, score); it returns when the trial may go on
Objective = Callable[[dict, Callable[[int, float], None]], None]


class SpaceSampler:
    """Draws one trial's setting from an Optuna trial: a define-by-run space both executors use (a class, not a
    closure, so Ray Tune can save it with the searcher's state)."""

    def __init__(self, space: dict[str, Space]):
        self.space = dict(space)

    def __call__(self, trial) -> dict:
        return {name: space.suggest(trial, name) for name, space in self.space.items()}


def tpe_sampler(policy: SearchPolicy, trials_before: int = 0):
    """Optuna TPE: random for the first half of the trials, then guided. A resumed in-process study reseeds
    past the trials it has, so it does not propose the same points again."""
    import optuna

    return optuna.samplers.TPESampler(seed=policy.seed + trials_before,
                                      n_startup_trials=max(1, policy.num_trials // 2))


def asha_pruner(policy: SearchPolicy, epoched: bool = True):
    """ASHA as Optuna's pruner (in process); no pruning when ASHA is off or the trial reports once."""
    import optuna

    if not (policy.asha and epoched):
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=policy.grace_period,
                                                  reduction_factor=policy.reduction_factor)


def asha_scheduler(policy: SearchPolicy, max_epochs: int):
    """ASHA as Ray Tune's scheduler (on Ray), on the same rungs as `asha_pruner`; None when ASHA is off."""
    if not policy.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=policy.grace_period,
                         reduction_factor=policy.reduction_factor)


class Pruned(Exception):
    """ASHA stopped this trial; raised from inside its training loop."""


def run_in_process(objective: Objective, space: dict[str, Space], policy: SearchPolicy, journal: Path,
                   name: str, epoched: bool = True, on_trial: Callable[[dict], None] | None = None) -> dict:
    """Search `space` with `objective(params, report)`; returns {"chosen", "score", "trials", "seconds"}.

    A trial's value is its best epoch's score. epoched: the objective reports once per epoch; ASHA may stop
    it, and `chosen` gets "epochs" (the best trial's best epoch). Otherwise (ITI) it reports once and nothing
    is pruned. Trials a killed process left running count as failed and are run again; a trial that raised
    (e.g. a diverged loss) is kept as failed with its error and counts toward `num_trials`, as every method
    gets the same number of attempts.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    done_before = optuna.load_study(study_name=name, storage=storage).trials if _has_study(storage, name) else []
    study = optuna.create_study(study_name=name, storage=storage, sampler=tpe_sampler(policy, len(done_before)),
                                pruner=asha_pruner(policy, epoched), direction="maximize", load_if_exists=True)
    for t in study.trials:
        if t.state == TrialState.RUNNING:  # its process was killed: the trial runs again
            study.tell(t.number, state=TrialState.FAIL)
    draw = SpaceSampler(space)
    started = time.time()

    def counted() -> int:  # a trial that failed on its own (a diverged loss) spent its share of the budget too
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs
                   for t in study.trials)

    while counted() < policy.num_trials:
        trial = study.ask()
        params = draw(trial)
        scores: list[float] = []

        def report(epoch: int, score: float) -> None:
            scores.append(score)
            trial.report(score, epoch)
            if trial.should_prune():
                raise Pruned(f"epoch {epoch}")

        t0 = time.time()
        try:
            objective(params, report)
        except Pruned:
            trial.set_user_attr("scores", scores)
            trial.set_user_attr("seconds", round(time.time() - t0, 2))
            study.tell(trial, state=TrialState.PRUNED)
        except Exception as exc:  # e.g. a diverged loss: the trial fails, the search goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:300])
            study.tell(trial, state=TrialState.FAIL)
        else:
            if not scores:
                raise RuntimeError(f"search {name}: the trial reported no selection score")
            best = max(range(len(scores)), key=lambda i: scores[i])
            trial.set_user_attr("scores", scores)
            if epoched:
                trial.set_user_attr("epochs", best + 1)
            trial.set_user_attr("seconds", round(time.time() - t0, 2))
            study.tell(trial, scores[best])
        if on_trial is not None:
            on_trial(trial_record(study.trials[trial.number]))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"search {name}: no trial completed (all pruned or failed; see the errors in its "
                           f"trials, e.g. a learning-rate range that diverges)")
    best = max(complete, key=lambda t: (t.value, -t.number))
    chosen = dict(best.params)
    if "epochs" in best.user_attrs:
        chosen["epochs"] = best.user_attrs["epochs"]
    trials = [trial_record(t) for t in study.trials]
    return {"chosen": chosen, "score": best.value, "best_trial": best.number, "trials": trials,
            "seconds": round(sum(t.get("seconds", 0) for t in trials), 2),
            "wall_seconds_this_run": round(time.time() - started, 2)}


def run_on_ray(trainable, space: dict[str, Space], policy: SearchPolicy, *, name: str, storage_path: Path,
               max_epochs: int, max_concurrent: int = 1, study_name: str | None = None, study_storage: str | None = None,
               reuse_actors: bool = False, callbacks: list | None = None, resume: bool = False):
    """Run the search as a Ray Tune job and return its ResultGrid. `trainable` reports `sel_metric` and
    `epoch` with tune.report after each epoch it is scored. The Optuna study lives in `study_storage` (a
    storage URL, for optuna-dashboard) under `study_name`; with `resume`, Tune's saved state under
    storage_path/name continues the search, errored trials included."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    path = Path(storage_path) / name
    if resume and tune.Tuner.can_restore(str(path)):
        print(f"[lofit-ray] resuming {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True).fit()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Ray Tune reports each trial already
    storage = optuna.storages.RDBStorage(study_storage) if study_storage else None
    searcher = ConcurrencyLimiter(OptunaSearch(space=SpaceSampler(space), metric="sel_metric", mode="max",
                                               sampler=tpe_sampler(policy), study_name=study_name, storage=storage),
                                  max_concurrent=max_concurrent)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="sel_metric", mode="max", search_alg=searcher,
                                    scheduler=asha_scheduler(policy, max_epochs), num_samples=policy.num_trials,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path), verbose=1, callbacks=callbacks or []),
    )
    return tuner.fit()


def trial_record(t) -> dict:
    return {"number": t.number, "state": t.state.name.lower(), "params": dict(t.params), "value": t.value,
            **{k: t.user_attrs[k] for k in ("scores", "epochs", "seconds", "error") if k in t.user_attrs}}


def _has_study(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())
