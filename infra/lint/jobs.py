"""RayJobs and their schedulers: jobs clean up their cluster and log to the in-cluster MLflow, pods' references
resolve and containers have resources, and one scheduler (RayCronJob or the kubectl CronJob) at most."""
from __future__ import annotations

from .common import (ENTRYPOINT, RAY_GROUP, RESULTS_PATH, containers, env_of, of_kind, pod_templates, rayjob_specs,
                     runtime_env)
from .network import mlflow_uri


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
    """Everything a pod refers to exists in the same render, and every container has resources (images: images.py)."""
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
