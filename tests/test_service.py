"""The search service against a real local Ray, real DeepSpeed and a real MLflow SQLite store.

These start Ray clusters and run small searches on a tiny model: minutes, not seconds.
Every process started here is stopped here.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from ray_util import free_port, stop_ray_cluster

from lofit_ray import Adapter, tracking
from lofit_ray.config import ConfigError, TaskConfig, load_config
from lofit_ray.split_specs import split_spec

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
pytestmark = pytest.mark.slow


def _env(home: Path) -> dict:
    return {**os.environ, "LOFIT_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token"}


def _search(home: Path, *extra: str, timeout: int = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), "--config", str(SMOKE), *extra],
                          env={**_env(home), **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=home)


def _runs(uri: str, kind: str) -> list:
    c = tracking.client(uri)
    return [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=1000)
            if r.data.tags.get("lofit.kind") == kind]


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ({"search.space.kk": [1]}, "search.space.kk: unknown key"),
    ({"training.batch_size": 3}, "divisible by scaling.num_workers"),
    ({"deepspeed.zero_stage": 4}, "deepspeed.zero_stage"),
    ({"search.space.l1": {"low": 1.0}}, "search.space.l1"),
    ({"models": []}, "models: list at least one"),
    ({"search.space.l1": [-1e-3]}, "search.space.l1"),
    ({"search.space.phase2_lr": {"low": -1.0, "high": 1.0}}, "search.space.phase2_lr"),
    ({"search.space.k": [2.5]}, "search.space.k: K counts heads"),
    ({"search.space.phase2_lr": [float("inf")]}, "search.space.phase2_lr: every value must be a finite"),
    ({"phase1.lr": 0}, "phase1.lr"),
    ({"phase2.epochs": 0}, "phase2.epochs"),
    ({"search.space.selector": ["l1", "l2"]}, "search.space.selector"),
    ({"phase1.selector": "norm"}, "phase1.selector: 'norm' is not one of l1, gates, grad, grad_x_act, random"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(SMOKE, override)


@pytest.mark.parametrize("env,extra,message", [
    ({"LOFIT_DATA_DIR": "/nonexistent/data"}, [], "split: file not found: /nonexistent/data/"),
    ({}, ["--set", "models=[tiny-foo]"], "no tiny config for 'foo'"),
    ({}, ["--set", "search.space.l1=[-1.0e-3]"], "search.space.l1"),
    ({}, ["--set", "search.space.phase1_lr=[-0.01]"], "search.space.phase1_lr"),
    ({}, ["--set", "search.space.k=[2, 500]"], "larger than tiny-llama's"),
])
def test_bad_inputs_stop_the_search_before_mlflow_and_ray(tmp_path, env, extra, message):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), "--config", str(SMOKE), *extra],
                          env={**_env(tmp_path), **env}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and "Started a local Ray" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("overrides,cluster,message", [
    ({}, 2, None),
    ({"scaling.trial_cpus": 2.0}, 2, None),  # phase 1 is precomputed (l1 and phase-1 lr are lists)
    ({"scaling.trial_cpus": 2.0, "search.space.l1": {"low": 1e-4, "high": 1e-3, "log": True}}, 2,
     "scaling.trial_cpus: 1 trial(s) x 2 CPUs leave less than"),
    ({"search.max_concurrent": 2, "search.space.l1": {"low": 1e-4, "high": 1e-3}}, 2, "search.max_concurrent"),
    ({"search.max_concurrent": 2, "search.space.l1": {"low": 1e-4, "high": 1e-3}}, 3, None),
    ({"scaling.trial_cpus": 4.0}, 2, "scaling.trial_cpus: 4 is more than the Ray cluster's 2 CPUs"),
    ({"scaling.num_workers": 4, "scaling.cpus_per_worker": 1.0, "training.batch_size": 8}, 2,
     "scaling.num_workers x scaling.cpus_per_worker = 4 CPUs"),
])
def test_a_plan_ray_could_never_place_is_named_before_it_hangs(overrides, cluster, message):
    from lofit_ray.service import check_resources

    problem = check_resources(load_config(SMOKE, overrides), cluster)
    assert problem is None if message is None else message in problem, problem


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if not path.name.startswith("reproduce"):  # reproduce*.yaml: schema ReproduceConfig (test_reproduce)
            load_config(path)


# -- Ray Train + DeepSpeed ------------------------------------------------------------------

MQUAKE_8 = split_spec(TaskConfig(name="mquake", limit_train=8))  # 8 MQuAKE training examples, as a worker reads them


def single_process_scores(job: dict) -> torch.Tensor:
    """Phase 1 of ``job`` in this process, no Ray or DeepSpeed: the ||A|| of every head, [layers, heads],
    which the workers must reproduce exactly."""
    from lofit_ray.config import Phase1Config, TrainingConfig
    from lofit_ray.distributed import job_examples
    from lofit_ray.models import load_model
    from lofit_ray.offsets import HeadOffsets
    from lofit_ray.selectors import select_heads

    loaded = load_model(job["model"])
    training = TrainingConfig(**job["training"])
    phase1 = Phase1Config(**job["phase1"])
    head_set = select_heads(loaded, job_examples(job), training, phase1)
    scores = head_set.score_grid()
    if phase1.selector == "l1":
        initial = HeadOffsets(loaded.layout, scale=True, seed=training.seed).scale.detach().norm(dim=-1)
        assert (scores - initial).abs().max() > 1e-2  # it trained
    assert scores.max() > scores.min()  # a ranking, not a tie
    return scores


def worker_scores(out: dict) -> torch.Tensor:
    from lofit_ray.heads import HeadSet

    return HeadSet(**out["head_set"]).score_grid()


def phase1_on_two_workers(job: dict, tmp_path: Path, name: str, env: dict | None = None,
                          zero_stage: int = 2) -> list[dict]:
    """run_phase1 on a fresh local Ray (2 DeepSpeed workers, gloo); `env` reaches every worker."""
    import ray

    from lofit_ray.distributed import run_phase1

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", **(env or {})}})
    try:
        return run_phase1([job], num_workers=2, cpus_per_worker=0.49, use_gpu=False, zero_stage=zero_stage,
                          use_deepspeed=True, storage_path=str(tmp_path), name=name, max_failures=1)
    finally:
        ray.shutdown()


PAPER_OPTIMIZER = dict(lr_schedule="linear", max_grad_norm=0.05)  # a clip small enough to act on every step


@pytest.mark.parametrize("zero_stage, optimizer", [(2, {}), (3, {}), (2, PAPER_OPTIMIZER)],
                         ids=["zero2", "zero3", "zero2-linear-clipped"])
def test_two_deepspeed_workers_match_a_single_process_run(tmp_path, zero_stage, optimizer):
    """Phase 1 on 2 Ray Train workers (DeepSpeed, gloo) learns exactly what one process learns. ZeRO-3
    partitions A, which only the engine's own forward would gather; the hooks read it, so the stepper must.
    The paper's optimizer (lr decayed linearly, gradient norm clipped) is DeepSpeed's clipping and the same
    scheduler as TorchStepper's, and must match too."""
    job = {"model": "tiny-llama", "task": MQUAKE_8, "task_name": "mquake",
           "training": dict(batch_size=4, max_length=64, seed=3),
           "phase1": dict(epochs=2 if optimizer else 1, lr=1e-2, l1=1e-3, **optimizer)}
    out = phase1_on_two_workers(job, tmp_path, f"grad-check-zero{zero_stage}", zero_stage=zero_stage)
    expected = single_process_scores(job)
    torch.testing.assert_close(worker_scores(out[0]), expected, atol=1e-6, rtol=0)
    assert out[0]["head_set"]["hparams"]["workers"] == 2
    if optimizer:  # the schedule and the clip changed what was learned
        plain = {**job, "phase1": {k: v for k, v in job["phase1"].items() if k not in optimizer}}
        assert (single_process_scores(plain) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("selector", ["gates", "grad", "grad_x_act"])
def test_every_selector_on_two_deepspeed_workers_matches_a_single_process_run(tmp_path, selector):
    """The other selectors shard the same way: gates train in the DeepSpeed engine (their HardConcrete draws
    are seeded per forward, so both workers draw the same gates), grad and grad_x_act average their one-pass
    sums over the workers."""
    job = {"model": "tiny-llama", "task": MQUAKE_8, "task_name": "mquake",
           "training": dict(batch_size=4, max_length=64, seed=3),
           "phase1": dict(epochs=1, lr=1e-2, selector=selector, l0=1e-2)}
    out = phase1_on_two_workers(job, tmp_path, f"selector-{selector}")
    torch.testing.assert_close(worker_scores(out[0]), single_process_scores(job), atol=1e-6, rtol=0)
    assert out[0]["head_set"]["method"] == selector and out[0]["head_set"]["hparams"]["workers"] == 2


def test_killed_worker_is_restarted_and_learns_the_same(tmp_path):
    """Worker rank 1 SIGKILLs itself at the end of epoch 2 (fault point worker.kill, once): FailureConfig(
    max_failures=1) restarts the worker group, and phase 1 still returns exactly what one process learns
    (nothing half-trained leaks in)."""
    epochs = 4
    job = {"model": "tiny-llama", "task": MQUAKE_8, "task_name": "mquake",
           "training": dict(batch_size=4, max_length=64, seed=3), "phase1": dict(epochs=epochs, lr=1e-2, l1=1e-3)}
    markers = tmp_path / "fired"
    markers.mkdir()
    faults_env = {"LOFIT_FAULTS": "worker.kill@rank=1&epoch=2", "LOFIT_FAULTS_ONCE_DIR": str(markers)}
    out = phase1_on_two_workers(job, tmp_path, "killed-worker", env=faults_env)
    fired = list(markers.iterdir())
    assert [m.name for m in fired] == ["worker.kill-epoch=2-rank=1"], "the fault point never fired"
    victim = int(fired[0].read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # the worker is really gone: the result came from a restarted group
    torch.testing.assert_close(worker_scores(out[0]), single_process_scores(job), atol=1e-6, rtol=0)
    assert [h["epoch"] for h in out[0]["history"]] == list(range(1, epochs + 1))  # one clean retried run


# -- the whole search -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on loopback with a dashboard for `ray job submit`; afterwards only its own processes
    are stopped (found by their RAY_TMPDIR), never the other clusters on the machine."""
    home = tmp_path_factory.mktemp("lofit_home")
    port, dash = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="lr-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {**_env(home), "RAY_TMPDIR": ray_tmp}
    try:
        subprocess.run(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "2", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
        yield {"home": home, "address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        stop_ray_cluster(temp_dir=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_runs_a_search_that_registers_a_champion(ray_head):
    """`ray job submit --working-dir . -- python jobs/search.py` against a local head, then the registry:
    versions with tags, the champion alias, artifacts that load back into a model, memoized phase 1,
    and a diverging trial marked failed while the search goes on."""
    home = ray_head["home"]
    uri = f"sqlite:///{home}/mlflow.db"
    # the trials with phase2_lr 0.5 diverge at a named fault point (lofit_ray.faults)
    cmd = ["ray", "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"LOFIT_FAULTS": "trial.diverge@phase2_lr=0.5"}}), "--",
           "python", "jobs/search.py", "--config", "configs/smoke.yaml", "--tracking-uri", uri,
           "--set", "search.num_trials=4", "--set", "search.space.phase2_lr=[0.5, 1.0e-2]",
           "--set", "search.asha=false"]
    res = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "champion" in res.stdout

    name = tracking.registered_name("tiny-llama", "truthfulqa")
    c = tracking.client(uri)
    trials = _runs(uri, "trial")
    finished = [r for r in trials if r.info.status == "FINISHED"]
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(trials) == 4 and finished
    assert failed and all("diverged" in r.data.tags[tracking.FAILURE_REASON_TAG] for r in failed)
    assert all(r.data.params["phase2_lr"] == "0.5" for r in failed)
    # without ASHA nothing acts on an intermediate score: each trial is evaluated once, after its last epoch
    assert all({m.step for m in c.get_metric_history(r.info.run_id, "sel_metric")} == {2} for r in finished)
    versions = c.search_model_versions(f"name='{name}'")
    assert len(versions) == len(finished)
    assert all({"k", "sel_metric", "trial_id"} <= set(v.tags) for v in versions)
    champion = tracking.get_champion(uri, name)
    # the best selection score wins; a tie goes to the earlier version, as in every search (lofit_ray.tuning)
    best = min(versions, key=lambda v: (-float(v.tags["sel_metric"]), int(v.version)))
    assert str(champion.version) == str(best.version)
    # memoization: one phase-1 run (the grid has one l1 x lr point) served every trial
    assert len(_runs(uri, "phase1")) == 1
    assert all(r.data.metrics.get("memo_hit") == 1.0 for r in finished)
    # torch threads in each trial = the CPUs Ray gave it (scaling.trial_cpus: 1 in smoke.yaml)
    assert all(r.data.metrics["torch_threads"] == 1.0 for r in finished)
    # the champion's adapter loads back onto the model and changes it
    adapter = Adapter.from_pretrained(tracking.download_adapter(f"models:/{name}@champion", uri))
    assert len(adapter.config.heads) == int(champion.tags["k"])
    # the adapter records the searched phase-1 settings (phase 2 no longer overwrites L1 with 0)
    hp = adapter.config.hparams
    assert hp["phase1"]["l1"] == float(champion.tags["l1"]) == 1e-3 and hp["phase1"]["lr"] == 1e-2
    assert hp["phase2"]["lr"] == float(champion.tags["phase2_lr"]) and hp["k"] == int(champion.tags["k"])
    from lofit_ray.models import load_model

    loaded = load_model("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = loaded.model(ids).logits
    adapter.attach(loaded.model, loaded.fingerprint)
    assert not torch.allclose(loaded.model(ids).logits, base)
    heatmap = c.list_artifacts(best.run_id, "heads")
    assert {Path(f.path).name for f in heatmap} == {"head_set.json", "heatmap.png"}
    parent = [r for r in _runs(uri, "search")][0]
    assert parent.info.status == "FINISHED" and "tiny-llama.val_mc2" in parent.data.metrics
    # evidence: every version carries its selection fingerprint, every trial its selection rows, and the
    # report pairs the champion with the 0-shot model and with random-heads controls (search.controls: 2)
    from lofit_ray.service import get_splits, task_spec
    from lofit_ray.splits import selection_fingerprint

    cfg = load_config(REPO / "configs/smoke.yaml")
    fp = selection_fingerprint(get_splits(task_spec(cfg), cache=False)[1].select, cfg.search.metric)
    assert all(v.tags[tracking.SELECT_FP_TAG] == fp for v in versions)
    assert all(len(tracking.load_item_rows(uri, f"{r.info.run_id}#select")[0]) == 8 for r in finished)
    m = parent.data.metrics
    for key in ("val_mc2", "val_mc2_ci_low", "val_mc2_ci_high", "val_zero_shot_mc2_ci_low", "val_random_mc2",
                "vs_zero_shot_mc2_diff", "vs_zero_shot_mc2_p_value", "vs_random_mc2_diff", "vs_random_mc2_p_value"):
        assert f"tiny-llama.{key}" in m, key
    assert m["tiny-llama.val_mc2_ci_low"] <= m["tiny-llama.val_mc2"] <= m["tiny-llama.val_mc2_ci_high"]
    controls = _runs(uri, "control")
    assert len(controls) == 2 and all(r.info.status == "FINISHED" for r in controls)
    assert {r.data.params["k"] for r in controls} == {champion.tags["k"]}
    assert {r.data.params["phase2_lr"] for r in controls} == {str(hp["phase2"]["lr"])}
    champion_rows = tracking.load_item_rows(uri, f"models:/{name}@champion#report")[0]
    zero_rows = tracking.load_item_rows(uri, f"{parent.info.run_id}#report_zero_shot-tiny-llama")[0]
    assert len(champion_rows) == len(zero_rows) == 8
    assert sum(r["mc2"] for r in champion_rows) / 8 == pytest.approx(m["tiny-llama.val_mc2"])
    assert {Path(f.path).name for f in c.list_artifacts(parent.info.run_id, "report")} == {"tiny-llama_report.png"}
    assert "champion - random heads" in res.stdout and "champion - 0-shot" in res.stdout
    assert res.stdout.count("; report split") == 1  # the report is printed once, at the end


def _trial_outcomes(uri: str) -> dict:
    return {r.info.run_id: (r.data.tags["lofit.trial_id"], r.info.status, r.data.tags.get("lofit.outcome"))
            for r in _runs(uri, "trial")}


@pytest.mark.parametrize("point", ["store_created", "registered", "trial_finished"])
def test_resume_after_a_killed_driver_loses_nothing(tmp_path, point):
    """SIGKILL the whole search at a named point (lofit_ray.faults): while the MLflow store is created, right
    after a trial's adapter is registered, and right after a trial finished. --resume then completes the
    search with exactly one finished run per trial; a trial that had finished is reported back from MLflow,
    not retrained, and keeps its run and artifacts."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ray_tmp = tempfile.mkdtemp(prefix="lr-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {**_env(tmp_path), "RAY_TMPDIR": ray_tmp}
    args = [sys.executable, str(REPO / "jobs" / "search.py"), "--config", str(SMOKE), "--tracking-uri", uri,
            "--set", "search.num_trials=3", "--set", "search.asha=false"]
    try:
        killed = subprocess.run(args, env={**env, "LOFIT_FAULTS": f"driver.kill@at={point}"}, capture_output=True,
                                text=True, cwd=tmp_path, start_new_session=True, timeout=900)
        assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
        stop_ray_cluster(temp_dir=ray_tmp)
        before = _trial_outcomes(uri) if point != "store_created" else {}
        finished_before = {tid: rid for rid, (tid, status, _) in before.items() if status == "FINISHED"}
        if point == "store_created":
            assert not (tmp_path / "mlflow.db").exists()  # no half-made store: the next run builds it whole
        if point == "trial_finished":
            assert len(finished_before) == 1
        resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, cwd=tmp_path,
                                 timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        stop_ray_cluster(temp_dir=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    after = _trial_outcomes(uri)
    finished = {rid: tid for rid, (tid, status, _) in after.items() if status == "FINISHED"}
    assert sorted(finished.values()) == sorted(set(finished.values())) and len(finished) == 3  # exactly once each
    assert all(outcome == "completed" for rid, (_, status, outcome) in after.items() if status == "FINISHED")
    assert all(status != "RUNNING" for _, status, _ in after.values())
    for tid, rid in finished_before.items():  # kept, not redone: same run, adapter still there
        assert finished[rid] == tid
    c = tracking.client(uri)
    name = tracking.registered_name("tiny-llama", "truthfulqa")
    versions = c.search_model_versions(f"name='{name}'")
    for v in versions:  # every registered version still has its complete adapter
        files = {Path(f.path).name for f in c.list_artifacts(v.run_id, "adapter")}
        assert {"adapter_config.json", "offsets.safetensors"} <= files, (v.version, files)
    assert {v.run_id for v in versions} >= set(finished)
    assert tracking.get_champion(uri, name) is not None
    assert len(_runs(uri, "search")) == 1  # the same parent run was continued
    assert not list(tmp_path.glob(".mlflow.db.creating-*"))
    import optuna  # ... and the same Optuna study, under $LOFIT_HOME

    names = optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(names) == 1 and len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= 3


def timing_problems(run) -> list[str]:
    """What is wrong with a trial run's timing metrics, measured against the run's own start and end times
    (MLflow's): the parts are real durations, they add up to at most total_s, and total_s fits in the run."""
    m, wall = run.data.metrics, (run.info.end_time - run.info.start_time) / 1000
    parts = {k: m.get(k, float("nan")) for k in ("phase1_s", "phase2_s", "eval_s")}
    total = m.get("total_s", float("nan"))
    problems = [f"{k}={v}" for k, v in parts.items() if not v >= 0]
    problems += [f"{k}={parts[k]}: a stopped trial trained and was evaluated" for k in ("phase2_s", "eval_s")
                 if not parts[k] > 0]
    if not sum(parts.values()) <= total + 0.01:
        problems.append(f"phase1_s + phase2_s + eval_s = {sum(parts.values()):.3f} > total_s = {total}")
    if not 0 < total <= wall + 1:  # the trial's clock starts after the run opens; the run closes after its report
        problems.append(f"total_s = {total} does not fit the run's {wall:.3f} s from start to end")
    return problems


def test_asha_stops_are_recorded_as_early_stops_when_they_happen(tmp_path):
    """With ASHA on, a stopped trial's run is closed when Tune stops it (not when the search ends): FINISHED,
    tagged lofit.outcome=stopped_early, with its timing metrics; completed trials are recorded before their
    last report (registered adapter, outcome completed). The selector is a searched dimension too: phase 1 is
    precomputed once per selector (grad reads neither l1 nor the lr) and every trial reads the memo."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = _search(tmp_path, "--tracking-uri", uri, "--set", "search.num_trials=4", "--set", "search.asha=true",
                  "--set", "phase2.epochs=3", "--set", "search.grace_period=1", "--set", "search.reduction_factor=3",
                  "--set", "search.space.selector=[l1, grad]", "--set", "search.space.l1=[1.0e-3, 1.0e-2]")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trials = _runs(uri, "trial")
    stopped = [r for r in trials if r.data.tags.get("lofit.outcome") == "stopped_early"]
    completed = [r for r in trials if r.data.tags.get("lofit.outcome") == "completed"]
    assert stopped and completed and len(stopped) + len(completed) == 4
    parent = _runs(uri, "search")[0]
    for r in stopped:
        assert r.info.status == "FINISHED" and "stopped early by ASHA after epoch" in r.data.tags["lofit.stop_reason"]
        assert r.info.end_time < parent.info.end_time - 1000  # closed when stopped, not at the end
        assert not timing_problems(r), (r.info.run_id, timing_problems(r))
        assert "lofit.registered_version" not in r.data.tags
    for r in completed:
        assert r.info.status == "FINISHED" and r.data.tags["lofit.registered_version"]
    phase1 = _runs(uri, "phase1")
    assert sorted(r.data.params["phase1.selector"] for r in phase1) == ["grad", "l1", "l1"]  # l1 x {1e-3, 1e-2}, and one grad ranking for both l1 values
    assert all(r.data.params["selector"] in ("l1", "grad") and r.data.metrics["memo_hit"] == 1.0 for r in trials)
    # the Optuna study persists under $LOFIT_HOME, named after the parent run, with its plots on that run
    import optuna

    study = optuna.load_study(study_name=f"smoke-tiny-llama-{parent.info.run_id[:8]}",
                              storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 4 and {t.params["selector"] for t in study.trials} <= {"l1", "grad"}
    plots = {Path(a.path).name for a in tracking.client(uri).list_artifacts(parent.info.run_id, "optuna")}
    assert plots == {f"{study.study_name}_history.png", f"{study.study_name}_importances.png"}


def test_concurrent_trials_compute_a_shared_ranking_once(tmp_path):
    """Two trials running at once that need the same phase-1 ranking (a continuous L1 space, so nothing is
    precomputed) run phase 1 once: one computes it under the claim, the other waits and reads the memo.
    That they ran at once is shown, not assumed: each trial holds at the fault point phase1.meet until both
    have reached it (trials run one after the other would fail there, the first waiting in vain)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    met = tmp_path / "met"
    met.mkdir()
    res = _search(tmp_path, "--tracking-uri", uri, "--set", "search.num_trials=2", "--set", "search.max_concurrent=2",
                  "--set", "search.asha=false", "--set", "scaling.trial_cpus=0.5", "--set", "scaling.trial_threads=1",
                  "--set", "search.space.l1={low: 1.0e-3, high: 1.0e-3}", "--set", "search.space.k=[2]",
                  env={"LOFIT_FAULTS": "phase1.meet@n=2&timeout=240", "LOFIT_FAULTS_ONCE_DIR": str(met)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trials = [r for r in _runs(uri, "trial") if r.info.status == "FINISHED"]
    assert len(trials) == 2, [(r.info.status, r.data.tags.get("lofit.failure_reason")) for r in _runs(uri, "trial")]
    assert len(list(met.iterdir())) == 2  # both trials arrived, and neither timed out waiting for the other
    assert len(_runs(uri, "phase1")) == 1
    assert sorted(r.data.metrics["memo_hit"] for r in trials) == [0.0, 1.0]
    # the local Ray this search started runs its trials at nice 0, not Ray's default 15 (starved beside any load)
    assert all(r.data.metrics["niceness"] == 0.0 for r in trials)
