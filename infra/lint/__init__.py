"""Lint the Kubernetes overlays and the image of lofit-ray before anything is applied or built.

    python -m infra.lint                            # every overlay in infra/k8s/overlays + infra/docker/Dockerfile
    python -m infra.lint infra/k8s/overlays/gpu     # one or more overlay (kustomization) dirs, or a Dockerfile
    python -m infra.lint --help                     # --k8s-version, --schemas, --accelerator

Prints one line per problem ("<target>: <problem>") and a summary line; exits 1 when there are
problems, 0 when clean, 2 for bad arguments. Notes about checks that could not run go to stderr.

Rendering uses infra/k8s/render.py (no kustomize binary needed). Schemas are the tools' job (schema.py):
kubernetes-validate for the built-in kinds, check-jsonschema for the KubeRay CRDs and the search configs.
The project's own policy, one module per concern:
  auth.py     auth on: MLflow basic-auth, Ray token auth, credentials from the lofit-auth Secret
  network.py  MLflow in-cluster only, and a NetworkPolicy that admits only the Ray pods
  secrets.py  no Secret objects and no credential values, in the rendered objects or the files' text
  images.py   images pinned; GPU/CPU overlays run the matching image; rayVersion matches the image
  jobs.py     RayJobs clean up and log to MLflow; references resolve; resources; one scheduler
  configs.py  entrypoints name existing scripts and configs; one trial fits the cluster
  rules.py    names, and the KubeRay operator's own validation rules
  docker.py   the Dockerfile pins torch through constraints.txt; the dockerignore
Nothing under infra/ imports lofit_ray.

Each checker returns a list of problems; tests/test_infra.py feeds each one a broken copy and
expects a complaint, so a checker that silently passes everything is caught.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..k8s import render
from .auth import mlflow_auth_problems, ray_auth_problems
from .common import CONSTRAINTS, DOCKERFILE, KUBERAY_SCHEMAS, OVERLAYS, REPO, kustomization_files, shown
from .configs import entrypoint_problems, search_configs_problems
from .docker import (constraints_problems, dockerfile_copy_sources, dockerfile_global_args, dockerfile_problems,
                     dockerignore_problems)
from .images import accelerator_problems, image_pin_problems, ray_version_problems
from .jobs import rayjob_problems, reference_problems, schedule_problems
from .network import mlflow_network_policy_problems, mlflow_problems
from .rules import name_problems
from .schema import CRD_FILES, K8S_VERSIONS, core_schema_problems, kuberay_problems, missing_crd_files
from .secrets import file_credential_problems, secret_problems


def guess_accelerator(directory: Path) -> str | None:
    """'gpu' or 'cpu' for a directory named gpu*/cpu* (overlays/gpu), else None (base: neither)."""
    name = Path(directory).resolve().name
    return next((accel for accel in ("gpu", "cpu") if name.startswith(accel)), None)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _run(check, *args) -> list[str]:
    """A checker's problems; a checker that trips over a missing field reports that instead of crashing."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - a crash means the manifests lack what the check reads
        return [f"{check.__name__} could not run ({type(exc).__name__}: {exc}): the manifests lack what it checks"]


def lint_overlay(directory: Path, versions=K8S_VERSIONS, schemas: Path | None = KUBERAY_SCHEMAS,
                 accelerator: str | None = None, notes: list | None = None, check_configs: bool = True) -> list[str]:
    """Every check for one kustomization directory. `versions` empty, `schemas` None or `check_configs` False skip
    those schema checks; `notes` collects what could not be checked."""
    notes = [] if notes is None else notes
    try:
        objs = render.build(directory)
    except Exception as exc:  # noqa: BLE001 - RenderError, YAML errors, or a malformed patch
        return [f"does not render: {type(exc).__name__}: {exc}"]
    accelerator = accelerator or guess_accelerator(directory)
    if accelerator is None:
        notes.append(f"{shown(directory)}: CPU/GPU checks skipped (the name says neither; pass --accelerator)")
    problems = _run(name_problems, objs)
    for version in versions:
        problems += [f"Kubernetes {version}: {p}" for p in _run(core_schema_problems, objs, version)]
    problems += _run(kuberay_problems, objs, schemas)
    for check in (secret_problems, mlflow_problems, mlflow_auth_problems, mlflow_network_policy_problems,
                  ray_auth_problems, image_pin_problems, rayjob_problems, reference_problems, schedule_problems):
        problems += _run(check, objs)
    if accelerator:
        problems += _run(accelerator_problems, objs, accelerator)
    if DOCKERFILE.is_file():
        ray_version = dockerfile_global_args(DOCKERFILE.read_text()).get("RAY_VERSION", "")
        problems += _run(ray_version_problems, objs, ray_version)
    pending: list[str] = []
    problems += _run(entrypoint_problems, objs, pending)
    if check_configs:
        problems += _run(search_configs_problems, objs, accelerator or "cpu", pending)
    if pending:
        notes.append(f"{shown(directory)}: not written yet, not checked: {sorted(set(pending))}")
    problems += _run(file_credential_problems, kustomization_files(directory))
    return problems


