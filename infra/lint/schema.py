"""Schema validation, left to the tools made for it; this module only feeds them and words their answers.

* Built-in kinds, and the pod templates nested in KubeRay objects (as core/v1 PodTemplates, which the CRDs do
  not describe): `kubernetes-validate`, strict (unknown fields fail), with the OpenAPI schemas its wheel ships
  (offline), for the oldest and newest Kubernetes versions the manifests support.
* KubeRay kinds (RayJob, RayCronJob, RayCluster): `check-jsonschema` against each served version's
  openAPIV3Schema in the CRDs in ../shared/schemas/kuberay, made strict the way the API server prunes.
* Search configs a RayJob runs: `check-jsonschema` against infra/search-config.schema.json, which
  `python scripts/gen_config_schema.py` writes from lofit_ray's config dataclasses (nothing here imports lofit_ray).
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .common import INFRA, KUBERAY_SCHEMAS, is_ray, pod_templates
from .rules import kuberay_rule_problems

# Oldest and newest Kubernetes minors the manifests must validate against (CronJob.timeZone is
# GA since 1.27; 1.30 is the oldest still common on managed offerings).
K8S_VERSIONS = ("1.30.0", "1.35.0")
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
SEARCH_CONFIG_SCHEMA = INFRA / "search-config.schema.json"
REGENERATE_CONFIG_SCHEMA = "python scripts/gen_config_schema.py"


def core_schema_errors(obj: dict, version: str) -> list[str]:
    """One built-in object against Kubernetes' OpenAPI schema (strict: a typo'd field is an error)."""
    import kubernetes_validate

    desired = version
    latest = kubernetes_validate.latest_version()
    if tuple(map(int, version.split(".")[:2])) > tuple(map(int, latest.split(".")[:2])):
        desired = latest + ".0"
    try:
        kubernetes_validate.validate(obj, desired, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return [f"{obj['kind']}/{obj['metadata'].get('name')}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{obj['kind']}/{obj['metadata'].get('name')}: no schema in Kubernetes {desired}: {exc}"]
    return []


def pod_template_errors(where: str, template: dict, version: str) -> list[str]:
    """A pod template nested in a KubeRay object, validated as a core/v1 PodTemplate (the CRDs don't)."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "pod-template-check"},
               "template": template}
    return [f"{where}: {e.split(': ', 1)[1]}" for e in core_schema_errors(wrapped, version)]


def core_schema_problems(objs: list[dict], version: str) -> list[str]:
    """Built-in objects, and the pod templates inside KubeRay objects, for one Kubernetes version."""
    errors = []
    for obj in objs:
        if is_ray(obj):
            for where, _, template in pod_templates(obj):
                errors += pod_template_errors(where, template, version)
        else:
            errors += core_schema_errors(obj, version)
    return errors


def _strict(node):
    """Reject unknown fields wherever the schema lists properties (the API server prunes them)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) if k != "properties" else {pk: _strict(pv) for pk, pv in v.items()}
           for k, v in node.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def missing_crd_files(schemas: Path) -> list[str]:
    """The KubeRay CRD files a schema directory lacks."""
    return [name for name in CRD_FILES.values() if not (Path(schemas) / name).is_file()]


@functools.lru_cache(maxsize=None)
def _workdir() -> Path:
    """A scratch directory for this process: the schema and instance files check-jsonschema reads."""
    path = Path(tempfile.mkdtemp(prefix="lofit-lint-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def crd_schema_files(schemas: Path = KUBERAY_SCHEMAS) -> dict:
    """{(apiVersion, kind): JSON Schema file} for every served version of the KubeRay CRDs in `schemas`."""
    out = {}
    for kind, filename in CRD_FILES.items():
        path = Path(schemas) / filename
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~56k lines
        crd = next(d for d in yaml.load_all(path.read_text(), Loader=loader)
                   if d and d.get("kind") == "CustomResourceDefinition")
        if crd["spec"]["names"]["kind"] != kind:
            raise ValueError(f"{path}: defines {crd['spec']['names']['kind']}, expected {kind}")
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                target = _workdir() / f"{kind}-{version['name']}.schema.json"
                target.write_text(json.dumps(_strict(version["schema"]["openAPIV3Schema"])))
                out[(f"{crd['spec']['group']}/{version['name']}", kind)] = target
    return out


def check_jsonschema(schema: Path, instances: list[tuple[str, object]]) -> list[str]:
    """Run check-jsonschema on (label, object or file) pairs against `schema`: "<label>: <path>: <message>" per error.

    Objects are written out as JSON; files (YAML or JSON) are passed as they are.
    """
    if not instances:
        return []
    files, labels = [], {}
    batch = Path(tempfile.mkdtemp(dir=_workdir()))
    for n, (label, instance) in enumerate(instances):
        if isinstance(instance, Path):
            path = instance
        else:
            path = batch / f"{n}.json"
            path.write_text(json.dumps(instance))
        files.append(str(path))
        labels[str(path)] = label
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema),
                             "--output-format", "json", *files], capture_output=True, text=True)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"check-jsonschema failed (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-500:]}") from None
    out = []
    for error in report.get("errors", []):
        path = error["path"].removeprefix("$").lstrip(".") or "(top level)"
        out.append(f"{labels.get(error['filename'], error['filename'])}: {path}: {error['message']}")
    for error in report.get("parse_errors", []):
        out.append(f"{labels.get(error.get('filename'), error.get('filename'))}: does not parse: "
                   f"{error.get('message')}")
    return out


def kuberay_schema_problems(objs: list[dict], schemas: Path = KUBERAY_SCHEMAS) -> list[str]:
    """KubeRay objects against their CRDs (one check-jsonschema run per served version and kind)."""
    files = crd_schema_files(Path(schemas))
    problems, batches = [], {}
    for obj in objs:
        if not is_ray(obj):
            continue
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        key = (obj["apiVersion"], obj["kind"])
        if key not in files:
            problems.append(f"{where}: {obj['apiVersion']} {obj['kind']} is not a served version of a KubeRay CRD")
        else:
            batches.setdefault(key, []).append((where, obj))
    for key, instances in batches.items():
        problems += check_jsonschema(files[key], instances)
    return problems


def crd_schema_errors(obj: dict, schemas: Path = KUBERAY_SCHEMAS) -> list[str]:
    """One KubeRay object against its CRD: what the API server would reject or silently prune."""
    return kuberay_schema_problems([obj], schemas)


def kuberay_problems(objs: list[dict], schemas: Path | None = KUBERAY_SCHEMAS) -> list[str]:
    """KubeRay objects against their CRDs (skipped when `schemas` is None) and the operator's own rules."""
    errors = kuberay_schema_problems(objs, schemas) if schemas is not None else []
    for obj in objs:
        if is_ray(obj):
            errors += kuberay_rule_problems(obj)
    return errors


def search_config_schema_problems(configs: list[tuple[str, Path]], schema: Path = SEARCH_CONFIG_SCHEMA) -> list[str]:
    """Search config files against the schema the core writes: unknown keys and wrongly typed values."""
    if not Path(schema).is_file():
        return [f"{schema} missing: run `{REGENERATE_CONFIG_SCHEMA}`"]
    return check_jsonschema(Path(schema), configs)
