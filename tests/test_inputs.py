"""Bad input, early and named: malformed, empty, huge, non-UTF-8 and wrongly typed files and flags.

In process, the YAML config (search and reproduce schemas), `--set`, the head-set JSON and every task loader
(JSONL, and TruthfulQA / MQuAKE / CLUTRR files under a data dir) get a fixed corpus of nasty files plus
hypothesis-generated ones (raw text, raw bytes, and valid documents with one field replaced, deleted or
joined by an unknown one). Each input either loads or raises one of the project's named ValueErrors
(ConfigError, TaskDataError, HeadSetError) with a one-line message; any other exception fails the test.
A file that is not text (not UTF-8, or holding a NUL byte: binary, latin-1, UTF-16) may not load: every call
that reads it must raise such an error (none of these formats, YAML, JSON, JSONL and CSV as read here,
takes a NUL byte or another encoding; JSON's escaped "\u0000" is text and may load).
Then the real commands, as subprocesses, on a few bad inputs: exit 2, one line on stderr, no traceback,
no MLflow store or Ray results created. `pytest -s` prints the tally:
"fuzz: N inputs (M loader calls): E clean errors, A accepted, 0 tracebacks".
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import reduce
from operator import getitem
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail

from lofit_ray.architectures import HeadLayout
from lofit_ray.config import ConfigError, ReproduceConfig, SearchJobConfig, load_config, parse_set, to_dict
from lofit_ray.heads import HeadSet, HeadSetError, random_ranking
from lofit_ray.tasks import TaskDataError, data_dir, get_task

REPO = Path(__file__).resolve().parents[1]
NAMED = (ConfigError, TaskDataError, HeadSetError)
TALLY = Counter()
NOT_TEXT = [False]  # set by feed(): the input being read is not UTF-8 text, or holds a NUL byte


def not_text(content: bytes) -> bool:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return b"\x00" in content


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print(f"\nfuzz: {TALLY['inputs']} inputs ({TALLY['calls']} loader calls): {TALLY['errors']} clean errors, "
          f"{TALLY['accepted']} accepted, {TALLY['tracebacks']} tracebacks, "
          f"{TALLY['binary accepted']} non-text files accepted")


def check(call, reads: bool = True) -> None:
    """One loader call: it returns, or raises a named ValueError with a one-line message; nothing else.
    A call that reads the rows (`reads`; not a peek at the first one) of a file that is not text must raise."""
    TALLY["calls"] += 1
    try:
        call()
    except NAMED as exc:
        text = str(exc)
        assert text and "\n" not in text and "\r" not in text, f"{type(exc).__name__} not on one line: {text!r}"
        TALLY["errors"] += 1
        return
    except BaseException:
        TALLY["tracebacks"] += 1
        raise
    if reads and NOT_TEXT[0]:
        TALLY["binary accepted"] += 1
        pytest.fail(f"{getattr(call, '__name__', 'a loader call')} accepted a file that is not UTF-8 text "
                    f"(binary, NUL bytes, latin-1)")
    TALLY["accepted"] += 1


# -- the targets: write one input where the loader looks, then run every loading call on it ------------------

def _config(path: Path) -> None:
    check(lambda: load_config(path))
    check(lambda: load_config(path, schema=ReproduceConfig))


def _heads(path: Path) -> None:
    check(lambda: HeadSet.from_json(path))


def _jsonl(path: Path) -> None:
    task = get_task("jsonl", train_path=path, eval_path=path)
    check(lambda: task.objective, reads=False)  # peeks at the first row only
    check(lambda: task.eval_kind, reads=False)
    for call in (task.train_examples, task.eval_items, task.labelled_statements):
        check(call)


def _builtin(name: str):
    def run(path: Path) -> None:
        task = get_task(name, data_dir=path.parent.parent)
        for call in (task.train_examples, task.eval_items, task.labelled_statements):
            check(call)
    return run


# name -> (file the input is written to, relative to a work dir; the loading calls). The built-in tasks read
# train and val from their data dir: both get the same input (the val path is a copy of the train one).
TARGETS = {
    "config": ("config.yaml", _config),
    "heads": ("heads.json", _heads),
    "jsonl": ("data.jsonl", _jsonl),
    "truthfulqa": ("data/truthfulqa/fold_0_train_seed_42.csv", _builtin("truthfulqa")),
    "mquake": ("data/mquake/train.jsonl", _builtin("mquake")),
    "clutrr": ("data/clutrr/train.json", _builtin("clutrr")),
}
VAL_COPY = {"truthfulqa": "fold_0_val_seed_42.csv", "mquake": "val.jsonl", "clutrr": "val.json"}


def feed(work: Path, target: str, content: bytes) -> None:
    rel, run = TARGETS[target]
    path = work / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if target in VAL_COPY:
        (path.parent / VAL_COPY[target]).write_bytes(content)
    TALLY["inputs"] += 1
    NOT_TEXT[0] = not_text(content)
    try:
        run(path)
    finally:
        NOT_TEXT[0] = False


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inputs")


# -- valid documents, to break one field at a time ------------------------------------------------------------

def _valid_head_set() -> dict:
    layout = HeadLayout("llama", 4, 4, 16)
    return asdict(HeadSet("tiny-llama", "abc", asdict(layout), random_ranking(layout, 0), k=3, task="truthfulqa"))


def _first_lines(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _truthfulqa_rows(n: int) -> list[list[str]]:
    with open(data_dir() / "truthfulqa" / "fold_0_train_seed_42.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        return [next(reader) for _ in range(n + 1)]  # the header, then n rows


VALID = {
    "config": lambda: to_dict(SearchJobConfig()),
    "reproduce": lambda: to_dict(ReproduceConfig()),
    "heads": _valid_head_set,
    "jsonl-sft": lambda: [{"prompt": "Q: sky? A:", "completion": " blue"}] * 2,
    "jsonl-dpo": lambda: [{"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}] * 2,
    "jsonl-mc": lambda: [{"prompt": "Q: ", "question": "Sky?", "choices": [" blue", " green"], "labels": [1, 0],
                          "best": 0}] * 2,
    "jsonl-generation": lambda: [{"prompt": "Q: sky? A:", "answers": ["blue"], "max_new_tokens": 4}] * 2,
    "mquake": lambda: _first_lines(data_dir() / "mquake" / "train.jsonl", 2),
    "clutrr": lambda: json.loads((data_dir() / "clutrr" / "val.json").read_text(encoding="utf-8"))[:2],
    "truthfulqa": lambda: _truthfulqa_rows(2),
}


def places(tree, at=()):
    """Every node of a JSON/YAML tree as its key path (the root is ())."""
    yield at
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in children:
        yield from places(child, at + (key,))


def mutate(tree, at: tuple, how: str, value):
    """A copy of `tree` with the node at `at` replaced by `value`, deleted, or given an unknown key."""
    tree = copy.deepcopy(tree)
    if not at:
        return value if how == "replace" else tree
    parent = reduce(getitem, at[:-1], tree)
    if how == "delete":
        del parent[at[-1]]
    elif how == "extra" and isinstance(parent[at[-1]], dict):
        parent[at[-1]]["zz_unknown"] = value
    else:
        parent[at[-1]] = value
    return tree


def dump(target: str, tree) -> bytes:
    if target == "config":
        return yaml.safe_dump(tree, allow_unicode=True).encode("utf-8")
    rows = tree if isinstance(tree, list) else [tree]
    if target in ("jsonl", "mquake"):
        return "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode("utf-8", "surrogatepass")
    if target == "truthfulqa":
        out = io.StringIO()
        csv.writer(out).writerows(row if isinstance(row, list) else [row] for row in rows)
        return out.getvalue().encode("utf-8", "surrogatepass")
    return json.dumps(tree, ensure_ascii=False).encode("utf-8", "surrogatepass")


# -- a fixed corpus of nasty files ---------------------------------------------------------------------------

def _alias_bomb(field: str) -> bytes:
    """YAML anchors nine deep, nine wide: 9**9 strings if anything expanded them."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return ("\n".join(lines) + f"\n{field}: *a8\n").encode()


