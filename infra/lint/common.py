"""What every check reads: the repository's paths, the rendered objects' shapes, and small helpers."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..k8s import render

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
OVERLAYS = K8S / "overlays"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
CONSTRAINTS = REPO / "constraints.txt"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
RAY_GROUP = "ray.io"

# Everything is deployed into one namespace and labelled as part of lofit-ray (README's commands use -n lofit).
NAMESPACE = "lofit"
PART_OF = "lofit-ray"

# Ray's default storage_path (./ray_results) seen from the pods' working directory.
RESULTS_PATH = "/opt/lofit/app/ray_results"
ENTRYPOINT = re.compile(r"^python (?P<script>jobs/[\w./-]+\.py) --config (?P<config>configs/[\w./-]+\.ya?ml)(?: .*)?$")

# The one Secret with every credential, created out of band (infra/README.md: one `kubectl create secret`):
# the MLflow account and the Flask secret key of the basic-auth app, and Ray's token under the key that
# KubeRay's authOptions.secretName requires. Its references must be required (fail closed); every
# other secretKeyRef must be optional (the manifests must work without that Secret).
AUTH_SECRET = "lofit-auth"
RAY_TOKEN_KEY = "auth_token"  # fixed by KubeRay (RAY_AUTH_TOKEN_SECRET_KEY)

# Ray head/worker pod templates carry this label; the MLflow NetworkPolicy admits only pods with it.
MLFLOW_CLIENT_LABEL = ("lofit-ray/mlflow-client", "true")
MLFLOW_PORT = 5000


class LintError(ValueError):
    """The manifests lack something a checker needs to look at (reported as a problem, not a crash)."""


def of_kind(objs, kind):
    """The objects of one kind, in render order."""
    return [o for o in objs if o.get("kind") == kind]


def one(objs, kind, name=None):
    """The single object of a kind (and name): the checks rely on it being there exactly once."""
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    if len(found) != 1:
        raise LintError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def is_ray(obj) -> bool:
    """KubeRay objects are checked against the CRDs, not kubernetes-validate."""
    return obj.get("apiVersion", "").split("/")[0] == RAY_GROUP


def rayjob_specs(obj) -> list[tuple[str, dict]]:
    """(where, RayJob spec) for a RayJob or a RayCronJob's jobTemplate."""
    if obj["kind"] == "RayJob":
        return [(f"RayJob/{obj['metadata']['name']}", obj["spec"])]
    if obj["kind"] == "RayCronJob":
        return [(f"RayCronJob/{obj['metadata']['name']}.jobTemplate", obj["spec"]["jobTemplate"])]
    return []


def ray_cluster_specs(obj) -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for a RayCluster, or the cluster a RayJob/RayCronJob creates."""
    if obj["kind"] == "RayCluster":
        return [(f"RayCluster/{obj['metadata']['name']}", obj["spec"])]
    return [(where, spec["rayClusterSpec"]) for where, spec in rayjob_specs(obj) if "rayClusterSpec" in spec]


def pod_templates(obj) -> list[tuple[str, str, dict]]:
    """(where, role, pod template) for every pod template in an object, nested Ray ones included."""
    out = []
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    name = obj.get("metadata", {}).get("name")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        out.append((f"{kind}/{name}", "pod", spec["template"]))
    elif kind == "CronJob":
        out.append((f"{kind}/{name}", "pod", spec["jobTemplate"]["spec"]["template"]))
    for where, cluster in ray_cluster_specs(obj):
        out.append((f"{where}.head", "head", cluster["headGroupSpec"]["template"]))
        for group in cluster.get("workerGroupSpecs") or []:
            out.append((f"{where}.{group.get('groupName')}", "worker", group["template"]))
    for where, job in rayjob_specs(obj):
        if "submitterPodTemplate" in job:
            out.append((f"{where}.submitter", "submitter", job["submitterPodTemplate"]))
    return out


def containers(template: dict) -> list[dict]:
    """Init containers and containers of a pod template: both need pinned images and resources."""
    spec = template.get("spec") or {}
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def env_of(container: dict) -> dict:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env") or []}


def runtime_env(job_spec: dict) -> dict:
    """A RayJob's runtimeEnvYAML parsed (the Ray job driver's env_vars live there)."""
    text = job_spec.get("runtimeEnvYAML")
    if not text:
        return {}
    value = yaml.safe_load(text)
    return value if isinstance(value, dict) else {"__invalid__": value}


def all_yaml_files(root: Path = K8S) -> list[Path]:
    """Every YAML file under infra/k8s (or `root`)."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomization_files(directory: Path) -> list[Path]:
    """Every file a kustomization reads, following resources and components into other directories.

    These are the files whose text (comments included) is scanned for credentials.
    """
    seen: set[Path] = set()
    stack = [Path(directory).resolve()]
    while stack:
        kfile = render.find_kustomization(stack.pop())
        if kfile in seen:
            continue
        seen.add(kfile)
        k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
        entries = list(k.get("resources") or []) + list(k.get("components") or [])
        entries += [patch["path"] for patch in k.get("patches") or [] if "path" in patch]
        for entry in entries:
            path = (kfile.parent / entry).resolve()
            if path.is_dir():
                stack.append(path)
            elif path.is_file():
                seen.add(path)
    return sorted(seen)


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _version_tuple(text) -> tuple[int, ...] | None:
    """'2.60.0' -> (2, 60, 0); None when it is not MAJOR.MINOR[.PATCH]."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(g or 0) for g in match.groups()) if match else None
