"""Your own task in YAML (lofit_ray.tasks.generic): every source kind, the column mapping, templates, answer
extraction, the carves and their disjointness, truncation reporting, the entry point group, the bad-input
errors (exit 2 before Ray starts), and the study on a user task."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lofit_ray.config import ConfigError, TaskConfig
from lofit_ray.config.loading import build
from lofit_ray.split_specs import split_spec, splits_from_spec
from lofit_ray.tasks import GenerationItem, TaskDataError, make_task, match_item

REPO = Path(__file__).resolve().parents[1]
BBH = REPO.parent / "shared" / "data" / "examples" / "big-bench-hard"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "cache"))


def task(**fields) -> TaskConfig:
    return build(TaskConfig, {"name": "mine", **fields}, "task")


def mc_rows(n: int) -> list[dict]:
    """Multiple choice with one column per choice and an index label (a medical-exam-like schema)."""
    return [{"q": f"Question {i}?", "opa": f"a{i}", "opb": f"b{i}", "opc": f"c{i}", "cop": i % 3} for i in range(n)]


MC = dict(kind="mc", template="Q: {q}\nA:", columns={"choices": ["opa", "opb", "opc"], "label": "cop"})


def items_of(cfg):
    task_, splits = splits_from_spec(split_spec(cfg))
    return task_, splits


def as_dicts(items):
    from dataclasses import asdict

    return [asdict(x) for x in items]


def write_sources(tmp_path: Path, rows: list[dict]) -> dict[str, str]:
    """The same rows as every local source kind `datasets` reads."""
    import datasets
    import pandas as pd

    out = {}
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    out["csv"] = str(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["jsonl"] = str(tmp_path / "d.jsonl")
    (tmp_path / "list.json").write_text(json.dumps(rows))
    out["json"] = str(tmp_path / "list.json")
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    out["parquet"] = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one.hf"))
    out["save_to_disk"] = str(tmp_path / "one.hf")
    return out


def test_every_source_kind_gives_the_same_items(tmp_path):
    rows = mc_rows(20)
    (tmp_path / "nested.json").write_text(json.dumps({"canary": "x", "examples": rows}))
    results = {}
    for kind, path in write_sources(tmp_path, rows).items():
        results[kind] = as_dicts(items_of(task(source=path, **MC))[1].report)
    results["nested json"] = as_dicts(items_of(task(source=str(tmp_path / "nested.json"), records_key="examples",
                                                    **MC))[1].report)
    first = next(iter(results.values()))
    assert len(first) == 4  # 20% of 20, carved
    for kind, items in results.items():
        assert items == first, kind


def test_a_datasetdict_folder_uses_its_named_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(mc_rows(20)),
                          "validation": datasets.Dataset.from_list(mc_rows(26)[20:])}).save_to_disk(str(tmp_path / "dd"))
    _, splits = items_of(task(source=str(tmp_path / "dd"), report="validation", **MC))
    assert [x.question for x in splits.report] == [f"Q: Question {i}?\nA:" for i in range(20, 26)]
    assert splits.carve["n_train"] + splits.carve["n_select"] == 20


def test_column_mapping_choices_over_columns_with_an_index_label(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows(10)))
    t = make_task(task(source=str(tmp_path / "d.jsonl"), **MC))
    item = t.eval_items(str(tmp_path / "d.jsonl"))[4]
    assert item.choices == [" a4", " b4", " c4"] and item.labels == [0, 1, 0] and item.best == 1
    example = t.train_examples(str(tmp_path / "d.jsonl"))[4]
    assert (example.prompt, example.chosen, example.rejected) == ("Q: Question 4?\nA:", " b4", " a4")
    sft = make_task(task(source=str(tmp_path / "d.jsonl"), mc_training="sft", **MC))
    assert sft.objective == "sft" and sft.train_examples(str(tmp_path / "d.jsonl"))[4].completion == " b4"


def test_column_mapping_a_list_column_and_a_label_given_as_text(tmp_path):
    rows = [{"question": f"q{i}", "options": ["red", "green", "blue"], "answer": ["red", "green", "blue"][i % 3]}
            for i in range(6)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    t = make_task(task(source=str(tmp_path / "d.json"), kind="mc", columns={"prompt": "question", "choices": ["options"],
                                                                          "label": "answer"}, answer_prefix=""))
    items = t.eval_items(str(tmp_path / "d.json"))
    assert [x.best for x in items] == [0, 1, 2, 0, 1, 2] and items[2].choices == ["red", "green", "blue"]


def test_the_worked_example_reads_bbh_in_its_original_form():
    from lofit_ray.config import load_config

    cfg = load_config(REPO / "configs" / "bbh_sports.yaml")
    t, splits = items_of(cfg.task)
    assert (t.objective, t.eval_kind) == ("dpo", "mc")
    assert (len(splits.train), len(splits.select), len(splits.report)) == (160, 40, 50)
    assert splits.report[0].choices == [" yes", " no"]
    raw = json.loads((BBH / "sports_understanding.json").read_text())["examples"]
    targets = {f"Q: {r['input']}\nA:": r["target"] for r in raw}
    assert all(x.choices[x.best].strip() == targets[x.prefix] for x in splits.report)


def test_template_over_columns_and_a_missing_field_names_the_template(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "2+2", "label": "4"}) + "\n")
    good = make_task(task(source=str(tmp_path / "d.jsonl"), kind="generation", template="Compute {text} =",
                          columns={"answer": "label"}))
    assert good.eval_items(str(tmp_path / "d.jsonl"))[0].prompt == "Compute 2+2 ="
    bad = make_task(task(source=str(tmp_path / "d.jsonl"), kind="generation", template="Compute {txt} =",
                         columns={"answer": "label"}))
    with pytest.raises(TaskDataError, match=r"task.template: field \{txt\} is not a column.*\['label', 'text'\]"):
        bad.eval_items(str(tmp_path / "d.jsonl"))


def test_chat_template_wraps_the_prompt_and_a_tokenizer_without_one_is_an_error(tmp_path):
    from lofit_ray.models import load_tokenizer
    from lofit_ray.tasks.generic import GenericTask

    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "Capital of France?", "a": "Paris"}) + "\n")
    cfg = task(source=str(tmp_path / "d.jsonl"), kind="generation", template="{q}", columns={"answer": "a"},
               chat_template=True, answer_prefix="")
    prompt = make_task(cfg, model="smollm2-135m").eval_items(str(tmp_path / "d.jsonl"))[0].prompt
    assert "<|im_start|>user\nCapital of France?<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    plain = load_tokenizer("smollm2-135m")
    plain.chat_template = None
    with pytest.raises(TaskDataError, match="task.chat_template: .* has no chat template"):
        GenericTask(cfg, tokenizer=plain)


def test_answer_extraction_applies_to_the_output_and_the_reference(tmp_path):
    rows = [{"q": "Sum?", "sol": "3 + 4 = 7\n#### 7"}, {"q": "Sum2?", "sol": "no marker here"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = task(source=str(tmp_path / "d.jsonl"), kind="sft", template="{q}", columns={"completion": "sol"},
               answer_regex=r"####\s*(-?[\d,]+)", stops=[])
    item = make_task(cfg).eval_items(str(tmp_path / "d.jsonl"))[0]
    assert item.answers == ["7"] and item.reference == " 3 + 4 = 7\n#### 7"
    assert match_item("Let me add: 3 + 4 = 7\n#### 7 done", item) == (True, True)
    assert match_item("#### 8", item) == (False, False)
    assert match_item("7", item) == (False, False)  # no marker in the output: no answer
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(TaskDataError, match="task.answer_regex: .* finds nothing in the reference"):
        make_task(cfg).eval_items(str(tmp_path / "bad.jsonl"))
    plain = GenerationItem(prompt="", answers=["7"])
    assert match_item(" 7.\nmore", plain) == (False, True)


def test_the_carve_is_seeded_and_disjoint_and_duplicate_prompts_stay_together(tmp_path):
    rows = mc_rows(30) + [dict(r, opa="dup") for r in mc_rows(30)[:10]]  # 10 prompts appear twice
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = task(source=str(tmp_path / "d.jsonl"), **MC)
    _, a = items_of(cfg)
    _, b = items_of(cfg)
    assert as_dicts(a.report) == as_dicts(b.report)
    train = {ex.prompt for ex in a.train}
    select = {x.prefix for x in a.select}
    report = {x.prefix for x in a.report}
    assert not (train & select) and not (train & report) and not (select & report)
    assert len(train | select | report) == 30  # every distinct prompt lands somewhere
    _, other = items_of(task(source=str(tmp_path / "d.jsonl"), carve_seed=1, **MC))
    assert {x.prefix for x in other.report} != report


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_named_splits_sharing_prompts_stop_unless_on_overlap_drop(tmp_path):
    """A named selection file with 4 training and 3 report prompts: an error naming the count, both splits and
    the first three; with task.on_overlap: drop they leave the later split, counted, and the report says so."""
    rows = mc_rows(20)
    files = dict(source=_jsonl(tmp_path / "train.jsonl", rows[:14]), report=_jsonl(tmp_path / "report.jsonl", rows[14:]),
                 select=_jsonl(tmp_path / "select.jsonl", rows[10:17]))
    with pytest.raises(TaskDataError) as err:
        items_of(task(**files, **MC))
    text = str(err.value)
    assert text.startswith("task.select: 4 item(s) of ") and "select.jsonl are also in task.train" in text
    assert all(f"Question {i}?" in text for i in (10, 11, 12)) and "Question 13?" not in text
    assert "task.on_overlap: drop" in text

    _, s = items_of(task(**files, on_overlap="drop", **MC))
    assert (s.carve["overlap_select"], s.carve["overlap_report"]) == (4, 3)
    assert (len(s.train), len(s.select), len(s.report)) == (14, 3, 3)
    train, select, report = {ex.prompt for ex in s.train}, {x.prefix for x in s.select}, {x.prefix for x in s.report}
    assert not (train & select) and not (train & report) and not (select & report)
    from lofit_ray.report import report_text

    line = report_text("m", "reg", "1", {"k": 2, "split": "report", "n": 3, "intervals": {},
                                         "data": {**s.carve, "truncated_train": 0, "max_length": 64}})
    assert "task.on_overlap: drop removed 4 selection and 3 report items" in line

    (tmp_path / "select.jsonl").write_text((tmp_path / "report.jsonl").read_text())  # all of it in report
    with pytest.raises(TaskDataError, match="task.report: the report split is empty"):
        items_of(task(**files, on_overlap="drop", **MC))


def test_a_named_report_file_is_checked_against_training(tmp_path):
    """No selection file: the carve is automatic, but a report file sharing 2 training prompts is an error
    (or, with drop, loses them); without a file of the user's, nothing is checked this way."""
    rows = mc_rows(20)
    files = dict(source=_jsonl(tmp_path / "train.jsonl", rows[:14]), report=_jsonl(tmp_path / "report.jsonl", rows[12:]))
    with pytest.raises(TaskDataError, match=r"task.report: 2 item\(s\) of .*report.jsonl are also in task.train"):
        items_of(task(**files, **MC))
    _, s = items_of(task(**files, on_overlap="drop", **MC))
    assert s.carve["overlap_report"] == 2 and len(s.report) == 6 and len(s.train) + len(s.select) == 14


