"""The search service: K, L1 and learning rates searched over a Ray cluster, recorded in MLflow.

The search itself (space, Optuna TPE, ASHA, the winner) is lofit_ray.tuning's, the one the study runs too;
here it runs on Ray Tune (`tuning.run_on_ray`). Per model, one Tuner runs trials of `trial_fn`:
  1. phase 1 (head ranking) comes from the memo in MLflow when a run with the same phase-1
     key exists (model fingerprint, data, l1, phase-1 lr, epochs, seed: K is not in the key,
     it only cuts the ranking); otherwise it runs as a Ray Train + DeepSpeed job and is recorded;
  2. phase 2 trains offsets on the top K heads in the trial process, evaluating the selection
     split every epoch and reporting to Tune (ASHA stops weak trials early);
  3. a finished trial logs its adapter and registers it as a model version.
When the search ends, the best version gets the `champion` alias and is scored once on the
held-out report split, next to the 0-shot model and random-heads controls (lofit_ray/report.py).

Cost-aware mode (search.cost_aware) adds the sharing: phase-1 rankings precomputed for the whole
discrete phase-1 grid in one Ray Train job (all models at once) and memoized, DPO reference
log-probs cached on disk, models and data kept per trial process (actors are reused).
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import batching, faults, tracking
from .adapter import Adapter
from .config import ConfigError, Phase1Config, Phase2Config, SearchJobConfig, SearchSpaceConfig, from_dict, to_dict
from .distributed import assigned_threads
from .evaluate import evaluate_items, selection_score
from .evidence import METRIC_COLUMNS
from .heads import HeadSet
from .models import check_spec, load_tokenizer, spec_slug
from .offsets import detach_all
from .process_cache import get_model, get_splits, task_spec
from .split_specs import with_absolute_paths
from .splits import selection_fingerprint
from .train import NaNLossError, phase1_key, reference_logprobs, train_offsets
from .tuning import run_on_ray

SEARCHED = tuple(SearchSpaceConfig().searched())  # k, selector, l1, phase1_lr, phase2_lr


# -- config -> pieces (task_spec, get_splits, get_model: lofit_ray.process_cache, which the report shares) ---

def trial_configs(cfg: SearchJobConfig, params: dict) -> tuple[Phase1Config, Phase2Config]:
    """The phase configs of one trial: the YAML sections with the searched values put in."""
    return (dataclasses.replace(cfg.phase1, selector=str(params["selector"]), l1=float(params["l1"]),
                                lr=float(params["phase1_lr"])),
            dataclasses.replace(cfg.phase2, lr=float(params["phase2_lr"])))


# -- phase 1 ------------------------------------------------------------------------------

def phase1_job(cfg: SearchJobConfig, model: str, loaded, splits, phase1: Phase1Config) -> dict:
    """What a Ray Train worker needs to compute one phase-1 ranking, and its memo key."""
    job = {"model": model, "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation,
           "task": task_spec(cfg, model), "task_name": cfg.task.name, "training": asdict(cfg.training),
           "phase1": asdict(phase1),
           "key": phase1_key(loaded.cache_key, splits.train_hash(), cfg.task.name, cfg.training, phase1)}
    encoded = batching.encode_examples(loaded.tokenizer, splits.train, cfg.training.max_length)
    if isinstance(encoded[0], tuple):  # DPO: the reference is computed once here, shipped to every worker
        job["reference"] = reference_logprobs(loaded, encoded, cfg.training, use_cache=cfg.search.cost_aware).tolist()
    return job


def run_phase1_jobs(cfg: SearchJobConfig, jobs: list[dict], ctx: dict, name: str) -> list[HeadSet]:
    """Run phase-1 jobs in one Ray Train job and record each head set as a memo run in MLflow."""
    from .distributed import run_phase1

    sc = cfg.scaling
    start = time.time()
    outputs = run_phase1(jobs, num_workers=sc.num_workers, cpus_per_worker=sc.cpus_per_worker, use_gpu=sc.use_gpu,
                         worker_resources=sc.worker_resources,
                         zero_stage=cfg.deepspeed.zero_stage, use_deepspeed=cfg.deepspeed.enabled,
                         storage_path=ctx["storage_path"], name=name, max_failures=sc.max_failures)
    seconds = (time.time() - start) / max(len(outputs), 1)
    head_sets = []
    for job, out in zip(jobs, outputs):
        head_set = HeadSet(**out["head_set"])
        uri = ctx["tracking_uri"]
        run_id = tracking.start_run(uri, ctx["experiment_id"], f"phase1-{spec_slug(job['model'])}-{job['key'][:8]}",
                                    params={"training": job["training"], "phase1": job["phase1"], "model": job["model"],
                                            "workers": sc.num_workers, "zero_stage": cfg.deepspeed.zero_stage},
                                    tags={tracking.PHASE1_KEY_TAG: job["key"], tracking.KIND_TAG: "phase1"},
                                    parent_run_id=ctx["parent_run_id"])
        for epoch in out["history"]:
            tracking.log_metrics(uri, run_id, {"phase1_loss": epoch["loss"]}, step=epoch["epoch"])
        tracking.log_metrics(uri, run_id, {"phase1_seconds": seconds})
        tracking.log_head_set(uri, run_id, head_set, key=job["key"])
        tracking.end_run(uri, run_id)
        head_sets.append(head_set)
    return head_sets


def precompute_phase1(cfg: SearchJobConfig, ctx: dict) -> int:
    """One Ray Train job for every (model, selector, l1, phase-1 lr) of a discrete grid that the memo lacks."""
    space = cfg.search.space
    if space.l1.values is None or space.phase1_lr.values is None:
        return 0
    jobs = []
    for model in cfg.models:
        loaded = get_model(model, cfg.dtype, attn_implementation=cfg.attn_implementation)
        _, splits = get_splits(task_spec(cfg, model))
        keys = set()  # grad and random read neither l1 nor the lr: one ranking serves all their values
        for selector, l1, lr in itertools.product(space.selector, space.l1.values, space.phase1_lr.values):
            phase1, _ = trial_configs(cfg, {"selector": selector, "l1": l1, "phase1_lr": lr,
                                            "phase2_lr": cfg.phase2.lr})
            job = phase1_job(cfg, model, loaded, splits, phase1)
            if job["key"] not in keys and tracking.find_head_set(ctx["tracking_uri"], ctx["experiment_id"],
                                                                 job["key"]) is None:
                jobs.append(job)
            keys.add(job["key"])
    if jobs:
        print(f"[lofit-ray] phase 1 for {len(jobs)} (model, selector, l1, lr) settings in one Ray Train job",
              flush=True)
        run_phase1_jobs(cfg, jobs, ctx, name=f"{cfg.name}-phase1")
    return len(jobs)


# -- one trial ------------------------------------------------------------------------------

def trial_fn(config: dict, ctx: dict) -> None:
    """A Tune function trainable: phase 1 (memoized) -> phase 2 with per-epoch evaluation -> registry."""
    from ray import tune

    cfg = from_dict(SearchJobConfig, ctx["run_config"])
    cost_aware = cfg.search.cost_aware
    torch.set_num_threads(cfg.scaling.trial_threads or assigned_threads())
    params = {name: config[name] for name in SEARCHED}
    uri, model = ctx["tracking_uri"], ctx["model"]
    trial_id = tune.get_context().get_trial_id()
    previous = tracking.finished_trial_run(uri, ctx["experiment_id"], ctx["parent_run_id"], trial_id)
    if previous is not None:  # resumed search: this trial finished before the driver died; don't redo it
        tune.report({**previous["metrics"], "epoch": previous["stopped_epoch"] or cfg.phase2.epochs, "resumed": 1,
                     "mlflow_run_id": previous["run_id"], "version": previous["version"]})
        return
    phase1, phase2 = trial_configs(cfg, params)
    run_id = tracking.start_run(uri, ctx["experiment_id"], f"trial-{spec_slug(model)}-{trial_id}",
                                params={**params, "model": model, "task": cfg.task.name,
                                        "phase2_epochs": phase2.epochs, "cost_aware": cost_aware},
                                tags={tracking.KIND_TAG: "trial", "lofit.trial_id": trial_id, tracking.MODEL_TAG: model,
                                      tracking.TASK_TAG: cfg.task.name}, parent_run_id=ctx["parent_run_id"])
    timing = {"phase1_s": 0.0, "phase2_s": 0.0, "eval_s": 0.0}
    recorded = False  # set once the trial's run is recorded as FINISHED
    start = time.time()
    try:
        loaded = get_model(model, cfg.dtype, cache=cost_aware, attn_implementation=cfg.attn_implementation)
        detach_all(loaded.model)  # a kept model may still hold the hooks of a trial ASHA stopped
        task, splits = get_splits(task_spec(cfg, model), cache=cost_aware)
        k = int(params["k"])
        t0 = time.time()
        job = phase1_job(cfg, model, loaded, splits, phase1)
        head_set, memo_hit = phase1_ranking(cfg, ctx, job, name=f"{cfg.name}-phase1-{trial_id}")
        timing["phase1_s"] = time.time() - t0
        head_set = head_set.with_k(k)
        tracking.log_head_set(uri, run_id, head_set)
        reference = torch.tensor(job["reference"]) if "reference" in job else None
        p2_start = time.time()
        last: dict = {}

        def on_epoch(epoch: int, stats: dict) -> None:
            if epoch < phase2.epochs and not cfg.search.asha:
                return  # only ASHA acts on an intermediate score: without it, evaluate once, at the end
            e0 = time.time()
            scores, rows = evaluate_items(loaded, splits.select)
            timing["eval_s"] += time.time() - e0
            timing["phase2_s"] = time.time() - p2_start - timing["eval_s"]
            metrics = {f"sel_{name}": scores[name] for name in METRIC_COLUMNS if name in scores}
            metrics.update(sel_metric=selection_score(scores, cfg.search.metric), train_loss=stats["loss"])
            tracking.log_metrics(uri, run_id, metrics, step=epoch)
            tracking.log_item_rows(uri, run_id, rows, "select")  # the latest epoch's, kept if ASHA stops here
            last.update(metrics=metrics, report={**metrics, **timing, "epoch": epoch, "memo_hit": int(memo_hit),
                                                 "mlflow_run_id": run_id})
            if epoch < phase2.epochs:  # the last report comes after the trial is recorded (below)
                tune.report({**last["report"], "total_s": time.time() - start})

        if faults.triggered("trial.diverge", **params):
            raise NaNLossError(f"loss is nan (fault point trial.diverge, phase2_lr={phase2.lr})")
        adapter = train_offsets(loaded, head_set, k, splits.train, cfg.training, phase2, task=cfg.task.name,
                                reference=reference, on_epoch=on_epoch)
        adapter.config.eval_kind = task.eval_kind
        # Record everything before the last report: Tune stops the trial as soon as it sees the final
        # epoch, and code after that report would never run.
        version = _finish_trial(uri, ctx, run_id, trial_id, adapter, params, last["metrics"],
                                last["report"]["epoch"], {**timing, "total_s": time.time() - start, "memo_hit": int(memo_hit),
                                 "torch_threads": torch.get_num_threads(), "niceness": os.nice(0)})
        recorded = True
        tune.report({**last["report"], "version": version, "total_s": time.time() - start})
    except Exception as exc:
        if not recorded:
            reason = f"diverged: {exc}" if isinstance(exc, NaNLossError) else f"{type(exc).__name__}: {exc}"
            tracking.set_tags(uri, run_id, {tracking.OUTCOME_TAG: "failed"})
            tracking.end_run(uri, run_id, "FAILED", reason=reason)
        raise


def _finish_trial(uri, ctx, run_id, trial_id, adapter: Adapter, params, metrics, epoch: int, timing) -> str:
    """Log the adapter (an MLflow model with the trial's last selection metrics), register it as a model
    version with its metrics as tags, close the run."""
    model_id = tracking.log_adapter(uri, run_id, adapter)
    tracking.log_metrics(uri, run_id, metrics, step=epoch, model_id=model_id)
    version = tracking.register_adapter(
        uri, ctx["registered_name"], run_id,
        tags={"k": params["k"], "trial_id": trial_id, "sel_metric": f"{metrics['sel_metric']:.6f}",
              tracking.SELECT_FP_TAG: ctx["select_fingerprint"],
              "selector": params["selector"], "l1": params["l1"], "phase1_lr": params["phase1_lr"],
              "phase2_lr": params["phase2_lr"],
              "parameters": adapter.num_parameters})
    faults.kill_point("driver.kill", process_group=ctx["driver_pgid"], at="registered")
    tracking.set_tags(uri, run_id, {"lofit.registered_version": version, tracking.OUTCOME_TAG: "completed"})
    tracking.log_metrics(uri, run_id, timing)
    tracking.end_run(uri, run_id)
    faults.kill_point("driver.kill", process_group=ctx["driver_pgid"], at="trial_finished")
    return version


class Phase1Claims:
    """A Ray actor, one per search: the first trial that needs a phase-1 ranking computes it, and trials
    that need the same ranking meanwhile wait for it instead of computing it again."""

    def __init__(self):
        self._busy: dict = {}

    async def claim(self, key: str) -> bool:
        """True: the caller computes `key`. False: another trial just finished (or gave up) computing it."""
        import asyncio

        if key in self._busy:
            await self._busy[key].wait()
            return False
        self._busy[key] = asyncio.Event()
        return True

    async def release(self, key: str) -> None:
        event = self._busy.pop(key, None)
        if event is not None:
            event.set()


def phase1_ranking(cfg: SearchJobConfig, ctx: dict, job: dict, name: str) -> tuple[HeadSet, bool]:
    """The ranking of a phase-1 job: from the memo in MLflow when recorded (memo hit), else computed once
    under a claim, so two concurrent trials never run the same phase 1 twice."""
    import ray

    uri, experiment_id = ctx["tracking_uri"], ctx["experiment_id"]
    faults.meet("phase1.meet")  # tests: hold here until the other trial is in phase 1 too
    if not cfg.search.cost_aware:
        return run_phase1_jobs(cfg, [job], ctx, name=name)[0], False
    claims = ray.get_actor(ctx["phase1_claims"])
    while True:
        head_set = tracking.find_head_set(uri, experiment_id, job["key"])
        if head_set is not None:
            return head_set, True
        if ray.get(claims.claim.remote(job["key"])):
            try:
                return run_phase1_jobs(cfg, [job], ctx, name=name)[0], False
            finally:
                ray.get(claims.release.remote(job["key"]))


# -- the driver ------------------------------------------------------------------------------

def _state_file(storage: Path, cfg: SearchJobConfig) -> Path:
    return storage / f"{cfg.name}.lofit-state.json"


def check_inputs(cfg: SearchJobConfig) -> None:
    """Read the task's splits and resolve every model spec before MLflow or Ray is touched, so a missing
    file or a wrong spec fails in seconds with its own message (TaskDataError / ModelSpecError). Warns when
    more than 1% of the training examples are longer than training.max_length."""
    k_high = int(cfg.search.space.k.bounds()[1])
    for model in cfg.models:
        note = data_note(cfg, model)
        if note.get("truncation_warning"):
            print(f"[lofit-ray] warning: {model}: {note['truncation_warning']}", flush=True)
        total = check_spec(model).total_heads
        if k_high > total:
            raise ConfigError(f"search.space.k: K up to {k_high} is larger than {model}'s {total} heads; "
                              f"keep K within 1..{total} (about 3-10% of heads)")


def data_note(cfg: SearchJobConfig, model: str) -> dict:
    """What the search trains and scores on for `model`: split sizes, the prompts dropped so that the splits are
    disjoint, and how many training examples training.max_length cuts. Goes into the summary and the report."""
    _, splits = get_splits(task_spec(cfg, model))
    truncated = batching.count_truncated(load_tokenizer(model), splits.train, cfg.training.max_length)
    note = {**splits.carve, "truncated_train": truncated, "max_length": cfg.training.max_length}
    warning = batching.truncation_note(truncated, len(splits.train))
    return {**note, "truncation_warning": warning} if warning else note


def check_resources(cfg: SearchJobConfig, cluster_cpus: float) -> str | None:
    """A plan Ray could never place waits forever instead of failing: say so first (the message names the
    fields), or None when it fits. Phase 1 runs inside a trial unless cost-aware mode precomputes it (l1 and
    phase-1 lr given as lists); then that trial holds its CPUs while phase 1's workers need theirs."""
    sc, space = cfg.scaling, cfg.search.space
    phase1 = sc.num_workers * sc.cpus_per_worker
    if phase1 > cluster_cpus:
        return (f"scaling.num_workers x scaling.cpus_per_worker = {phase1:g} CPUs for phase 1, but the Ray cluster "
                f"has {cluster_cpus:g}; lower either")
    if sc.trial_cpus > cluster_cpus:
        return f"scaling.trial_cpus: {sc.trial_cpus:g} is more than the Ray cluster's {cluster_cpus:g} CPUs; lower it"
    precomputed = cfg.search.cost_aware and space.l1.values is not None and space.phase1_lr.values is not None
    running = min(cfg.search.max_concurrent, int(cluster_cpus // sc.trial_cpus))
    if not precomputed and running * sc.trial_cpus + phase1 > cluster_cpus:
        return (f"scaling.trial_cpus: {running} trial(s) x {sc.trial_cpus:g} CPUs leave less than the {phase1:g} "
                f"CPUs phase 1 needs on this {cluster_cpus:g}-CPU cluster, and phase 1 runs inside trials here; give "
                f"search.space.l1 and search.space.phase1_lr as lists (phase 1 is then precomputed), or lower "
                f"scaling.trial_cpus or search.max_concurrent")
    return None


def run_search_job(cfg: SearchJobConfig, resume: bool = False) -> dict:
    """Run the whole search (all models); returns a summary with champions and report-split metrics."""
    import ray

    cfg = dataclasses.replace(cfg, task=with_absolute_paths(cfg.task))  # trials run in other directories
    check_inputs(cfg)
    started = time.time()
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    storage = Path(cfg.storage_path or tracking.lofit_home() / "ray_results").expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")  # a cluster we start: its size is fixed
    if local:
        # Ray runs its workers at nice 15 by default. Next to any other busy process, one of a trial's torch
        # threads then gets a few percent of a core, and every parallel op waits for it: trials ran 7x slower
        # beside a 1-core load. At nice 0 they share the cores fairly.
        os.environ.setdefault("RAY_worker_niceness", "0")
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                                           "LOFIT_HOME": str(tracking.lofit_home()),
                                           **({} if cfg.scaling.use_gpu else {"DS_ACCELERATOR": "cpu"})}})
    problem = check_resources(cfg, ray.cluster_resources().get("CPU", 0))
    if problem and local:
        raise ConfigError(problem)
    if problem:  # an autoscaling cluster may still grow to fit
        print(f"[lofit-ray] warning: {problem}", flush=True)
    experiment_id = tracking.ensure_experiment(cfg.mlflow.experiment, uri, cfg.mlflow.artifact_root)
    state_path = _state_file(storage, cfg)
    state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
    if not state.get("parent_run_id"):
        state["parent_run_id"] = tracking.start_run(
            uri, experiment_id, cfg.name, params=to_dict(cfg), tags={tracking.KIND_TAG: "search"})
        state_path.write_text(json.dumps(state))
    parent = state["parent_run_id"]
    if resume:  # runs a killed driver left open: closed now; their trials run again
        closed = tracking.close_dangling_runs(uri, parent, reason="the driver stopped; the trial runs again (--resume)")
        if closed:
            print(f"[lofit-ray] closed {len(closed)} run(s) the stopped driver left open", flush=True)
    print(f"[lofit-ray] MLflow: {uri} (experiment '{cfg.mlflow.experiment}', parent run {parent})", flush=True)
    claims_name = f"lofit-phase1-claims-{parent}"
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node, which the search cannot lose and go on: a worker node may die mid-search
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    claims = ray.remote(num_cpus=0)(Phase1Claims).options(name=claims_name, get_if_exists=True,
                                                          scheduling_strategy=here).remote()
    ctx = {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
           "phase1_claims": claims_name, "driver_pgid": os.getpgid(0),
           "storage_path": str(storage), "run_config": to_dict(cfg)}
    summary = {"name": cfg.name, "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
               "models": {}}
    try:
        p1_start = time.time()
        if cfg.search.cost_aware and not state.get("precomputed"):
            precompute_phase1(cfg, ctx)
            state["precomputed"] = True
            state_path.write_text(json.dumps(state))
        summary["precompute_s"] = time.time() - p1_start
        for model in cfg.models:
            summary["models"][model] = _search_one_model(cfg, model, ctx, storage, resume)
        tracking.end_run(uri, parent)
    except BaseException as exc:
        tracking.close_dangling_runs(uri, parent, reason=f"search stopped: {type(exc).__name__}")
        tracking.end_run(uri, parent, "FAILED", reason=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        ray.kill(claims)
    summary["wall_s"] = round(time.time() - started, 1)
    return summary


def _search_one_model(cfg: SearchJobConfig, model: str, ctx: dict, storage: Path, resume: bool) -> dict:
    from ray import tune

    uri = ctx["tracking_uri"]
    metric = cfg.search.metric
    name = tracking.registered_name(model, cfg.task.name)
    select_fp = selection_fingerprint(get_splits(task_spec(cfg, model))[1].select, cfg.search.metric)
    trial_ctx = {**ctx, "model": model, "registered_name": name, "select_fingerprint": select_fp}
    # ctx goes in through the object store, not the param space: Tune would print it with every trial
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=trial_ctx),
                                    {"cpu": cfg.scaling.trial_cpus, **({"gpu": 1} if cfg.scaling.use_gpu else {})})
    run_name = f"{cfg.name}-{spec_slug(model)}"
    study_url, study_name = study_storage(cfg), f"{run_name}-{ctx['parent_run_id'][:8]}"
    if not (resume and tune.Tuner.can_restore(str(storage / run_name))):
        print(f"[lofit-ray] Optuna study '{study_name}' in {study_url} (optuna-dashboard {study_url})", flush=True)
    results = run_on_ray(trainable, cfg.search.space.searched(), cfg.search, name=run_name, storage_path=storage,
                         max_epochs=cfg.phase2.epochs, max_concurrent=cfg.search.max_concurrent,
                         study_name=study_name, study_storage=study_url, reuse_actors=cfg.search.cost_aware,
                         callbacks=[_close_stopped_trials(uri, cfg.phase2.epochs)], resume=resume)
    tracking.close_dangling_runs(uri, ctx["parent_run_id"], reason="still running when the search ended")
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"trial_id": m.get("trial_id"), "config": {k: r.config.get(k) for k in SEARCHED},
                       "sel_metric": m.get("sel_metric"), "epochs": m.get("epoch"), "mlflow_run_id": m.get("mlflow_run_id"),
                       "error": str(r.error)[:300] if r.error else None,
                       **{k: m.get(k) for k in ("phase1_s", "phase2_s", "eval_s", "total_s", "memo_hit")}})
    out = {"registered_model": name, "metric": metric, "trials": trials, "study": study_name,
           "study_storage": study_url, "data": data_note(cfg, model)}
    log_study_plots(uri, ctx["parent_run_id"], study_url, study_name)
    champion = tracking.best_version(uri, name, tag="sel_metric", select_fingerprint=select_fp)
    if champion is None:
        out["error"] = "no trial finished; see the failed runs in MLflow"
        return out
    version, run_id = champion
    tracking.set_champion(uri, name, version)
    out.update(champion_version=version, champion_run_id=run_id)
    from .report import report_text, score_report

    out["report"] = {**score_report(cfg, model, uri, name, run_id, ctx["parent_run_id"]), "data": out["data"]}
    out["report_text"] = report_text(model, name, version, out["report"])
    print(f"[lofit-ray] {model}: champion {name} v{version} scored on the report split (the table follows at the "
          f"end)", flush=True)
    return out


