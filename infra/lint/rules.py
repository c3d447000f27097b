"""What the API server and the KubeRay operator reject that no OpenAPI schema says: names, and the operator's
own validation (ray-operator/controllers/ray/utils/validation.go) that the manifests depend on."""
from __future__ import annotations

import re

import yaml

from ..k8s import render
from .common import NAMESPACE, PART_OF, _version_tuple, ray_cluster_specs, rayjob_specs

# RayJob names end up in RayCluster/Service names: KubeRay caps them at 47 characters
# (MaxRayClusterNameLength 53 - 6). A RayCronJob's RayJobs get a suffix, so leave room.
MAX_RAYJOB_NAME = 47
MAX_RAYCRONJOB_NAME = 36
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Ray token auth needs this Ray (KubeRay rejects authOptions.mode=token below it).
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)


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


def kuberay_rule_problems(obj: dict) -> list[str]:
    """The operator's own validation (ray-operator/controllers/ray/utils/validation.go) we depend on."""
    problems = []
    name = obj["metadata"]["name"]
    limit = {"RayJob": MAX_RAYJOB_NAME, "RayCronJob": MAX_RAYCRONJOB_NAME, "RayCluster": 53}.get(obj["kind"])
    if limit and (len(name) > limit or not DNS1035.match(name)):
        problems.append(f"{obj['kind']}/{name}: name must be a DNS-1035 label of at most {limit} characters")
    for field in ("labels", "annotations"):  # the CRDs' metadata is a bare `type: object`
        for key, value in ((obj.get("metadata") or {}).get(field) or {}).items():
            if not isinstance(value, str):
                problems.append(f"{obj['kind']}/{name}: metadata.{field}.{key} must be a string")
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
