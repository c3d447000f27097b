"""Every code block of the README and docs/ that a user runs (```bash and ```python) is run here, as written,
on the tiny random Llama, or says in the markdown why not.

A block is one of three kinds, by the HTML comment on the nearest non-blank line above its fence:
  * no comment: this file runs it. WALKTHROUGH lists every such block in the order a user would run them, in
    one working folder, so later commands find what earlier ones wrote (heads.json, adapter/, merged/). Each
    `lofit-ray ...` line goes through the CLI's main() in-process, with the model swapped for tiny-llama and
    flags appended that cut the data and epochs (CUT; the last flag wins); python blocks are exec'd with the same
    swap. Lines with a placeholder (<run id>, [--k 8]) are templates, not commands, and are left out.
  * `<!-- run by tests/test_x.py -->`: that test file runs it (it must name the page).
  * `<!-- not run in CI: reason -->`: it needs what CI has not (a GPU, the network, a Kubernetes cluster, a
    server that runs until stopped, hours); it must give the reason, and still be valid bash or Python.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGUAGES = ("bash", "python")  # what a user runs; yaml/toml blocks are files they write, text is output
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"^<!--\s*(not run in CI|run by)\s*:?\s*(.*?)\s*-->$")
TINY = "tiny-llama"
# appended to each command of a verb: small data, one epoch (argparse keeps the last value of a flag)
CUT = {
    "select": ["--limit", "8", "--phase1-epochs", "1"],
    "train": ["--limit", "8", "--phase2-epochs", "1"],
    "fit": ["--limit", "8", "--phase1-epochs", "1", "--phase2-epochs", "1"],
    "eval": ["--limit", "8"],
    "iti": ["--limit", "16", "--alphas", "1", "5"],
    "lora": ["--limit", "8", "--lora-epochs", "1", "--eval-limit", "8"],
}
ALWAYS_SAFE = ("export", "heads")  # verbs that read what earlier commands wrote and take no data limit


@dataclasses.dataclass
class Block:
    page: str  # relative to the repo root
    line: int  # of the opening fence
    language: str
    code: str
    marker: str | None  # "not run in CI" | "run by" | None
    note: str  # the reason, or the test file

    @property
    def key(self) -> tuple[str, str]:
        return self.page, self.code.lstrip().splitlines()[0]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(p for p in docs.rglob("*.md") if "reference" not in p.relative_to(docs).parts)]


def doc_blocks() -> list[Block]:
    found = []
    for page in doc_pages():
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) not in RUN_LANGUAGES:
                continue
            before = [line.strip() for line in text[:match.start()].splitlines() if line.strip()]
            marker = MARKER.match(before[-1]) if before else None
            found.append(Block(page.relative_to(ROOT).as_posix(), text[:match.start()].count("\n") + 1,
                               match.group(1), match.group(2), marker and marker.group(1),
                               marker.group(2) if marker else ""))
    return found


def commands(block: Block) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments dropped."""
    lines = []
    for line in block.code.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def is_template(command: str) -> bool:
    return bool(re.search(r"[<\[]", command))


# The blocks this file runs, by (page, first line), in the order run. Between them, `before` steps set up what a
# block needs that no earlier block makes (a registered champion, the data folder beside the working folder).
WALKTHROUGH = [
    ("README.md", "lofit-ray select --model smollm2-135m --task truthfulqa --out heads.json"),
    ("README.md", "from lofit_ray import Adapter, load_model"),
    ("README.md", "lofit-ray eval   --adapter models:/lofit-smollm2-135m-truthfulqa@champion"),
    ("docs/concepts.md", "lofit-ray select --model smollm2-135m --task truthfulqa --out heads.json             "
                         "# phase 1: ranks all heads"),
    ("docs/concepts.md", "from lofit_ray import Adapter, load_model"),
    ("docs/data.md", "lofit-ray select --model smollm2-135m --task my_task.yaml --k 8 --out heads.json   "
                     "# phase 1 alone"),
    ("docs/search.md", "import mlflow, pandas as pd"),
    ("docs/search.md", "lofit-ray heads list                                  "
                       "# trials: kind, K, lrs, selection/val metrics, versions,"),
]


