"""Task data through Hugging Face `datasets`: local files of every kind, save_to_disk folders, a local copy of
a hub repository, the paper's TruthfulQA fold built from the hub's schema, `lofit-ray data fetch` over HTTP
on loopback, and the error a machine with no data and no network gets."""
from __future__ import annotations

import csv
import dataclasses
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import skip_or_fail

from lofit_ray.config import ConfigError, TaskConfig
from lofit_ray.tasks import TaskDataError, get_task
from lofit_ray.tasks.fetch import PAPER_FILES, fetch_paper_data
from lofit_ray.tasks.truthfulqa import hub_folds

import datasets  # a core dependency (tasks/source.py): missing, it must fail, not skip

REPO = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "cache"))


def tqa_rows(n: int) -> list[dict]:
    """TruthfulQA rows in the fold CSVs' schema; answers such as "None" and "NA" must stay text."""
    return [{"Type": "Adversarial", "Category": "Misc", "Question": f"Question {i}?", "Best Answer": f"Best {i}",
             "Correct Answers": f"Best {i}; None", "Incorrect Answers": f"NA; Wrong {i}", "Source": "s"}
            for i in range(n)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def mquake_cases(n: int) -> list[dict]:
    return [{"case_id": i, "requested_rewrite": [{"prompt": "The capital of {} is", "subject": f"Land{i}",
                                                  "target_new": {"str": f"City{i}"}}],
             "questions": [f"What is the capital of Land{i}?"], "new_answer": f"City{i}",
             "new_answer_alias": [f"C{i}"]} for i in range(n)]


def clutrr_records(n: int) -> list[dict]:
    return [{"id": str(i), "clean_story": f"[Ann{i}] has a son [Bob{i}].", "query": f"('Ann{i}', 'Bob{i}')",
             "target_text": "son", "task_name": "task_1.2"} for i in range(n)]


def as_dicts(items) -> list[dict]:
    out = [dataclasses.asdict(x) for x in items]
    for d in out:
        d.get("meta", {}).pop("row", None)
    return out


def test_every_local_file_kind_and_save_to_disk_folders_give_the_same_items(tmp_path):
    rows = tqa_rows(6)
    csv_path = write_csv(tmp_path / "tqa.csv", rows)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "tqa.parquet")
    (tmp_path / "tqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tqa.json").write_text(json.dumps(rows))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "val": datasets.Dataset.from_list(rows[:2])}).save_to_disk(tmp_path / "fold.hf")
    task = get_task("truthfulqa")
    want_train, want_eval = as_dicts(task.train_examples(csv_path)), as_dicts(task.eval_items(csv_path))
    assert len(want_train) == 6 and want_eval[0]["choices"] == [" Best 0.", " None.", " NA.", " Wrong 0."]
    for path in (tmp_path / "tqa.parquet", tmp_path / "tqa.jsonl", tmp_path / "tqa.json", tmp_path / "fold.hf" / "train"):
        assert as_dicts(task.train_examples(path)) == want_train, path
        assert as_dicts(task.eval_items(path)) == want_eval, path
    from_folder = get_task("truthfulqa", source=str(tmp_path / "fold.hf"))
    assert as_dicts(from_folder.train_examples()) == want_train  # split names pick the folder's splits
    assert as_dicts(from_folder.eval_items()) == want_eval[:2]
    with pytest.raises(TaskDataError, match=r"holds the splits \['train', 'val'\]"):
        get_task("truthfulqa", source=str(tmp_path / "fold.hf")).eval_items("test")


