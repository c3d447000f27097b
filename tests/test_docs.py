"""The README and the documentation site cannot drift from the code: the generated reference pages are
current, every relative link points at a file, every `lofit-ray` command the docs show parses, and the README stays
a short way in (tests/test_doc_blocks.py runs the docs' code blocks). Fast: no Ray, no MLflow server.
Where mkdocs is installed (`pip install -e ".[docs]"`), the site also builds in strict mode."""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
GENERATOR = ROOT / "scripts" / "gen_docs.py"
REGENERATE = "python scripts/gen_docs.py"
# The set-up commands a fresh machine runs (.ci/run calls the second): the README must keep them verbatim.
SETUP_COMMANDS = (
    "bash scripts/quickstart.sh   # install into .venv, then run the main job on its embedded default",
    "bash scripts/test.sh         # install into .venv (if needed), then run the whole test suite",
)
README_LIMIT = 12 * 1024
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def hand_written() -> list[Path]:
    return [p for p in pages() if "reference" not in p.relative_to(ROOT).parts]


def outside_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_docs", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_pages_are_current(tmp_path):
    gen = _generator()
    stale = []
    for path in gen.generate(tmp_path):
        rel = path.relative_to(tmp_path)
        committed = DOCS / rel
        new = path.read_text()
        old = committed.read_text() if committed.exists() else ""
        if new != old:
            diff = "".join(list(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                     f"docs/{rel} (committed)", f"docs/{rel} (from the code)"))[:40])
            stale.append(f"docs/{rel} differs from the code:\n{diff}")
    assert not stale, ("\n".join(stale) + f"\nRegenerate with `{REGENERATE}` and commit docs/reference/.")


def test_every_relative_link_points_at_a_file():
    broken = []
    for page in pages():
        for target in LINK.findall(outside_fences(page.read_text())):
            path = target.split("#", 1)[0]
            if not path or re.match(r"^[a-z][a-z0-9+.-]*:|^/", path):
                continue  # an anchor on the same page, a URL, or an absolute path
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_site_nav_holds_every_page_and_only_pages_that_exist():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, tag, node: None)  # !!python/name: tags of mkdocs plugins
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)

    def files(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from files(value) if isinstance(value, list) else [value]

    listed = list(files(config["nav"]))
    assert [p for p in listed if not (DOCS / p).is_file()] == []
    assert sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")) == sorted(listed)


def test_the_readme_is_a_short_way_in():
    text = README.read_text()
    assert len(text.encode()) < README_LIMIT, (
        f"README.md is {len(text.encode()):,} bytes; keep it under {README_LIMIT:,}: move detail into docs/")
    for command in SETUP_COMMANDS:
        assert command in text, f"the README lost its set-up command: {command}"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for section in ("## Set up", "## Your model, your data", "## Using the adapter", "## The CLI", "## Results"):
        assert section in text


def _cli_lines(path: Path):
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not re.search(r"(^|[\s/])lofit-ray\s", line) or re.search(r"[<\[]", line):
                continue  # no command, or a placeholder such as <run id> / [--k 8]
            words = shlex.split(line)
            start = next(i for i, w in enumerate(words) if w == "lofit-ray" or w.endswith("/lofit-ray"))
            yield line, words[start + 1:]


def test_every_lofit_ray_command_in_the_docs_parses(capsys):
    from lofit_ray.cli import build_parser

    parser = build_parser()
    seen, bad = 0, []
    for page in hand_written():
        for line, argv in _cli_lines(page):
            seen += 1
            try:
                parser.parse_args(argv)
            except SystemExit:
                bad.append(f"{page.relative_to(ROOT)}: {line}\n    {capsys.readouterr().err.strip()[-300:]}")
    assert seen >= 20
    assert not bad, "commands in the docs that the CLI rejects:\n" + "\n".join(bad)


def test_the_site_builds_in_strict_mode(tmp_path):
    """With the `docs` extra installed here, or in $DOCS_VENV / .venv-docs (scripts/build_docs.sh makes it)."""
    venv = Path(os.environ.get("DOCS_VENV", ROOT / ".venv-docs"))
    if (venv / "bin" / "mkdocs").exists():
        mkdocs = [str(venv / "bin" / "mkdocs")]
    else:
        pytest.importorskip("mkdocs")
        pytest.importorskip("material")
        mkdocs = [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run([*mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()