def _swap(text: str) -> str:
    return text.replace("smollm2-135m", TINY)


def _run_cli(command: str, log: list) -> None:
    from lofit_ray.cli import main

    words = shlex.split(_swap(command))
    assert words[0] == "lofit-ray", f"only lofit-ray commands run here: {command}"
    verb = words[1]
    assert verb in CUT or verb in ALWAYS_SAFE, f"say in CUT how to keep `lofit-ray {verb}` small"
    argv = [*words[1:], *CUT.get(verb, [])]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    log.append(" ".join(argv))
    assert code == 0, f"`lofit-ray {' '.join(argv)}` exited {code}"


def _register_champions(workdir: Path, monkeypatch) -> dict:
    """What a search leaves in the store, made directly: the walkthrough's truthfulqa adapter (and its head set)
    as versions 1-3 of lofit-tiny-llama-truthfulqa (@champion on 1), and a random MQuAKE (generation) adapter as
    the champion of lofit-tiny-llama-mquake."""
    import mlflow
    import torch

    from lofit_ray import tracking
    from lofit_ray.adapter import Adapter
    from lofit_ray.heads import HeadSet

    uri = tracking.resolve_tracking_uri(f"sqlite:///{workdir.parent / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the CLI's default store, and MLflow's `models:/` resolution
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = tracking.ensure_experiment("lofit-docs", uri)
    trained = Adapter.from_pretrained(workdir / "adapter")
    config = dataclasses.replace(trained.config, task="mquake")
    generation = Adapter(config, 0.5 * torch.randn(trained.offset.shape, generator=torch.Generator().manual_seed(7)))
    names = {}
    for adapter, versions in ((trained, 3), (generation, 1)):
        name = tracking.registered_name(adapter.config.base_model, adapter.config.task)
        for i in range(versions):
            run_id = tracking.start_run(uri, experiment, f"trial-{i}", {"k": len(adapter.config.heads)}, {})
            if adapter is trained:  # what `heads list` shows: the trial's head set (here the walkthrough's ranking)
                ranking = HeadSet.from_json(workdir / "heads.json")
                tracking.log_head_set(uri, run_id, ranking, k=len(adapter.config.heads))
            tracking.log_adapter(uri, run_id, adapter)
            tracking.end_run(uri, run_id)
            version = tracking.register_adapter(uri, name, run_id, {"k": len(adapter.config.heads)})
            if i == 0:
                tracking.set_champion(uri, name, version)
        names[adapter.config.task] = name
    return {"uri": uri, "previous": previous, "names": names}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with ../shared/data beside it, as in a checkout next to shared/.

    The CLI runs in this process, and mlflow.set_tracking_uri (which lofit_ray.tracking calls) also exports
    $MLFLOW_TRACKING_URI. So the variable is put under monkeypatch before any command runs (set, then deleted:
    undo returns it to unset), and MLflow's own URI is put back after the test. Later tests see neither."""
    import mlflow

    from lofit_ray.tasks import data_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-workdir")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir().resolve(), target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work
    mlflow.set_tracking_uri(previous)  # exports the variable again; monkeypatch's undo, which runs next, unsets it


def test_every_run_block_runs_as_written_on_the_tiny_model(workdir, monkeypatch):
    import mlflow

    blocks = {b.key: b for b in doc_blocks() if b.marker is None}
    unlisted = sorted(str(b) for key, b in blocks.items() if key not in WALKTHROUGH)
    assert not unlisted, (f"blocks with no marker that this test does not run: {unlisted}; add them to "
                          f"WALKTHROUGH, or put <!-- not run in CI: reason --> above them")
    missing = [key for key in WALKTHROUGH if key not in blocks]
    assert not missing, f"WALKTHROUGH names blocks the docs no longer hold (or now mark): {missing}"

    log: list[str] = []
    store = None
    try:
        for key in WALKTHROUGH:
            block = blocks[key]
            if block.page == "README.md" and "models:/" in block.code and store is None:
                store = _register_champions(workdir, monkeypatch)
            if block.page == "docs/data.md":  # the page's YAML block is the my_task.yaml its commands read
                [task_yaml] = re.findall(r"^```yaml\n(.*?)^```", (ROOT / block.page).read_text(), re.S | re.M)[:1]
                (workdir / "my_task.yaml").write_text(_swap(task_yaml))
            if block.language == "python":
                namespace: dict = {}
                exec(compile(_swap(block.code), str(block), "exec"), namespace)
                log.append(f"python {block}")
                if "predict" in block.code:
                    _check_predictions(namespace)
                if "attach(" in block.code:
                    attached = namespace["loaded"].model
                    assert any(m._forward_pre_hooks or m._forward_hooks for m in attached.modules())
                continue
            for command in commands(block):
                if is_template(command):
                    continue
                _run_cli(command, log)
    finally:
        if store is not None:
            mlflow.set_tracking_uri(store["previous"])

    # what the commands wrote is what the docs say they write
    heads = json.loads((workdir / "heads.json").read_text())
    assert heads["model"] == TINY and len(heads["ranking"]) == 16
    assert json.loads((workdir / "random.json").read_text())["method"] == "random"
    assert (workdir / "adapter" / "offsets.safetensors").is_file() and (workdir / "iti").is_dir()
    assert (workdir / "lora").is_dir() and (workdir / "merged" / "config.json").is_file()
    assert "mc1" in json.loads((workdir / "metrics.json").read_text())
    ran = [line.split()[0] for line in log if not line.startswith("python")]
    assert {"select", "train", "fit", "eval", "export", "iti", "lora", "heads"} <= set(ran), log


def _check_predictions(namespace: dict) -> None:
    """search.md's pyfunc block: the MC model gives per-choice scores, the generation model text."""
    import pandas as pd

    mc = namespace["model"].predict(pd.DataFrame([{"question": "Q?", "choices": [" a", " b"], "labels": [1, 0]}]))
    assert {"mc1", "mc2"} <= set(mc.columns)
    text = namespace["generation"].predict(pd.DataFrame([{"prompt": "Q: Who is the CEO of Apple? A:"}]))
    assert list(text.columns) == ["id", "prompt", "generated"] and isinstance(text["generated"][0], str)


def test_every_block_not_run_says_why_and_is_valid(tmp_path):
    """The blocks this file does not run: each names its reason or its test, and still parses (bash -n, Python's
    compiler; its `lofit-ray` lines through the CLI's parser in tests/test_docs.py)."""
    unrun = [b for b in doc_blocks() if b.marker is not None]
    assert len(unrun) >= 10
    bad = []
    for block in unrun:
        if block.marker == "not run in CI" and len(block.note) < 15:
            bad.append(f"{block}: say why it is not run (<!-- not run in CI: reason -->)")
        if block.marker == "run by":
            test = ROOT / block.note
            if not (test.is_file() and block.page.split("/")[-1] in test.read_text()):
                bad.append(f"{block}: {block.note} does not exist or does not read {block.page}")
        if block.language == "python":
            try:
                ast.parse(block.code)
            except SyntaxError as exc:
                bad.append(f"{block}: not valid Python ({exc})")
        else:
            code = re.sub(r"<[^<>\n]*>", "PLACEHOLDER", block.code)  # <run id>: a word to fill in
            proc = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
            if proc.returncode:
                bad.append(f"{block}: not valid bash ({proc.stderr.strip()})")
    assert not bad, "\n".join(bad)


def test_the_markers_are_read_as_written(tmp_path, monkeypatch):
    """The marker is the comment right above the fence (blank lines between allowed); other comments are not."""
    page = tmp_path / "README.md"
    page.write_text("<!-- not run in CI: needs a GPU and the network -->\n\n```bash\nnvidia-smi\n```\n\n"
                    "<!-- an unrelated note -->\n```python\nx = 1\n```\n\n<!-- run by tests/test_x.py -->\n"
                    "```python\ny = 2\n```\n```yaml\nnot: run\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    blocks = doc_blocks()
    assert [(b.line, b.language, b.marker, b.note) for b in blocks] == [
        (3, "bash", "not run in CI", "needs a GPU and the network"), (8, "python", None, ""),
        (13, "python", "run by", "tests/test_x.py")]