@pytest.mark.parametrize("on_overlap", ["error", "drop"])
def test_a_report_split_that_is_the_training_data_is_always_an_error(tmp_path, on_overlap):
    """The same file, or another file with the same prompts: an error whatever task.on_overlap says."""
    train = _jsonl(tmp_path / "train.jsonl", mc_rows(12))
    copy = _jsonl(tmp_path / "copy.jsonl", mc_rows(12)[::-1])
    for report in (train, copy):
        with pytest.raises(TaskDataError, match="task.report: .* is the training data"):
            items_of(task(source=train, report=report, on_overlap=on_overlap, **MC))


def test_on_overlap_takes_error_or_drop():
    with pytest.raises(ConfigError, match="task.on_overlap: 'keep' is not one of error, drop"):
        task(on_overlap="keep", **MC)


def test_a_single_file_source_has_no_named_report_split(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows(10)))
    with pytest.raises(TaskDataError, match="task.report: .* is one file, so it has no split 'validation'"):
        items_of(task(source=str(tmp_path / "d.jsonl"), report="validation", **MC))


def test_truncated_rows_are_counted_and_warned_about_above_one_percent(tiny):
    from lofit_ray import batching
    from lofit_ray.tasks import SFTExample

    examples = [SFTExample("word " * 5, " yes")] * 98 + [SFTExample("word " * 200, " yes")] * 2
    assert batching.count_truncated(tiny.tokenizer, examples, 64) == 2
    note = batching.truncation_note(2, 100)
    assert "2 of 100 training examples (2%)" in note and "training.max_length" in note
    assert batching.truncation_note(1, 100) is None