NASTY = {
    "empty": b"",
    "blank lines": b"\n \n\t\n",
    "BOM only": b"\xef\xbb\xbf",
    "binary": bytes(range(256)) * 4,
    "latin-1": "caf\xe9: na\xefve\n".encode("latin-1"),
    "NUL bytes": b"\x00" * 64,
    "UTF-16": '{"prompt": "a", "completion": "b"}\n'.encode("utf-16"),
    "nested 5000 deep": b"[" * 5000,
    "5000-digit number": b"9" * 5000,
    "5000-digit field": b'{"prompt": "a", "completion": "b", "k": ' + b"9" * 5000 + b"}\n",
    "huge line": b'{"prompt": "' + b"x" * 3_000_000 + b'", "completion": 5}\n',
    "CR line breaks": b'{"prompt": "a",\r"completion": "b"}\r{"prompt": 1}\r',
    "JSON null": b"null",
    "JSON list": b"[1, 2, 3]",
    "lone surrogate": b'{"prompt": "\\ud800", "completion": "\\udfff", "answers": ["\\ud800"]}\n',
    "NaN and Infinity": b'{"question": NaN, "choices": [Infinity], "labels": [-Infinity]}\n',
    "YAML alias bomb": _alias_bomb("models"),
    "YAML alias bomb in a string field": _alias_bomb("name"),
    "YAML recursive alias": b"models: &a [*a]\n",
    "YAML python tag": b"name: !!python/object/apply:os.system ['true']\n",
    "YAML tab indent": b"search:\n\tnum_trials: 2\n",
    "YAML duplicate anchors and dates": b"name: &a 2024-01-01\nmodels: [*a]\n",
    "YAML non-string keys": b"1: a\nnull: b\ntrue: c\n[1]: d\n",
    "YAML key with a line break": b'tasks: {"truth\\nfulqa": {}}\nmodels: ["a\\nb"]\n',
    "YAML shorthand of lists": b"tasks: [[truthfulqa], {mquake: 1}]\n",
    "YAML too large": b"name: " + b"x" * (1 << 20) + b"\n",
    "YAML large list": ("models: [" + ", ".join(["tiny-llama"] * 2000) + "]\n").encode(),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_nasty_files_fail_cleanly(work, target):
    for name, content in NASTY.items():
        before = TALLY["tracebacks"]
        try:
            feed(work, target, content)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"{target}: input {name!r}: {exc}") from None
        finally:
            assert TALLY["tracebacks"] == before, f"{target}: input {name!r} escaped as a traceback"


