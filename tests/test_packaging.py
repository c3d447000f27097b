"""What `pip install lofit-ray[service]` from a wheel gets: every subpackage, the configs a search needs (as the
package lofit_ray.configs) and the lm-eval task files; and the CLI finds a shipped config by name."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from lofit_ray.config import ConfigError, config_file, load_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]


def declared() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_declared():
    packages = set(declared()["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lofit_ray").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= packages, f"add {sorted(on_disk - packages)} to [tool.setuptools] packages in pyproject.toml"
    assert declared()["package-dir"] == {"lofit_ray.configs": "configs"}


def test_shipped_configs_are_found_by_name():
    assert set(shipped_configs()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert config_file("smoke") == config_file("smoke.yaml") == REPO / "configs" / "smoke.yaml"
    assert load_config("quickstart").name == "quickstart"
    with pytest.raises(ConfigError, match=r"config file not found: nope; .* \(bbh_sports, llama2_7b, multi_model, quickstart"):
        config_file("nope")


def test_the_wheel_holds_the_configs_and_the_lm_eval_tasks(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for name in ("lofit_ray", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = zipfile.ZipFile(next(tmp_path.glob("lofit_ray-*.whl")))
    names = set(wheel.namelist())
    assert {f"lofit_ray/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= names
    assert {"lofit_ray/lm_eval_tasks/lofit_truthfulqa_mc1.yaml", "lofit_ray/lm_eval_tasks/utils.py",
            "lofit_ray/tracking/pyfunc.py", "lofit_ray/tasks/source.py", "lofit_ray/cli/data.py"} <= names
    # installed, it finds its configs by name with no checkout around it
    wheel.extractall(tmp_path / "site")
    code = "import lofit_ray; from lofit_ray.config import load_config, shipped_configs; " \
           "print(sorted(shipped_configs()), load_config('smoke').name, lofit_ray.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("]")[0].count("'") == 2 * len(list((REPO / "configs").glob("*.yaml")))
    assert proc.stdout.split()[-2:] == ["smoke", str(tmp_path / "site" / "lofit_ray" / "__init__.py")]
    # and the installed CLI runs phase 1 on the tiny model
    from lofit_ray.tasks import DATA_DIR_ENV, data_dir

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), DATA_DIR_ENV: str(data_dir()),
           "LOFIT_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "lofit_ray.cli", "select", "--model", "tiny-llama", "--task",
                           "truthfulqa", "--k", "2", "--limit", "8", "--out", "heads.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head_set = json.loads((tmp_path / "heads.json").read_text())
    assert head_set["model"] == "tiny-llama" and head_set["k"] == 2 and len(head_set["ranking"]) == 16



def test_every_command_help_renders():
    """`lofit-ray <command> --help` prints for every command and sub-command (a bare % in a help string
    once made `lofit-ray --help` itself a traceback)."""
    import argparse

    from lofit_ray.cli import build_parser

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])

    seen = []
    for path, parser in walk(build_parser(), ["lofit-ray"]):
        assert parser.format_help().startswith("usage:"), path
        seen.append(" ".join(path))
    assert {"lofit-ray", "lofit-ray study", "lofit-ray heads list", "lofit-ray compare"} <= set(seen)