def test_generation_tasks_read_parquet_and_save_to_disk_like_their_json(tmp_path):
    cases, records = mquake_cases(4), clutrr_records(5)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    datasets.Dataset.from_list(cases).to_parquet(tmp_path / "m.parquet")
    (tmp_path / "c.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "c.hf")
    mquake, clutrr = get_task("mquake"), get_task("clutrr")
    want = as_dicts(mquake.eval_items(tmp_path / "m.jsonl"))
    assert want[1]["prompt"] == "Q: Imagine that The capital of Land1 is City1. What is the capital of Land1? A:"
    assert want[1]["answers"] == ["City1", "C1"]
    assert as_dicts(mquake.eval_items(tmp_path / "m.parquet")) == want
    assert as_dicts(clutrr.train_examples(tmp_path / "c.hf")) == as_dicts(clutrr.train_examples(tmp_path / "c.json"))
    assert "how is Bob2 related to Ann2?" in clutrr.eval_items(tmp_path / "c.hf")[2].prompt


def test_the_shared_splits_read_through_datasets_as_the_paper_counts_them():
    """The paper's files (../shared/data) through `datasets`: the counts, and text kept as text."""
    tqa = get_task("truthfulqa")
    if not tqa.resolve("val").is_file():
        skip_or_fail(f"the shared task data is not on this machine ({tqa.resolve('val')} is missing)")
    assert (len(tqa.train_examples()), len(tqa.eval_items())) == (326, 82)
    assert (len(get_task("mquake").eval_items()), len(get_task("clutrr").eval_items())) == (95, 450)
    assert all(isinstance(c, str) for item in tqa.eval_items() for c in item.choices)


def hub_generation(n: int) -> list[dict]:
    return [{"type": "Adversarial", "category": "Misc", "question": f"Question {i}?", "best_answer": f"Best {i}",
             "correct_answers": [f"Best {i}", f"Also {i}"], "incorrect_answers": [f"Wrong {i}"], "source": "s"}
            for i in range(n)]


def test_hub_fold_procedure_on_local_data_in_the_hubs_schema():
    """ITI's validate_2fold: questions in the multiple_choice order, two contiguous folds, and one seeded
    NumPy stream drawing 80% of the other fold as train (in drawn order), the rest val (in question order)."""
    import numpy as np

    generation = hub_generation(817)
    order = [r["question"] for r in generation][::-1]  # the mc config orders the questions its own way
    folds = hub_folds(generation, order)
    # fold 0 draws int(408 * 0.8) of questions 409-816; fold 1 then int(409 * 0.8) of questions 0-408
    assert [(len(f["train"]), len(f["val"]), len(f["test"])) for f in folds] == [(326, 82, 409), (327, 82, 408)]
    assert folds[0]["test"][0]["Question"] == "Question 816?"  # test = the first fold of the mc order
    for fold in folds:
        questions = [r["Question"] for split in ("train", "val", "test") for r in fold[split]]
        assert sorted(questions) == sorted(order) and len(set(questions)) == 817
        val = [order.index(r["Question"]) for r in fold["val"]]
        assert val == sorted(val)
    rng = np.random.RandomState(42)  # the stream np.random.seed(42) starts; fold 1 draws after fold 0
    drawn0 = rng.choice(np.arange(409, 817), size=326, replace=False)
    drawn1 = rng.choice(np.arange(0, 409), size=327, replace=False)
    assert [order.index(r["Question"]) for r in folds[0]["train"]] == drawn0.tolist()
    assert [order.index(r["Question"]) for r in folds[1]["train"]] == drawn1.tolist()
    assert folds[0]["train"][0]["Correct Answers"] == f"{folds[0]['train'][0]['Best Answer']}; " \
                                                      f"{folds[0]['train'][0]['Best Answer'].replace('Best', 'Also')}"
    assert hub_folds(generation, order) == folds  # seeded: the same folds every time
    with pytest.raises(TaskDataError, match="different questions"):
        hub_folds(generation, order[:-1])


def write_hub_repo(root: Path, n: int) -> Path:
    """A local copy of the hub repository truthfulqa/truthful_qa: one parquet per config, a README with
    the configs, as `git clone https://huggingface.co/datasets/truthfulqa/truthful_qa` gives."""
    repo = root / "truthful_qa"
    generation = hub_generation(n)
    mc = [{"question": r["question"], "mc1_targets": {"choices": [r["best_answer"] + ".", "Wrong."], "labels": [1, 0]},
           "mc2_targets": {"choices": [r["best_answer"] + ".", "Wrong."], "labels": [1, 0]}}
          for r in generation[::-1]]
    for config, rows in (("generation", generation), ("multiple_choice", mc)):
        (repo / config).mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(repo / config / "validation-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: validation\n    path: {c}/validation-*\n"
        for c in ("generation", "multiple_choice")) + "---\n")
    return repo


