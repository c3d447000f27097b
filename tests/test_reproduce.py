"""jobs/reproduce.py (lofit_ray.experiments): the tiny end-to-end run (every method x task x K x seed), its
record, table, MLflow runs and --resume; ReproduceConfig validation; configs/llama2_7b.yaml against the search
schema."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lofit_ray import experiments
from lofit_ray.config import ConfigError, ReproduceConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "jobs" / "reproduce.py"
TINY = REPO / "configs" / "reproduce_tiny.yaml"
METHODS = ("zero_shot", "iti", "random_heads", "transfer_heads", "lofit", "lora")
TASKS = ("truthfulqa", "mquake")
KS = (1, 2)  # tiny-llama has 16 heads: 3% -> 1 (at least 1), 10% -> 2
SEEDS = (0,)
HEAD_DIM = 16


def expected_ids() -> set[str]:
    ids = set()
    for task in TASKS:
        ids.add(f"tiny-llama|{task}|zero_shot|k=-|seed=-")
        for seed in SEEDS:
            ids.add(f"tiny-llama|{task}|lora|k=-|seed={seed}")
            for k in KS:
                for method in ("iti", "random_heads", "transfer_heads", "lofit"):
                    ids.add(f"tiny-llama|{task}|{method}|k={k}|seed={seed}")
    return ids


def run_job(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--out-dir", str(out),
           "--tracking-uri", f"sqlite:///{out}/mlflow.db", *extra]
    return subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def mlflow_runs(out: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("lofit-reproduce-tiny")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    start = time.time()
    proc = run_job(out)
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, seconds, proc


@pytest.mark.slow
def test_every_cell_recorded_with_metrics(tiny_run):
    out, seconds, _ = tiny_run
    doc = json.loads((out / "reproduce.json").read_text())
    ids = [c["id"] for c in doc["cells"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == expected_ids()
    assert not doc["failed"] and doc["finished"]
    for c in doc["cells"]:
        names = ("mc1", "mc2") if c["task"] == "truthfulqa" else ("em", "em_lenient")
        assert set(c["metrics"]) == set(names), c["id"]
        assert all(0.0 <= c["metrics"][n] <= 1.0 for n in names), c
        assert c["n"] == 4 and c["split"] == "val"
        assert c["wall_seconds"] >= 0 and c["mlflow_run_id"]
        # the per-item report scores are kept beside the record, and give each metric its interval
        rows = [json.loads(line) for line in (out / c["items"]).read_text().splitlines()]
        assert len(rows) == 4 and set(rows[0]) == {"id", *names, *(["answer_logprob"] if "em" in names else [])}
        for n in names:
            assert sum(r[n] for r in rows) / 4 == pytest.approx(c["metrics"][n])
            assert c["intervals"][f"{n}_ci_low"] <= c["metrics"][n] <= c["intervals"][f"{n}_ci_high"]
        if c["method"] == "zero_shot":
            assert c["trainable_params"] == 0
            continue
        # every other cell trains the setting its method's search chose, and names that search's best score
        found = doc["searches"][f"tiny-llama|{c['task']}|{c['method']}|k={'-' if c['k'] is None else c['k']}"]
        assert c["hparams"] == found["chosen"] and c["selection"]["score"] == found["score"]
        assert c["search_seconds"] == found["seconds"] > 0
        if c["method"] == "lora":
            assert c["trainable_params"] > 0 and 5e-4 <= c["hparams"]["lr"] <= 2e-3
            assert c["hparams"]["rank"] in (2, 4) and c["hparams"]["epochs"] in (1, 2)
        else:
            assert c["trainable_params"] == c["k"] * HEAD_DIM
            assert len(c["heads"]) == c["k"]
        if c["method"] in ("lofit", "random_heads", "transfer_heads"):
            assert 1e-2 <= c["hparams"]["phase2_lr"] <= 3e-2 and c["hparams"]["epochs"] in (1, 2)
        if c["method"] == "lofit":
            assert c["hparams"]["phase1_lr"] == 1e-2 and c["hparams"]["l1"] in (1e-3, 1e-2)
            ranking = json.loads((out / c["ranking_file"]).read_text())["head_set"]
            assert [h[:2] for h in ranking["ranking"][:c["k"]]] == c["heads"]  # the top K of its phase-1 ranking
        if c["method"] == "iti":
            assert 1.0 <= c["hparams"]["alpha"] <= 5.0 and c["n_statements"] > 0
    by_id = {c["id"]: c for c in doc["cells"]}
    # transfer_heads trains on the heads LoFiT's phase 1 chose for the other task, at the same K and seed
    for task, source in (("truthfulqa", "mquake"), ("mquake", "truthfulqa")):
        assert doc["transfer"][task] == source
        assert by_id[f"tiny-llama|{task}|transfer_heads|k=2|seed=0"]["heads"] == \
            by_id[f"tiny-llama|{source}|lofit|k=2|seed=0"]["heads"]
        assert by_id[f"tiny-llama|{task}|transfer_heads|k=2|seed=0"]["heads_from"] == source
    # every method x K got a search of the same size, and the chosen setting is its best complete trial
    assert len(doc["searches"]) == len(TASKS) * (1 + 4 * len(KS))
    for sid, found in doc["searches"].items():
        counted = [t for t in found["trials"] if t["state"] in ("complete", "pruned")]
        assert len(counted) == 2, sid
        best = max((t for t in found["trials"] if t["state"] == "complete"), key=lambda t: (t["value"], -t["number"]))
        assert found["score"] == best["value"] and found["best_trial"] == best["number"]
        assert {k: v for k, v in found["chosen"].items() if k != "epochs"} == best["params"]
        if "|iti|" not in sid:  # trained methods: the best epoch on the selection split is the epoch count
            assert found["chosen"]["epochs"] == 1 + best["scores"].index(max(best["scores"]))
        assert (out / found["journal"]).is_file()
    # the carve and the hardware are stated
    for task in TASKS:
        split = doc["splits"][task]
        assert split["carve"]["fraction"] == 0.2 and split["carve"]["seed"] == 0
        assert split["n_train"] == 8 and split["n_select"] == 4 and split["n_report"] == 4
    assert doc["hardware"]["torch_threads"] == 1 and doc["hardware"]["device"] == "cpu"
    assert doc["models"]["tiny-llama"]["k_values"] == list(KS)
    print(f"tiny reproduce run: {seconds:.0f}s")


@pytest.mark.slow
def test_markdown_table(tiny_run):
    out, _, _ = tiny_run
    text = (out / "reproduce.md").read_text()
    assert "Hardware: CPU" in text and "torch threads 1" in text and "Date:" in text
    assert "20% carve of 'train' (carve_seed 0)" in text
    for task in TASKS:
        section = text.split(f"## {task}")[1].split("## ")[0]
        assert ("| MC1 | MC2 |" if task == "truthfulqa" else "| EM | EM (lenient) |") in section
        rows = [line for line in section.splitlines() if line.startswith("| tiny-llama |")]
        methods = [row.split("|")[2].strip() for row in rows]
        for method in METHODS:
            assert method in methods, (task, method)
        # one row per method x K (zero_shot and lora have no K)
        assert len(rows) == 2 + 4 * len(KS)
    # LoFiT minus each baseline: one row per task x K, each delta recomputed here from the record
    by_id = {c["id"]: c for c in json.loads((out / "reproduce.json").read_text())["cells"]}
    section = text.split("## LoFiT minus each baseline")[1]
    rows = [[x.strip() for x in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| tiny-llama |")]
    assert len(rows) == len(TASKS) * len(KS)
    from lofit_ray.evidence import compare_rows, read_rows, verdict

    ahead = 0
    for model, task, k, _, *deltas in rows:
        metric = "mc1" if task == "truthfulqa" else "em"
        lofit = by_id[f"{model}|{task}|lofit|k={k}|seed=0"]["metrics"][metric]
        for method, delta in zip(("zero_shot", "iti", "random_heads", "transfer_heads", "lora"), deltas):
            other = by_id[f"{model}|{task}|{method}|" + ("k=-|seed=-" if method == "zero_shot" else
                                                         "k=-|seed=0" if method == "lora" else f"k={k}|seed=0")]
            assert float(delta.split(" / ")[0].split(" (p=")[0]) == pytest.approx(lofit - other["metrics"][metric],
                                                                                 abs=6e-4)
            assert "(p=" in delta  # paired over the items the record keeps
            paired = compare_rows(read_rows(out / by_id[f"{model}|{task}|lofit|k={k}|seed=0"]["items"]),
                                  read_rows(out / other["items"]))
            ahead += verdict(paired[metric]) == "ahead"
    tally = section.split("ahead / tied / behind: ")[1].split("\n")[0]
    counts = [tuple(map(int, part.split()[-5::2])) for part in tally.rstrip(".").split("; ")]
    assert all(sum(c) == len(rows) for c in counts) and sum(c[0] for c in counts) == ahead


@pytest.mark.slow
def test_mlflow_parent_and_nested_runs(tiny_run):
    out, _, _ = tiny_run
    client, runs = mlflow_runs(out)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["lofit.kind"] == "reproduce"
    parent = parents[0].info.run_id
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in runs if r is not parents[0])
    cells = [r for r in runs if r.data.tags.get("lofit.kind") == "reproduce-cell"]
    assert len(cells) == len(expected_ids())
    # each search is a run too: its chosen setting, a score per trial and the trials as a table
    doc = json.loads((out / "reproduce.json").read_text())
    searches = {r.data.tags["lofit.search"]: r for r in runs if r.data.tags.get("lofit.kind") == "reproduce-search"}
    assert set(searches) == set(doc["searches"]) and len(runs) == 1 + len(cells) + len(searches)
    for sid, r in searches.items():
        found = doc["searches"][sid]
        assert r.data.metrics["sel_score"] == pytest.approx(found["score"])
        assert {k[len("chosen."):] for k in r.data.params if k.startswith("chosen.")} == set(found["chosen"])
        assert "trials.table.json" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {r.data.tags["lofit.cell"] for r in cells} == expected_ids()
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in cells:
        p, m = r.data.params, r.data.metrics
        assert {"model", "task", "method", "k", "seed"} <= set(p)
        assert "trainable_parameters" in m and "wall_seconds" in m
        assert ("mc1" in m and "mc2" in m) if p["task"] == "truthfulqa" else ("em" in m and "em_lenient" in m)
        if p["method"] == "lofit":
            assert "chosen.phase2_lr" in p
            artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
            assert {"adapter", "heads"} <= artifacts
            assert "heads/head_set.json" in {a.path for a in client.list_artifacts(r.info.run_id, "heads")}


@pytest.mark.slow
def test_resume_skips_done_cells(tiny_run):
    out, first_seconds, _ = tiny_run
    start = time.time()
    proc = run_job(out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 cells run, 20 already done" in proc.stdout
    assert "loaded tiny-llama" not in proc.stdout  # nothing to run: the model is not even loaded
    doc = json.loads((out / "reproduce.json").read_text())
    ids = [c["id"] for c in doc["cells"]]
    assert len(ids) == len(set(ids)) == len(expected_ids())
    _, runs = mlflow_runs(out)
    searches = json.loads((out / "reproduce.json").read_text())["searches"]
    assert len(runs) == 1 + len(expected_ids()) + len(searches)  # still one parent, no new nested runs
    # without --resume an existing record is never overwritten by accident
    proc = run_job(out)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    print(f"resume with nothing to do: {time.time() - start:.0f}s (first run {first_seconds:.0f}s)")


@pytest.mark.slow
def test_selectors_and_reft_added_to_a_finished_record_run_only_their_cells(tiny_run, tmp_path):
    """--resume with the selector methods and ReFT added: only their cells run (each searched like the others),
    the selectors' heads are the top K of their ranking, and the table pairs each with random heads."""
    import shutil

    from lofit_ray.evidence import compare_rows, read_rows
    from lofit_ray.heads import HeadSet

    out = tmp_path / "selectors"
    shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "mlartifacts"))
    added = ("gates_heads", "grad_heads", "grad_x_act_heads")
    proc = run_job(out, "--resume", "--set", f"methods=[random_heads, lofit, {', '.join(added)}, reft]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = len(TASKS) * len(KS) * len(SEEDS) * len(added) + len(TASKS) * len(SEEDS)
    assert f"{new} cells run, {len(TASKS) * len(KS) * len(SEEDS) * 2} already done" in proc.stdout
    doc = json.loads((out / "reproduce.json").read_text())
    selector_of = {"gates_heads": "gates", "grad_heads": "grad", "grad_x_act_heads": "grad_x_act"}
    cells = {c["id"]: c for c in doc["cells"]}
    for task in TASKS:
        for k in KS:
            for method in added:
                cell = cells[f"tiny-llama|{task}|{method}|k={k}|seed=0"]
                ranking = HeadSet(**json.loads((out / cell["ranking_file"]).read_text())["head_set"])
                assert ranking.method == selector_of[method] and ranking.hparams["selector"] == selector_of[method]
                assert [list(h) for h in ranking.top(k)] == [list(h) for h in cell["heads"]]
                assert doc["searches"][f"tiny-llama|{task}|{method}|k={k}"]["trials"]
    for task in TASKS:  # ReFT: one layer at rank 1, 2 x hidden + 1 parameters (tiny-llama: hidden 64)
        reft = cells[f"tiny-llama|{task}|reft|k=-|seed=0"]
        assert reft["trainable_params"] == 2 * 64 + 1 and set(reft["hparams"]) >= {"lr", "depth", "epochs"}
    text = (out / "reproduce.md").read_text()
    section = text.split("## mquake")[1].split("## ")[0]
    header = [x.strip() for x in section.splitlines()[2].split("|")]
    row = next([x.strip() for x in line.split("|")] for line in section.splitlines()
               if line.startswith("| tiny-llama | grad_heads | 1 |"))
    mine, theirs = cells["tiny-llama|mquake|grad_heads|k=1|seed=0"], cells["tiny-llama|mquake|random_heads|k=1|seed=0"]
    paired = compare_rows(read_rows(out / mine["items"]), read_rows(out / theirs["items"]))["em"]
    assert row[header.index("vs random heads")] == f"{paired['diff']:+.3f} (p={paired['p_value']:.2g})"
    # the selectors section: each selector's ranking time over l1's and its overlap with l1's heads
    section = text.split("## Selectors (phase 1)")[1].split("## ")[0]
    sel_rows = [[x.strip() for x in line.split("|")[1:-1]] for line in section.splitlines()
                if line.startswith("| tiny-llama |")]
    assert len(sel_rows) == len(TASKS) * len(KS) * (2 + len(added))  # l1, the added selectors, random
    for model, task, k, selector, seeds, seconds, ratio, overlap, layers in sel_rows:
        method = {"l1": "lofit", "random": "random_heads", **{v: m for m, v in selector_of.items()}}[selector]
        cell, l1 = cells[f"{model}|{task}|{method}|k={k}|seed=0"], cells[f"{model}|{task}|lofit|k={k}|seed=0"]
        mine, theirs = {tuple(h) for h in cell["heads"]}, {tuple(h) for h in l1["heads"]}
        assert float(overlap) == pytest.approx(len(mine & theirs) / len(mine | theirs), abs=5e-3)
        heads_layers = sorted(h[0] for h in cell["heads"])
        assert layers.startswith(f"{heads_layers[0]}-{heads_layers[-1]} (")
        if method == "random_heads":  # no ranking to time
            assert seconds == ratio == "-"
        else:
            assert float(ratio) == pytest.approx(cell["phase1_seconds"] / l1["phase1_seconds"], rel=1e-2, abs=1e-3)


def copy_record(src: Path, dst: Path) -> Path:
    """The committed part of a results dir (record + rankings), without its MLflow store."""
    import shutil

    dst.mkdir(parents=True)
    shutil.copy(src / "reproduce.json", dst / "reproduce.json")
    shutil.copytree(src / "heads", dst / "heads")
    return dst


def children(out: Path):
    client, runs = mlflow_runs(out)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == len(runs) - 1
    return client, parents[0], kids


@pytest.mark.slow
def test_record_backfills_a_new_mlflow_store(tiny_run, tmp_path):
    """A record carried to another store (another machine): --resume and --sync-mlflow log its cells there."""
    out, _, _ = tiny_run
    original = {c["id"]: c for c in json.loads((out / "reproduce.json").read_text())["cells"]}
    moved = copy_record(out, tmp_path / "moved")
    proc = run_job(moved, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 cells run, 20 already done" in proc.stdout and f"logged {len(original)} recorded cell" in proc.stdout
    client, parent, kids = children(moved)
    assert parent.info.status == "FINISHED" and parent.info.run_id != json.loads(
        (out / "reproduce.json").read_text())["parent_run_id"]
    assert {r.data.tags["lofit.cell"] for r in kids} == expected_ids()
    doc = json.loads((moved / "reproduce.json").read_text())
    assert {c["mlflow_run_id"] for c in doc["cells"]} == {r.info.run_id for r in kids}  # the record points here
    for r in kids:
        cell = original[r.data.tags["lofit.cell"]]
        assert r.data.tags["lofit.source"] == "record" and r.data.tags["lofit.recorded_run_id"] == cell["mlflow_run_id"]
        assert r.info.status == "FINISHED"
        for name, value in cell["metrics"].items():
            assert r.data.metrics[name] == pytest.approx(value)
        assert r.data.metrics["trainable_parameters"] == cell["trainable_params"]
        if cell["method"] == "lofit":
            assert r.data.params["chosen.phase2_lr"] == str(cell["hparams"]["phase2_lr"])
            path = client.download_artifacts(r.info.run_id, "heads/head_set.json", str(tmp_path))
            heads = json.loads(Path(path).read_text())
            assert [h[:2] for h in heads["ranking"][:heads["k"]]] == cell["heads"]
    # again: the store already holds every cell, nothing is logged twice
    proc = run_job(moved, "--sync-mlflow")
    assert proc.returncode == 0 and "logged" not in proc.stdout, proc.stdout + proc.stderr
    assert len(children(moved)[2]) == len(original)

    # --sync-mlflow alone on a partial record: a new parent closed as KILLED with the reason, no cell run
    partial = copy_record(out, tmp_path / "partial")
    doc = json.loads((partial / "reproduce.json").read_text())
    doc["cells"], doc["finished"] = doc["cells"][:5], None
    (partial / "reproduce.json").write_text(json.dumps(doc))
    proc = run_job(partial, "--sync-mlflow")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded tiny-llama" not in proc.stdout and "logged 5 recorded cell" in proc.stdout
    _, parent, kids = children(partial)
    assert len(kids) == 5 and parent.info.status == "KILLED"
    assert "partial" in parent.data.tags["lofit.failure_reason"]
    after = json.loads((partial / "reproduce.json").read_text())
    assert len(after["invocations"]) == len(doc["invocations"]) and after["finished"] is None
    # and without a record it says which file it needs
    proc = run_job(tmp_path / "nothing", "--sync-mlflow")
    assert proc.returncode == 2 and "reproduce.json does not exist" in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path):
    """SIGKILL the job right after its 6th cell is recorded (fault point reproduce.kill), then --resume:
    every cell exactly once, no run left RUNNING."""
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--out-dir", str(tmp_path),
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "LOFIT_FAULTS": "reproduce.kill@cells=6"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    record = tmp_path / "reproduce.json"
    done_before = len(json.loads(record.read_text())["cells"])
    assert done_before == 6
    resumed = run_job(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    doc = json.loads(record.read_text())
    ids = [c["id"] for c in doc["cells"]]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids()
    kept = len(doc["cells"]) - int(resumed.stdout.split(" cells run")[0].rsplit(" ", 1)[-1])
    assert kept >= done_before
    _, runs = mlflow_runs(tmp_path)
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1
    assert "RUNNING" not in {r.info.status for r in runs}
    finished = [r for r in runs if r.data.tags.get("lofit.kind") == "reproduce-cell" and r.info.status == "FINISHED"]
    assert len(finished) == len(expected_ids())


@pytest.mark.slow
def test_killed_search_resumes_with_its_finished_trials(tmp_path):
    """SIGKILL the job right after the first search's first trial (fault point reproduce.kill@trials=1): the
    Optuna journal keeps that trial, so --resume runs only the second one, and a new K searches afresh."""
    args = ("--set", "methods=[lofit]", "--set", "k_fractions=[0.07]")
    killed = subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY), "--out-dir", str(tmp_path),
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "LOFIT_FAULTS": "reproduce.kill@trials=1"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    sid = "tiny-llama|truthfulqa|lofit|k=1"
    assert f"search {sid} trial 0: complete" in killed.stdout
    first = killed.stdout.split(f"search {sid} trial 0: complete ")[1].split(" [")[0]
    proc = run_job(tmp_path, *args, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"search {sid} trial 0" not in proc.stdout and f"search {sid} trial 1" in proc.stdout
    doc = json.loads((tmp_path / "reproduce.json").read_text())
    trials = doc["searches"][sid]["trials"]
    assert [t["number"] for t in trials] == [0, 1]
    assert first.startswith(f"{trials[0]['value']:.4f}")  # the trial from before the kill, as it was
    assert {c["id"] for c in doc["cells"]} == {f"tiny-llama|{t}|lofit|k=1|seed=0" for t in TASKS}
    # a new K on --resume searches that K (the recorded searches and cells stay)
    proc = run_job(tmp_path, *args[:2], "--set", "k_fractions=[0.07,0.13]", "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"search {sid}:" not in proc.stdout and "search tiny-llama|truthfulqa|lofit|k=2:" in proc.stdout
    doc2 = json.loads((tmp_path / "reproduce.json").read_text())
    assert doc2["searches"][sid] == doc["searches"][sid] and len(doc2["cells"]) == 4
    # the record says how it was built up: three invocations, the last two --resume with their overrides
    assert [inv["resume"] for inv in doc2["invocations"]] == [False, True, True]
    assert "k_fractions=[0.07,0.13]" in doc2["invocations"][2]["set"]
    assert "Built over 3 invocations" in (tmp_path / "reproduce.md").read_text()


@pytest.mark.slow
def test_bad_config_field_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("lora: {lr:", "lora: {lrr:"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(bad), "--out-dir", str(tmp_path / "out")],
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "search.spaces.lora.lrr: unknown key" in proc.stderr
    assert not (tmp_path / "out" / "reproduce.json").exists()
    # a missing data file fails before any training or MLflow write, naming the split
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY), "--out-dir", str(tmp_path / "out"),
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                           "--set", f"tasks.mquake.report={tmp_path}/missing.jsonl"],
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("override, field", [
    ({"search.spaces.lofit.phase2_lrr": [1e-2]}, "search.spaces.lofit.phase2_lrr: unknown key"),
    ({"search.spaces.transfer_heads.phase2_lr": [-1]}, "search.spaces.transfer_heads.phase2_lr"),
    ({"search.spaces.iti.alpha": {"low": 5, "high": 1}}, "search.spaces.iti.alpha"),
    ({"search.spaces.lora.rank": [4.5]}, "search.spaces.lora.rank"),
    ({"search.spaces.gates_heads.l0": [-1e-3]}, "search.spaces.gates_heads.l0"),
    ({"search.spaces.reft.depth": [0.5, 1.5]}, "search.spaces.reft.depth"),
    ({"reft.depth": 2.0}, "reft.depth"),
    ({"phase1.selector": "norm"}, "phase1.selector"),
    ({"search.num_trials": -1}, "search.num_trials"),
    ({"tasks.mquake.select_fraction": 0}, "tasks.mquake.select_fraction: 0 leaves no selection split"),
    ({"tasks.mquake.select_fraction": 1.5}, "tasks.mquake.select_fraction"),
    ({"tasks.mquake.limit_train": "many"}, "tasks.mquake.limit_train"),
    ({"methods": ["lofit", "prompting"]}, "methods: 'prompting'"),
    ({"k_fractions": [0.0]}, "k_fractions[0]"),
    ({"seeds": [0, 0]}, "seeds: 0 is listed twice"),
    ({"transfer": {"truthfulqa": "truthfulqa"}}, "transfer.truthfulqa"),
    ({"tasks": {"truthfulqa": {}}}, "transfer_heads needs at least two tasks"),
    ({"tasks.squad": {}}, "tasks.squad: unknown task"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"device": "tpu"}, "device"),
    ({"grid": {"phase2_lr": [1e-2]}}, "grid: unknown key"),
    ({"tasks.mquake.name": "clutrr"}, "tasks.mquake.name"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, override, schema=ReproduceConfig)
    assert field in str(info.value)


def test_a_fixed_protocol_trains_at_the_config_values_without_a_search(tmp_path):
    """search.num_trials: 0 is a paper's fixed protocol: no selection carve (select_fraction 0 trains on all of
    train), no trials, every method at its config values with the lr schedule and clipping the config names."""
    fixed = ["--set", "search.num_trials=0", "--set", "methods=[zero_shot, random_heads, transfer_heads, lofit]",
             "--set", "k_fractions=[0.1]", "--set", "phase1.lr=0.02", "--set", "phase1.l1=0.002",
             "--set", "phase2.lr=0.03", "--set", "phase1.lr_schedule=linear", "--set", "phase1.max_grad_norm=1.0",
             "--set", "phase2.lr_schedule=linear"]
    no_carve = [a for t in TASKS for a in ("--set", f"tasks.{t}.select_fraction=0")]
    proc = run_job(tmp_path / "iti", *fixed, "--set", "methods=[iti]")  # nothing in the config to train ITI at
    assert proc.returncode == 2 and "iti has no iti.alpha" in proc.stderr, proc.stderr[-2000:]
    out = tmp_path / "fixed"
    proc = run_job(out, *fixed, *no_carve)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "reproduce.json").read_text())
    assert not doc.get("searches") and not (out / "searches").exists()
    for task in TASKS:
        assert doc["splits"][task]["n_select"] == 0 and doc["splits"][task]["n_train"] == 8
    cells = {c["id"]: c for c in doc["cells"]}
    assert len(cells) == 2 * (1 + 3)  # per task: zero-shot, and random, transfer and lofit at K=2
    for task in TASKS:
        lofit = cells[f"tiny-llama|{task}|lofit|k=2|seed=0"]
        assert lofit["hparams"] == {"phase1_lr": 0.02, "l1": 0.002, "phase2_lr": 0.03}
        assert cells[f"tiny-llama|{task}|random_heads|k=2|seed=0"]["hparams"] == {"phase2_lr": 0.03}
        ranking = json.loads((out / lofit["ranking_file"]).read_text())
        assert ranking["head_set"]["hparams"]["phase1"]["lr_schedule"] == "linear"
        assert ranking["head_set"]["hparams"]["phase1"]["max_grad_norm"] == 1.0
    table = (out / "reproduce.md").read_text()
    assert "No search (search.num_trials: 0)" in table and "lr linear, gradient norm clipped at 1" in table
    assert "no selection split (nothing is searched)" in table
    # the schedule is part of each cell's setting: another schedule re-runs every trained cell on --resume
    again = run_job(out, *fixed[:-2], *no_carve, "--resume")
    assert again.returncode == 0
    rerun = json.loads((out / "reproduce.json").read_text())["cells"]
    assert {c["id"] for c in rerun if c["finished_at"] != cells[c["id"]]["finished_at"]} == \
        {i for i in cells if "zero_shot" not in i}