def study_storage(cfg: SearchJobConfig) -> str:
    """The Optuna storage URL of the search's studies (one study per model, named after the MLflow parent run)."""
    if cfg.search.study_storage:
        return cfg.search.study_storage
    tracking.lofit_home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{tracking.lofit_home() / 'optuna.db'}"


def log_study_plots(uri: str, parent: str, study_url: str, study_name: str) -> list[str]:
    """optuna/<study>_history.png and _importances.png on the parent run: the selection metric per trial with
    the best so far, and which searched values mattered (needs two finished trials that differ)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name=study_name, storage=study_url)
    logged = []
    with tempfile.TemporaryDirectory(prefix="lofit-study-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # optuna's matplotlib plots
        for kind, plot in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances)):
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as exc:  # too few finished trials, or none that differ
                print(f"[lofit-ray] no {kind} plot for study {study_name}: {exc}", flush=True)
                continue
            fig = ax.figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            path = Path(tmp) / f"{study_name}_{kind}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            tracking.log_file(uri, parent, path, "optuna")
            logged.append(path.name)
    return logged


def _close_stopped_trials(uri: str, epochs: int):
    """A Tune callback that closes a trial's MLflow run the moment Tune stops it (ASHA), with the metrics it
    had, marked as an early stop: otherwise the run would show RUNNING until the whole search ends."""
    from ray.tune import Callback

    class CloseStoppedTrials(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if result.get("mlflow_run_id") and result.get("epoch", epochs) < epochs:
                timing = {k: result[k] for k in ("phase1_s", "phase2_s", "eval_s", "total_s", "memo_hit")
                          if k in result}
                tracking.close_stopped_run(uri, result["mlflow_run_id"], timing, result["epoch"],
                                           reason=f"stopped early by ASHA after epoch {result['epoch']} of {epochs}")

    return CloseStoppedTrials()
