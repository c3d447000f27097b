"""One method's search in the reproduction: Optuna TPE proposes, ASHA stops weak trials, the best trial wins.

Every method gets the same number of trials on the same selection split (`search.num_trials`), so a
difference between methods is not a difference in tuning budget. A trial reports its selection score
after each epoch; Optuna's successive-halving pruner (ASHA: asynchronous, no waiting for a full rung)
stops it when it falls in the bottom share of its rung. Its value is its best epoch's score and that
epoch is its epoch count. The study lives in an Optuna journal file, so a killed search keeps the
trials it finished and `--resume` runs only the rest.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..config import ReproduceSearchConfig, Space

# a trial's per-epoch scores go through report(epoch, score); it returns when the trial may go on
Objective = Callable[[dict, Callable[[int, float], None]], None]


class Pruned(Exception):
    """ASHA stopped this trial; raised from inside its training loop."""


def run_search(objective: Objective, space: dict[str, Space], cfg: ReproduceSearchConfig, journal: Path,
               name: str, epoched: bool = True, on_trial: Callable[[dict], None] | None = None) -> dict:
    """Search `space` with `objective(params, report)`; returns {"chosen", "score", "trials", "seconds"}.

    epoched: the objective reports once per epoch; ASHA may stop it, and `chosen` gets "epochs" (the best
    trial's best epoch). Otherwise (ITI) it reports once and nothing is pruned. Trials a killed process left
    running count as failed and are run again; a trial that raised (e.g. a diverged loss) is kept as failed
    with its error and counts toward `num_trials`, as every method gets the same number of attempts.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    done_before = optuna.load_study(study_name=name, storage=storage).trials if _has_study(storage, name) else []
    # a resumed search reseeds past the trials it has, so it does not propose the same points again
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(done_before),
                                         n_startup_trials=max(1, cfg.num_trials // 2))
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=cfg.reduction_factor)
              if cfg.asha and epoched else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    for t in study.trials:
        if t.state == TrialState.RUNNING:  # its process was killed: the trial runs again
            study.tell(t.number, state=TrialState.FAIL)
    started = time.time()

    def counted() -> int:  # a trial that failed on its own (a diverged loss) spent its share of the budget too
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs
                   for t in study.trials)

    while counted() < cfg.num_trials:
        trial = study.ask()
        params = {key: s.suggest(trial, key) for key, s in space.items()}
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


def trial_record(t) -> dict:
    return {"number": t.number, "state": t.state.name.lower(), "params": dict(t.params), "value": t.value,
            **{k: t.user_attrs[k] for k in ("scores", "epochs", "seconds", "error") if k in t.user_attrs}}


def _has_study(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())