def test_configs_load():
    cfg = load_config(REPO / "configs" / "reproduce.yaml", schema=ReproduceConfig)
    assert cfg.models == ["smollm2-135m", "gemma3-270m"]
    assert list(cfg.tasks) == ["truthfulqa", "mquake", "clutrr"]
    assert cfg.k_fractions == [0.03] and cfg.seeds == [0, 1, 2]
    assert set(cfg.methods) == set(METHODS)
    assert [cfg.transfer_source(t) for t in cfg.tasks] == ["mquake", "clutrr", "truthfulqa"]
    assert cfg.tasks["clutrr"].limit_train
    assert [t.name for t in cfg.tasks.values()] == list(cfg.tasks)  # the key names the task
    assert cfg.search.num_trials >= 4 and cfg.mlflow.experiment == "lofit-reproduce"
    paper = load_config(REPO / "configs" / "reproduce_paper_protocol.yaml", schema=ReproduceConfig)
    assert paper.search.num_trials == 0 and paper.tasks["truthfulqa"].select_fraction == 0
    assert paper.phase1.lr_schedule == paper.phase2.lr_schedule == "linear"
    for task, extra in (("mquake", {}), ("clutrr", {"limit_train": 300})):  # its other two records' overrides
        load_config(REPO / "configs" / "reproduce_paper_protocol.yaml",
                    {"tasks": {task: {"select_fraction": 0, **extra}}}, schema=ReproduceConfig)
    tiny = load_config(TINY, schema=ReproduceConfig)
    assert tiny.models == ["tiny-llama"] and list(tiny.tasks) == list(TASKS) and tiny.seeds == list(SEEDS)
    assert [tiny.transfer_source(t) for t in tiny.tasks] == ["mquake", "truthfulqa"]
    assert len(experiments.plan_cells(tiny, "tiny-llama", list(KS))) == len(expected_ids())
    # K: rounded half up, at least 1, never more than the model has
    assert experiments.k_values([0.03, 0.10], 16) == [1, 2]
    assert experiments.k_values([0.03, 0.10], 270) == [8, 27]  # SmolLM2-135M: 30 x 9 heads
    assert experiments.k_values([0.03, 0.10], 72) == [2, 7]  # Gemma-3-270M: 18 x 4 heads
    assert experiments.k_values([0.01, 0.02], 16) == [1]  # equal K values merge