def lint_dockerfile(path: Path, notes: list | None = None) -> list[str]:
    """Every check for the image: its Dockerfile, the torch pin, COPY sources, dockerignore, credentials."""
    notes = [] if notes is None else notes
    text = Path(path).read_text()
    problems = _run(dockerfile_problems, text)
    if CONSTRAINTS.is_file():
        problems += constraints_problems(CONSTRAINTS.read_text())
    else:
        problems.append(f"{shown(CONSTRAINTS)} missing: the torch pin lives there")
    missing, pending = dockerfile_copy_sources(text)
    problems += [f"COPY source {src} missing in the build context {shown(REPO)}" for src in missing]
    if pending:
        notes.append(f"{shown(path)}: {pending} hold no files yet: the image cannot be built until they exist")
    ignore = Path(path).with_name(Path(path).name + ".dockerignore")
    if not ignore.is_file():
        ignore = REPO / ".dockerignore"
    if ignore.is_file():
        problems += dockerignore_problems(text, ignore.read_text())
    else:
        problems.append(f"no {Path(path).name}.dockerignore beside it: .git and .venv would go into the build context")
    problems += file_credential_problems([path] + ([ignore] if ignore.is_file() else []))
    return problems


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the fix and exit 2 (argparse would add a usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m infra.lint", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="PATH",
                        help="overlay/kustomization directories or a Dockerfile (default: every overlay in "
                             "infra/k8s/overlays and infra/docker/Dockerfile)")
    parser.add_argument("--k8s-version", action="append", metavar="X.Y[.Z]",
                        help=f"Kubernetes version to validate against, repeatable (default: {' and '.join(K8S_VERSIONS)})")
    parser.add_argument("--schemas", metavar="DIR",
                        help=f"directory with the KubeRay CRDs {', '.join(CRD_FILES.values())} "
                             f"(default: ../shared/schemas/kuberay beside the repo; skipped with a note if missing)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"),
                        help="what the overlays run on (default: from the directory name, gpu* or cpu*)")
    return parser


def _targets(parser, raw_paths: list[str]) -> list[tuple[str, Path, str]]:
    """(label, path, 'overlay' or 'dockerfile') for each argument; a bad one exits 2 naming the fix."""
    hint = "pass an overlay directory such as infra/k8s/overlays/gpu, or infra/docker/Dockerfile"
    if not raw_paths:
        overlays = sorted(d for d in OVERLAYS.iterdir()
                          if d.is_dir() and any((d / f).is_file() for f in render.KUSTOMIZATION_FILES))
        return [(shown(d), d, "overlay") for d in overlays] + [(shown(DOCKERFILE), DOCKERFILE, "dockerfile")]
    out = []
    for raw in raw_paths:
        path = Path(raw)
        if path.is_file() and path.name in render.KUSTOMIZATION_FILES:
            path = path.parent
        if not path.exists():
            parser.error(f"{raw}: no such file or directory; {hint}")
        if path.is_dir():
            if not any((path / f).is_file() for f in render.KUSTOMIZATION_FILES):
                parser.error(f"{raw}: no kustomization.yaml in this directory; {hint}")
            out.append((raw.rstrip("/") or raw, path, "overlay"))
        elif "Dockerfile" in path.name and not path.name.endswith(".dockerignore"):
            out.append((raw, path, "dockerfile"))
        else:
            parser.error(f"{raw}: neither a kustomization directory nor a Dockerfile; {hint}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Lint the targets; print one line per problem and a summary. 0 clean, 1 problems, 2 bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    targets = _targets(parser, args.targets)
    versions = []
    for version in args.k8s_version or K8S_VERSIONS:
        if not re.fullmatch(r"\d+\.\d+(\.\d+)?", version):
            parser.error(f"--k8s-version {version}: expected MAJOR.MINOR[.PATCH], e.g. --k8s-version 1.30.0")
        versions.append(version if version.count(".") == 2 else version + ".0")
    notes: list[str] = []
    schemas: Path | None = Path(args.schemas) if args.schemas else KUBERAY_SCHEMAS
    if args.schemas and (not schemas.is_dir() or missing_crd_files(schemas)):
        parser.error(f"--schemas {args.schemas}: needs a directory with {', '.join(CRD_FILES.values())}")
    overlays = any(kind == "overlay" for _, _, kind in targets)
    if overlays and (not schemas.is_dir() or missing_crd_files(schemas)):
        notes.append(f"KubeRay CRD schemas not found at {shown(schemas)}: RayJob/RayCronJob/RayCluster are not "
                     f"schema-checked (pass --schemas DIR)")
        schemas = None
    check_configs = True
    if overlays and not _importable("check_jsonschema"):
        notes.append("check-jsonschema is not installed: KubeRay objects and search configs are not schema-checked "
                     "(pip install -e '.[dev]')")
        schemas, check_configs = None, False
    if overlays and not _importable("kubernetes_validate"):
        notes.append("kubernetes-validate is not installed: built-in objects are not schema-checked "
                     "(pip install -e '.[dev]')")
        versions = []

    total, failing = 0, 0
    for label, path, kind in targets:
        if kind == "overlay":
            problems = lint_overlay(path, versions, schemas, args.accelerator, notes, check_configs)
        else:
            problems = lint_dockerfile(path, notes)
        for problem in problems:
            print(f"{label}: {problem}")
        total += len(problems)
        failing += bool(problems)
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)
    sys.stderr.flush()
    if total:
        print(f"infra.lint: {total} problem{'s' * (total != 1)} in {failing} of {len(targets)} "
              f"target{'s' * (len(targets) != 1)}")
        return 1
    print(f"infra.lint: no problems in {len(targets)} target{'s' * (len(targets) != 1)}: "
          f"{', '.join(label for label, _, _ in targets)}")
    return 0