def test_a_task_registers_through_the_entry_point_group(tmp_path, monkeypatch):
    pkg = tmp_path / "mytasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from lofit_ray.tasks import Task, SFTExample, GenerationItem\n"
        "class Echo(Task):\n"
        "    name, objective, eval_kind = 'echo', 'sft', 'generation'\n"
        "    def train_examples(self, path=None, limit=None, data_dir=None):\n"
        "        return [SFTExample(f'say {i}:', f' {i}') for i in range(10)]\n"
        "    def eval_items(self, path=None, limit=None, data_dir=None):\n"
        "        return [GenerationItem(f'say {i}:', [str(i)]) for i in range(10)]\n")
    info = tmp_path / "mytasks-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mytasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lofit_ray.tasks]\necho = mytasks:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from lofit_ray.tasks import get_task

    assert type(get_task("echo")).__name__ == "Echo"
    cfg = TaskConfig(name="echo", report="val")
    assert make_task(cfg).train_examples()[3].completion == " 3"
    with pytest.raises(ConfigError, match="task.name: 'nope' is not a built-in task"):
        TaskConfig(name="nope")


@pytest.mark.parametrize("fields, message", [
    (dict(columns={"choices": ["opa", "opb", "opx"], "label": "cop"}), "task.columns.choices: .* no column 'opx'"),
    (dict(columns={"choices": ["opa", "opb", "opc"], "label": "answer"}), "task.columns.label: .* no column 'answer'"),
    (dict(template="Q: {question}"), r"task.template: field \{question\} is not a column"),
    (dict(carve_seed=0, limit_train=None, columns={"choices": ["opa", "opb"], "label": "cop"}),
     "task.columns.label: .* index 2, out of range for its 2 choices"),
])
def test_bad_data_exits_2_naming_the_field_before_ray_starts(tmp_path, fields, message, capsys):
    from lofit_ray.cli import main

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows(12)))
    config = {"name": "bad", "models": ["tiny-llama"],
              "task": {"name": "mine", **MC, **fields, "source": str(tmp_path / "d.jsonl")},
              "search": {"space": {"k": [1]}}, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["search", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "m.db").exists()  # nothing was started or recorded
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize("fields, message", [
    (dict(kind="mc", template="{q}", columns={"label": "cop"}), "task.columns.choices: an mc task needs its choices"),
    (dict(kind="sft", template="{q}"), "task.columns.completion: a sft task needs it"),
    (dict(kind="generation", columns={"answer": "a"}), "task.template: give a prompt template"),
    (dict(kind="mc", template="{q}", fixed_choices=["a", "b"], columns={"label": "l"}, answer_regex="(",),
     "task.answer_regex: not a valid regex"),
    (dict(kind="quiz"), "task.kind: 'quiz' is not one of sft, dpo, mc, generation"),
])
def test_config_errors_name_the_field(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        task(source=str(tmp_path), **fields)


def test_a_study_config_comes_from_the_search_config():
    from lofit_ray.cli.study import study_config
    from lofit_ray.config import load_config

    cfg = study_config(load_config(REPO / "configs" / "bbh_sports.yaml"), {"seeds": [0, 1]})
    assert cfg.methods == ["zero_shot", "lofit", "random_heads", "lora", "reft", "iti"]
    assert list(cfg.tasks) == ["bbh-sports"] and cfg.tasks["bbh-sports"].kind == "mc"
    assert cfg.seeds == [0, 1] and cfg.models == ["smollm2-135m"] and cfg.mlflow.experiment == "lofit-study-bbh-sports"
    # one search: the study runs it with the search config's whole policy and its LoFiT space
    search = load_config(REPO / "configs" / "bbh_sports.yaml").search
    from dataclasses import fields

    from lofit_ray.config import SearchPolicy

    assert all(getattr(cfg.search, f.name) == getattr(search, f.name) for f in fields(SearchPolicy))
    assert cfg.search.asha is False  # bbh_sports.yaml turns ASHA off; the study follows
    assert cfg.search.spaces.lofit.l1 == search.space.l1 and cfg.search.spaces.lofit.phase2_lr == search.space.phase2_lr


@pytest.mark.slow
def test_the_study_runs_on_a_user_task_and_writes_the_comparison(tmp_path):
    """`lofit-ray study` end to end on the tiny model: every method, a record with LoFiT minus each baseline."""
    import subprocess

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in mc_rows(40)))
    config = {"name": "mine", "models": ["tiny-llama"], "task": {"name": "mine", **MC, "source": str(source),
                                                                  "limit_train": 8, "limit_select": 4},
              "training": {"batch_size": 4, "max_length": 32}, "phase1": {"epochs": 1}, "phase2": {"epochs": 1},
              "search": {"num_trials": 1}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "lofit_ray.cli", "study", "--config", str(tmp_path / "mine.yaml"), "--out-dir", str(out),
         "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--set", "seeds=[0]", "--set", "k_fractions=[0.1]",
         "--set", "methods=[zero_shot,lofit,random_heads,lora]", "--set", "threads=1"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "reproduce.json").read_text())
    methods = {c["method"] for c in record["cells"]}
    assert methods == {"zero_shot", "lofit", "random_heads", "lora"}
    assert all(c["task"] == "mine" and c.get("status", "done") != "failed" for c in record["cells"])
    assert "mine" in (out / "reproduce.md").read_text()