def test_a_directory_or_a_missing_file_is_named(work, tmp_path):
    check(lambda: load_config(tmp_path))
    check(lambda: load_config(tmp_path / "missing.yaml"))
    check(lambda: get_task("jsonl", train_path=tmp_path).train_examples())
    check(lambda: get_task("jsonl", eval_path=tmp_path / "missing.jsonl").eval_items())
    check(lambda: get_task("clutrr", data_dir=tmp_path).train_examples())
    with pytest.raises(FileNotFoundError, match="head set file not found"):
        HeadSet.from_json(tmp_path / "missing.json")
    TALLY["inputs"] += 6


@pytest.mark.parametrize("pairs", [["x"], ["=1"], ["name=" + "[" * 5000], ["name={a: [}"], ["a.b.c=1"],
                                   ["task=5", "task.name=x"], ["name=\x00"], ["search.space.k=[[1]]"],
                                   ["tasks=[[a]]"], ["models=[a, a]"], ["k_fractions=[.nan]"], ["seeds=[.inf]"]])
def test_set_flags_fail_cleanly(pairs):
    for schema in (SearchJobConfig, ReproduceConfig):
        TALLY["inputs"] += 1
        check(lambda: load_config(None, parse_set(pairs), schema=schema))


def test_messages_name_the_file_and_field(work):
    bad = work / "bad-heads.json"
    head_set = _valid_head_set()
    bad.write_text(json.dumps(head_set, indent=1)[:-3] + ",\n}")
    at = re.escape(str(bad))
    with pytest.raises(HeadSetError, match=rf"^{at}: not valid JSON at line \d+ column \d+: .*lofit-ray select"):
        HeadSet.from_json(bad)
    for change, message in ((("ranking", None), "field 'ranking': missing"),
                            (("ranking", [[0, 1]]), r"field 'ranking': row 0 is \[0, 1\]; each row is \[layer"),
                            (("ranking", [[0, 9, 0.5]]), r"field 'ranking': row 0 names head \(layer 0, head 9\)"),
                            (("ranking", "top"), "field 'ranking': expected a non-empty list"),
                            (("k", "3"), "field 'k': expected an integer"),
                            (("colour", 1), "field 'colour': unknown")):
        doc = {k: v for k, v in head_set.items() if k != change[0]}
        if change[1] is not None:
            doc[change[0]] = change[1]
        bad.write_text(json.dumps(doc))
        with pytest.raises(HeadSetError, match=f"^{at}: {message}"):
            HeadSet.from_json(bad)
    config = work / "bad.yaml"
    config.write_text("search:\n  num_trials: 2\n   seed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: not valid YAML at line 3 column 8: "):
        load_config(config)
    config.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: not UTF-8 text"):
        load_config(config)
    config.write_bytes(_alias_bomb("models"))
    with pytest.raises(ConfigError, match=r"^a0: unknown key"):
        load_config(config)
    rows = work / "rows.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + json.dumps(VALID["jsonl-sft"]()[0]).encode() + b"\n")
    assert len(get_task("jsonl", train_path=rows).train_examples()) == 1  # a byte-order mark is fine