def test_a_local_copy_of_the_hub_repository_builds_the_fold_as_task_source(tmp_path):
    repo = write_hub_repo(tmp_path, 40)
    task = get_task("truthfulqa", source=str(repo))
    train, val, test = task.train_examples(), task.eval_items("val"), task.eval_items("test")
    assert (len(train), len(val), len(test)) == (16, 4, 20)
    order = [f"Question {i}?" for i in range(40)][::-1]
    assert {q.question for q in test} == set(order[:20])
    assert not {p.prompt for p in train} & {f"Q: {q.question} A:" for q in val + test}
    i = val[0].question.split()[1].rstrip("?")
    assert val[0].choices == [f" Best {i}.", f" Also {i}.", f" Wrong {i}."] and val[0].labels == [1, 1, 0]
    fold1 = get_task("truthfulqa", fold=1, source=str(repo)).eval_items("test")
    assert {q.question for q in fold1} == set(order[20:])


def test_the_multiple_choice_schema_reads_as_mc_items(tmp_path):
    repo = write_hub_repo(tmp_path, 3)
    from lofit_ray.tasks.source import read_records
    from lofit_ray.tasks.truthfulqa import rows_from_records

    rows = rows_from_records(read_records(f"{repo}:multiple_choice", "validation"), "mc")
    assert rows[0] == {"question": "Question 2?", "best": "Best 2", "correct": ["Best 2"], "incorrect": ["Wrong"]}


def test_no_data_and_no_network_names_the_three_ways(tmp_path):
    """A hub id on a machine without the hub (HF_HUB_OFFLINE=1 here, so the test needs no network to fail)."""
    code = ("from lofit_ray.tasks import get_task\n"
            "get_task('truthfulqa', source='truthfulqa/truthful_qa').eval_items()\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LOFIT_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "TaskDataError" in message and "cannot read it from the Hugging Face hub" in message
    assert "lofit-ray data fetch" in message and "save_to_disk" in message and "hub dataset id" in message
    empty = get_task("mquake", data_dir=tmp_path / "nothing")
    with pytest.raises(TaskDataError, match="lofit-ray data fetch"):
        empty.eval_items()


def test_task_source_is_checked_in_the_config(tmp_path):
    assert TaskConfig(source="truthfulqa/truthful_qa").source == "truthfulqa/truthful_qa"
    assert TaskConfig(source=str(tmp_path)).source == str(tmp_path)
    with pytest.raises(ConfigError, match="task.source: .*neither an existing save_to_disk folder nor a hub"):
        TaskConfig(source=str(tmp_path / "missing.hf"))
    with pytest.raises(ConfigError, match="task.source: the jsonl task reads the files"):
        TaskConfig(name="jsonl", source="truthfulqa/truthful_qa")


@pytest.fixture
def paper_repo_server(tmp_path):
    """The paper repository's dataset/ folder (small synthetic files, its layout) served on loopback."""
    root = tmp_path / "lo-fit" / "dataset"
    for remote in PAPER_FILES:
        path = root / remote
        path.parent.mkdir(parents=True, exist_ok=True)
        if remote.endswith(".csv"):
            write_csv(path, tqa_rows(5))
        elif remote.endswith(".jsonl"):
            path.write_text("".join(json.dumps(c) + "\n" for c in mquake_cases(3)))
        else:
            path.write_text(json.dumps(clutrr_records(4)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_data_fetch_puts_all_three_tasks_in_the_data_dir_in_one_step(tmp_path, paper_repo_server):
    root, url = paper_repo_server
    dest = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "lofit_ray.cli", "data", "fetch", "--to", str(dest),
                           "--base-url", url], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LOFIT_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(PAPER_FILES.values())
    assert len(get_task("truthfulqa", data_dir=dest).eval_items()) == 5
    assert len(get_task("mquake", data_dir=dest).train_examples()) == 3
    assert len(get_task("clutrr", data_dir=dest).eval_items("test")) == 4
    (root / "clutrr" / "val.json").write_text("[{\"broken\": ")  # a second fetch keeps what is there
    assert fetch_paper_data(dest, base_url=url, log=lambda *_: None) == []
    with pytest.raises(TaskDataError, match=r"val\.json\.part\.json: not valid UTF-8 JSON"):
        fetch_paper_data(dest, base_url=url, force=True, log=lambda *_: None)
    assert len(get_task("clutrr", data_dir=dest).eval_items()) == 4  # the broken download replaced nothing
    assert not list(dest.rglob("*.part*"))


def test_data_fetch_without_a_network_names_the_three_ways(tmp_path):
    with pytest.raises(TaskDataError, match=r"could not download .* three ways.*lofit-ray data fetch"):
        fetch_paper_data(tmp_path, base_url="http://127.0.0.1:9/", timeout=5, log=lambda *_: None)