def test_public_schemas_nested_columns_named_labels_bools_and_chat_messages(tmp_path):
    """Schemas of common public datasets: ARC-like nested choices with letter labels, a 1-based string label,
    a boolean label over fixed choices, a template indexing a list column, and DPO pairs as chat messages."""
    def read(rows, **fields):
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return make_task(task(source=str(tmp_path / "d.jsonl"), **fields)).eval_items(str(tmp_path / "d.jsonl"))

    arc = [{"question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]},
            "answerKey": "B"}]
    item = read(arc, kind="mc", template="{question}", columns={"choices": ["choices.text"], "label": "answerKey",
                                                              "choice_labels": "choices.label"})[0]
    assert item.best == 1 and item.choices == [" rock", " steam", " ice"]
    wino = [{"sentence": "The cup fell because _ was slippery.", "option1": "it", "option2": "the table",
             "answer": "1"}]
    item = read(wino, kind="mc", template="{sentence}", label_names=["1", "2"],
                columns={"choices": ["option1", "option2"], "label": "answer"})[0]
    assert item.best == 0
    boolq = [{"question": "is water wet", "answer": True}]
    item = read(boolq, kind="mc", template="{question}?", fixed_choices=["no", "yes"], columns={"label": "answer"})[0]
    assert item.choices[item.best] == " yes"
    mmlu = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}]
    item = read(mmlu, kind="mc", template="{question}\nA. {choices[0]}\nB. {choices[1]}\nAnswer:",
                fixed_choices=["A", "B"], columns={"label": "answer"})[0]
    assert item.prefix == "2+2?\nA. 3\nB. 4\nAnswer:" and item.best == 1
    pairs = [{"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
              "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]}]
    item = read(pairs, kind="dpo", columns={"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"})[0]
    assert item.choices == [" Hello!", " Go away."] and item.labels == [1, 0]


@pytest.mark.slow
def test_a_search_on_a_user_task_registers_its_own_champion_that_scores_mc(tmp_path):
    """jobs/search.py on a user mc task (tiny model): the registered model and experiment follow the task's name,
    the summary says what the splits hold, and the champion's MLflow model scores MC items, not generations."""
    import subprocess

    import mlflow
    import pandas as pd

    from lofit_ray import tracking

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in mc_rows(40)))
    config = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    config["task"] = {"name": "my-quiz", **MC, "source": "d.jsonl", "limit_train": 16}  # relative to the cwd: trials
    # run in Ray's own directories, so the driver makes it absolute
    config["search"].update(num_trials=2, controls=1)
    config.pop("mlflow")
    (tmp_path / "quiz.yaml").write_text(yaml.safe_dump(config))
    env = {**__import__("os").environ, "LOFIT_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), "--config", str(tmp_path / "quiz.yaml"),
                           "--summary-out", str(tmp_path / "summary.json")], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    result = summary["models"]["tiny-llama"]
    assert result["registered_model"] == "lofit-tiny-llama-my-quiz"
    assert result["data"]["n_train"] == 16 and result["data"]["n_report"] == 8 and result["data"]["truncated_train"] == 0
    assert "data: 16 train / 6 selection / 8 report" in proc.stdout
    uri = summary["tracking_uri"]
    assert tracking.client(uri).get_experiment(summary["experiment_id"]).name == "lofit-my-quiz"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/lofit-tiny-llama-my-quiz@champion")
    rows = model.predict(pd.DataFrame([{"question": "Q: Question 3?\nA:", "choices": [" a3", " b3", " c3"],
                                        "labels": [1, 0, 0]}]))
    assert {"mc1", "mc2"} <= set(rows.columns)


def test_the_study_tunes_lofit_over_the_search_configs_space():
    from lofit_ray.cli.study import study_config
    from lofit_ray.config import SearchJobConfig, load_config

    search = load_config(REPO / "configs" / "bbh_sports.yaml")
    study = study_config(search)
    assert study.search.spaces.lofit.l1 == search.search.space.l1
    assert study.search.spaces.lofit.phase2_lr == search.search.space.phase2_lr
    assert study.search.spaces.random_heads.phase2_lr == search.search.space.phase2_lr
    default = SearchJobConfig().search.space  # and the two configs' own defaults are one definition
    from lofit_ray.config import LofitSpace

    assert (LofitSpace().l1, LofitSpace().phase1_lr, LofitSpace().phase2_lr) == \
        (default.l1, default.phase1_lr, default.phase2_lr)