# -- hypothesis: raw text and bytes, and valid documents with one field broken ---------------------------------

def fuzz(build, n: int) -> None:
    """Run `build(st)` (a strategy of no-argument callables) for n examples: seeded, no example database."""
    try:
        import hypothesis
    except ImportError:  # a dev dependency: a CI that lacks it skips the fuzzing silently otherwise
        skip_or_fail("hypothesis is not installed: pip install -e '.[dev]'")
    from hypothesis import HealthCheck, strategies as st

    @hypothesis.settings(max_examples=n, deadline=None, database=None, derandomize=True, print_blob=True,
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(build(st))
    def run(case):
        case()

    run()


def _values(st, text_keys: bool):
    scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=24)
               | st.sampled_from(["", "nan", "-1", "1e999", "8", "tiny-llama", "truthfulqa", "[1, 2]", "\n"]))
    keys = st.text(max_size=8) if text_keys else st.text(max_size=8) | st.integers(-2, 2) | st.none()
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
                        max_leaves=10)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_raw_text_and_bytes(work, target):
    fuzz(lambda st: (st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass"))
                     | st.binary(max_size=300)).map(lambda b: lambda: feed(work, target, b)), 80)


BROKEN = {"config": "config", "reproduce": "config", "heads": "heads", "jsonl-sft": "jsonl", "jsonl-dpo": "jsonl",
          "jsonl-mc": "jsonl", "jsonl-generation": "jsonl", "mquake": "mquake", "clutrr": "clutrr",
          "truthfulqa": "truthfulqa"}


@pytest.mark.parametrize("document", sorted(BROKEN))
def test_fuzz_one_field_broken(work, document):
    target, valid = BROKEN[document], VALID[document]()

    def build(st):
        values = _values(st, text_keys=target != "config")
        if target == "truthfulqa":  # CSV cells are text
            values = st.text(max_size=40) | st.sampled_from(["", ";", "a;;b", '"', "\x00", "\r\n"])
        return st.tuples(st.sampled_from(list(places(valid))), st.sampled_from(["replace", "delete", "extra"]),
                         values).map(lambda t: lambda: feed(work, target, dump(target, mutate(valid, *t))))

    fuzz(build, 100)