def test_ray_job_default_out_dir(monkeypatch, tmp_path):
    """Under `ray job submit` the working dir is a temporary copy: results default to $LOFIT_HOME/reproduce."""
    local = REPO / "jobs" / "results"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert experiments.default_out_dir(local) == local
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("LOFIT_HOME", str(tmp_path))
    assert experiments.default_out_dir(local) == tmp_path.resolve() / "reproduce"


def test_llama2_7b_search_config():
    from lofit_ray.config import load_config

    cfg = load_config(REPO / "configs" / "llama2_7b.yaml")
    assert cfg.models == ["/path/to/llama-2-7b-hf"]
    assert cfg.dtype == "bfloat16"
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 1
    assert cfg.deepspeed.enabled and cfg.deepspeed.zero_stage in (2, 3)
    assert cfg.training.batch_size % cfg.scaling.num_workers == 0
    low, high = cfg.search.space.k.bounds()
    assert 0.03 * 1024 - 1 <= low and high <= 0.10 * 1024  # ~3-10% of 32 x 32 heads
    assert 1e-2 in cfg.search.space.phase2_lr.values and cfg.search.space.phase1_lr.values == [5e-3]


@pytest.mark.slow
def test_learning_curve_points_and_plot(tmp_path):
    """jobs/learning_curve.py: a reproduce record per training size (each method searched the same way), and
    a PNG + JSON whose points are the records' seed means with their item intervals."""
    script = REPO / "jobs" / "learning_curve.py"
    cmd = [sys.executable, str(script), "--config", str(TINY), "--model", "tiny-llama", "--sizes", "4", "8",
           "--methods", "zero_shot,random_heads,lofit", "--set", "k_fractions=[0.07]", "--out-dir", str(tmp_path),
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((tmp_path / "learning_curve.json").read_text())
    from lofit_ray.evidence import interval, read_rows

    for size in (4, 8):
        doc = json.loads((tmp_path / f"n{size}" / "reproduce.json").read_text())
        assert doc["splits"]["truthfulqa"]["n_train"] == size and list(doc["splits"]) == ["truthfulqa"]
        assert {c["method"] for c in doc["cells"]} == {"zero_shot", "random_heads", "lofit"}
        assert all(len(f["trials"]) == 2 for f in doc["searches"].values())
        for c in doc["cells"]:
            point = next(p for p in curve["points"]["mc2"] if p["n_train"] == size and p["method"] == c["method"])
            assert point["mean"] == pytest.approx(c["metrics"]["mc2"])
            ci = interval([r["mc2"] for r in read_rows(tmp_path / f"n{size}" / c["items"])])
            assert (point["ci_low"], point["ci_high"]) == pytest.approx((ci["ci_low"], ci["ci_high"]))
    # the splits every size is scored on are the same: only training differs
    docs = [json.loads((tmp_path / f"n{s}" / "reproduce.json").read_text())["splits"]["truthfulqa"] for s in (4, 8)]
    assert docs[0]["n_report"] == docs[1]["n_report"] and docs[0]["n_select"] == docs[1]["n_select"]


def test_the_committed_record_stays_done_under_the_shipped_config():
    """Every cell of jobs/results/reproduce_tuned was run under configs/reproduce.yaml: its setting hash must
    still match, or `--resume` would silently run hours of finished cells again (a config field added with
    a behaviour-preserving default, e.g. task.source, must not change the hash)."""
    from lofit_ray.experiments.cells import cell_setting

    record = Path(__file__).resolve().parents[1] / "jobs" / "results" / "reproduce_tuned" / "reproduce.json"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "reproduce.yaml", schema=ReproduceConfig)
    cells = json.loads(record.read_text())["cells"]
    changed = [c["id"] for c in cells
               if cell_setting(cfg, {k: c[k] for k in ("id", "model", "task", "method", "k", "seed")}) != c["setting"]]
    assert len(cells) >= 48 and changed == []
