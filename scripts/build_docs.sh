#!/usr/bin/env bash
# Build the documentation site in strict mode (a broken link, a missing page or a stale anchor fails) into
# site/. The site's tools (pyproject's `docs` extra: mkdocs, mkdocs-material, mkdocstrings) go into their own
# venv, $DOCS_VENV (default .venv-docs), not the project's .venv: the site needs neither torch nor Ray, since
# mkdocstrings reads the API's docstrings from the source. Extra arguments go to `mkdocs build`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DOCS_VENV:-.venv-docs}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/mkdocs" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # the extra's requirements, read from pyproject.toml so there is one list
    mapfile -t REQS < <("$VENV/bin/python" - <<'PY'
import re, pathlib
try:
    import tomllib
    print("\n".join(tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]))
except ImportError:  # Python 3.10
    line = re.search(r"^docs = \[(.*)\]$", pathlib.Path("pyproject.toml").read_text(), re.M).group(1)
    print("\n".join(re.findall(r'"([^"]+)"', line)))
PY
)
    "$VENV/bin/pip" install -q --disable-pip-version-check "${REQS[@]}"
fi
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict "$@"