@pytest.mark.parametrize("document", sorted(BROKEN))
def test_valid_files_turned_binary_are_rejected(work, document):
    """A valid file with one NUL byte, or saved as latin-1, or as UTF-16, is refused by every reading call:
    the random corpus rarely builds such a near miss, where a reader is most tempted to take it."""
    text = dump(BROKEN[document], VALID[document]()).decode("utf-8")
    at = next(i for i in range(len(text) // 2, len(text)) if text[i].isalpha())  # in a row, not the CSV header
    variants = {"a NUL byte": (text[:at] + "\x00" + text[at:]).encode("utf-8"),
                "latin-1": (text[:at] + "\xe9" + text[at + 1:]).encode("latin-1", "replace"),
                "UTF-16": text.encode("utf-16")}
    for name, content in variants.items():
        assert not_text(content), name
        errors = TALLY["errors"]
        try:
            feed(work, BROKEN[document], content)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"{document} with {name}: {exc}") from None
        assert TALLY["errors"] > errors, f"{document} with {name}: nothing refused it"


def test_fuzz_set_flags():
    fields = [".".join(map(str, at)) for at in places(to_dict(SearchJobConfig())) if at]
    fields += [".".join(map(str, at)) for at in places(to_dict(ReproduceConfig())) if at]

    def build(st):
        flag = (st.tuples(st.sampled_from(fields), st.text(max_size=30)).map("=".join)
                | st.text(max_size=40))

        def case(pairs):
            def run():
                TALLY["inputs"] += 1
                for schema in (SearchJobConfig, ReproduceConfig):
                    check(lambda: load_config(None, parse_set(pairs), schema=schema))
            return run
        return st.lists(flag, min_size=1, max_size=3).map(case)

    fuzz(build, 200)


# -- the real commands ---------------------------------------------------------------------------------------

def _bad_files(tmp: Path) -> dict:
    (tmp / "syntax.yaml").write_text("models: [tiny-llama\nname: x\n")
    (tmp / "typed.yaml").write_text("models: [tiny-llama]\nsearch:\n  num_trials: many\n")
    (tmp / "rows.jsonl").write_text('{"prompt": "Q:", "completion": 1}\n{"question": [}\n')
    (tmp / "task.yaml").write_text(f"models: [tiny-llama]\ntask: {{name: jsonl, train: {tmp / 'rows.jsonl'}, "
                                   f"report: {tmp / 'rows.jsonl'}}}\n")
    (tmp / "heads.json").write_text('{"model": "tiny-llama",, "ranking": []}')
    (tmp / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    return {
        "search, YAML syntax": [REPO / "jobs" / "search.py", "--config", "syntax.yaml"],
        "search, wrong type": [REPO / "jobs" / "search.py", "--config", "typed.yaml"],
        "search, broken --set": [REPO / "jobs" / "search.py", "--config", "typed.yaml", "--set", "search.seed=["],
        "search, broken task file": [REPO / "jobs" / "search.py", "--config", "task.yaml"],
        "eval, broken JSONL": ["-m", "lofit_ray.cli", "eval", "--task", "jsonl", "--eval-split", "rows.jsonl",
                               "--model", "tiny-llama"],
        "train, broken head set": ["-m", "lofit_ray.cli", "train", "--heads", "heads.json", "--model", "tiny-llama",
                                   "--task", "jsonl", "--train-split", "rows.jsonl", "--k", "2"],
        "reproduce, not UTF-8": [REPO / "jobs" / "reproduce.py", "--config", "latin1.yaml", "--out-dir", "out"],
    }


def test_commands_exit_2_with_one_line_and_create_nothing(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "LOFIT_HOME": str(home)}
    commands = _bad_files(tmp_path)

    def run(args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(3) as pool:  # interpreter start-up dominates; 2 cores take three at a time
        results = dict(zip(commands, pool.map(run, commands.values())))
    for name, proc in results.items():
        TALLY["inputs"] += 1
        TALLY["calls"] += 1
        err = proc.stderr.strip()
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stdout[-1500:]}\n{err[-3000:]}"
        assert "Traceback" not in err and len(err.splitlines()) == 1, f"{name}: stderr is not one line:\n{err}"
        TALLY["errors"] += 1
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.name in ("mlflow.db", "ray_results", "mlruns"))
    assert not made, f"a bad input still created {made}"
