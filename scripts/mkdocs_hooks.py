"""MkDocs hooks (mkdocs.yml `hooks:`): the docs link to the repository's own files by their relative paths
(`../jobs/results/learning_curve/learning_curve.png`, `../infra/README.md`), so the links work where the
Markdown is read as it is (GitHub, an editor). For the site, each such file is copied under `_repo/` and the
link is pointed at the copy; a Markdown file becomes a page outside the nav, whose own relative links (to
files the site does not hold) are turned into plain text. A link to a file that does not exist is left as
written, so `mkdocs build --strict` still fails on it."""
from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

LINK = re.compile(r"(!?\[[^\]\n]*\])\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")
FENCE = re.compile(r"^(```|~~~)")
PREFIX = "_repo"
_outside: dict[str, Path] = {}  # repository-relative path -> file, for every outside file a page links to


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _targets(text: str):
    """(match, target path without its #anchor) of each relative link outside fenced code."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK.finditer(line):
            target = m.group(2).split("#", 1)[0]
            if target and not re.match(r"^[a-z][a-z0-9+.-]*:|^/", target):
                yield m, target


def _outside_file(origin_dir: Path, target: str, root: Path, docs: Path) -> str | None:
    path = (origin_dir / target).resolve()
    if not path.is_file() or docs in path.parents or root not in path.parents:
        return None
    return path.relative_to(root).as_posix()


def on_files(files, config):
    root, docs = _root(config), Path(config.docs_dir).resolve()
    _outside.clear()
    for page in files.documentation_pages():
        source = Path(page.abs_src_path)
        for _, target in _targets(source.read_text(encoding="utf-8")):
            rel = _outside_file(source.parent, target, root, docs)
            if rel is not None:
                _outside[rel] = root / rel
    for rel, path in sorted(_outside.items()):
        copy = File.generated(config, f"{PREFIX}/{rel}", abs_src_path=str(path))
        if rel.endswith(".md"):
            copy.inclusion = InclusionLevel.NOT_IN_NAV
        files.append(copy)
    return files


def on_page_markdown(markdown, page, config, files):
    root, docs = _root(config), Path(config.docs_dir).resolve()
    origin = Path(page.file.abs_src_path).parent  # where the Markdown really lies: its links are relative to it
    here = (docs / page.file.src_uri).parent      # where the page lies in the site
    copied = page.file.src_uri.startswith(PREFIX + "/")

    def fix(m: re.Match) -> str:
        text, target, title = m.group(1), m.group(2), m.group(3)
        path, _, anchor = target.partition("#")
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:|^/", path):
            return m.group(0)
        rel = _outside_file(origin, path, root, docs)
        if rel is not None and rel in _outside:
            new = os.path.relpath(docs / PREFIX / rel, here).replace(os.sep, "/")
            return f"{text}({new}{'#' + anchor if anchor else ''}{title})"
        if copied:  # a repository file shown as a page: its links to files the site lacks become text
            return text[1:-1] if not text.startswith("!") else text[2:-1]
        return m.group(0)

    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(fix, line))
    return "\n".join(out)
