"""lofit_ray.tuning: the one search that the service (on Ray Tune) and the study (in process) both run."""
from __future__ import annotations

import math
from pathlib import Path
import sys

import pytest

from lofit_ray.config import ReproduceSearchConfig, SearchConfig, SearchPolicy, SearchSpaceConfig, Space


def _score(params: dict) -> float:
    """A known landscape over the service's own space: best near phase2_lr = 0.02, K = 16, selector l1."""
    return (-abs(math.log10(params["phase2_lr"] / 0.02)) + 0.1 * (params["k"] == 16)
            + 0.05 * (params["selector"] == "l1") - 10 * params["l1"])


SPACE = SearchSpaceConfig(k=Space(values=[8, 16]), l1=Space(values=[5e-4, 2e-3]), phase1_lr=Space(values=[5e-3]),
                          phase2_lr=Space(low=3e-3, high=1e-1, log=True), selector=["l1", "grad"]).searched()


def test_the_service_and_the_study_propose_the_same_trials(tmp_path):
    """One search, two executors: with one trial at a time and the same scores, Ray Tune's trials (the
    service's executor) get exactly the settings the in-process study proposes, TPE's guided ones included,
    and both pick the same winner."""
    import ray
    from ray import tune

    from lofit_ray.tuning import run_in_process, run_on_ray

    policy = SearchPolicy(num_trials=6, seed=5, asha=False)
    in_process = run_in_process(lambda params, report: report(1, _score(params)), SPACE, policy,
                                tmp_path / "study.journal", name="toy", epoched=False)

    def trainable(config):
        tune.report({"sel_metric": _score(config), "epoch": 1})

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        grid = run_on_ray(trainable, SPACE, policy, name="toy", storage_path=tmp_path / "ray", max_epochs=1)
    finally:
        ray.shutdown()
    # Tune may list results in any order; a trial's folder, <trainable>_<id>_<n>_..., numbers the proposals
    results = sorted(grid, key=lambda r: int(Path(r.path).name.split("_")[2]))
    on_ray = [{name: r.config[name] for name in SPACE} for r in results]
    assert on_ray == [t["params"] for t in in_process["trials"]]
    assert len({t["params"]["phase2_lr"] for t in in_process["trials"]}) == 6  # six different draws, not a fixed point
    best = max(range(len(results)), key=lambda i: (results[i].metrics["sel_metric"], -i))
    assert on_ray[best] == in_process["chosen"]


def test_both_configs_share_one_policy():
    """The service's search section and the study's are one policy: same fields, same checks."""
    assert isinstance(SearchConfig(), SearchPolicy) and isinstance(ReproduceSearchConfig(), SearchPolicy)
    from lofit_ray.config import ConfigError

    for cls in (SearchConfig, ReproduceSearchConfig):
        with pytest.raises(ConfigError, match="search.grace_period"):
            cls(grace_period=0)
        with pytest.raises(ConfigError, match="search.metric"):
            cls(metric="accuracy")


def test_k_range_draws_integers(tmp_path):
    """K is drawn as an integer, from a range or from values (YAML numbers arrive as floats): heads are counted,
    and a trial's K is recorded as it was drawn (a registered version's k tag read "16.0" once)."""
    values = SearchSpaceConfig(k=Space(values=[8.0, 16.0])).searched()["k"].values
    assert values == [8, 16] and all(type(v) is int for v in values)
    from lofit_ray.tuning import run_in_process

    space = SearchSpaceConfig(k=Space(low=4, high=20)).searched()
    out = run_in_process(lambda params, report: report(1, -params["phase2_lr"]), space,
                         SearchPolicy(num_trials=4, asha=False), tmp_path / "k.journal", name="k", epoched=False)
    assert all(isinstance(t["params"]["k"], int) and 4 <= t["params"]["k"] <= 20 for t in out["trials"])


def test_search_chooses_the_best_trial_and_its_best_epoch(tmp_path):
    """tuning.run_in_process on a known objective: every trial is counted, ASHA prunes, the chosen
    setting is the best complete trial with its best epoch, and a second call resumes from the journal."""
    from lofit_ray.config import ReproduceSearchConfig, Space
    from lofit_ray.tuning import run_in_process

    calls = []

    def objective(params, report):  # peaks at lr = 0.01 and at epoch 2 of 3
        calls.append(params)
        for epoch in (1, 2, 3):
            report(epoch, -abs(params["lr"] - 0.01) * 100 - abs(epoch - 2) * 0.01 * (params["rank"] / 4))

    cfg = ReproduceSearchConfig(num_trials=8, seed=3)
    space = {"lr": Space(low=1e-3, high=1e-1, log=True), "rank": Space(values=[4, 8])}
    found = run_in_process(objective, space, cfg, tmp_path / "s.journal", name="toy")
    states = [t["state"] for t in found["trials"]]
    assert states.count("complete") + states.count("pruned") == 8 == len(calls)
    assert "pruned" in states  # ASHA stopped some trial after its first rung
    best = max((t for t in found["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert found["chosen"] == {**best["params"], "epochs": 2} and found["score"] == best["value"]
    assert best["scores"][1] == max(best["scores"])
    # the same journal: nothing left to run, the same answer
    again = run_in_process(objective, space, cfg, tmp_path / "s.journal", name="toy")
    assert len(calls) == 8 and again["chosen"] == found["chosen"]
    # a bigger budget on the same journal runs only the new trials
    more = run_in_process(objective, space, ReproduceSearchConfig(num_trials=10, seed=3), tmp_path / "s.journal",
                      name="toy")
    assert len(calls) == 10 and [t["number"] for t in more["trials"]][:8] == list(range(8))
    # a trial that fails (e.g. a diverged loss) is recorded with its error, and counts as one of the attempts
    def diverges(params, report):
        if params["lr"] > 0.01:
            raise FloatingPointError("loss is nan")
        report(1, -params["lr"])

    out = run_in_process(diverges, {"lr": Space(low=1e-3, high=1e-1, log=True)},
                     ReproduceSearchConfig(num_trials=6, seed=0, asha=False), tmp_path / "d.journal", name="d")
    failed = [t for t in out["trials"] if t["state"] == "fail"]
    assert failed and all("loss is nan" in t["error"] for t in failed)
    assert len(out["trials"]) == 6 and out["chosen"]["lr"] <= 0.01  # failed attempts spend the budget too

