"""Entrypoints and search configs: each RayJob's entrypoint names a script and a config that exist (in the repository
or a mounted ConfigMap), and one trial of that config fits the cluster the RayJob creates."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from .common import ENTRYPOINT, REPO, LintError, of_kind, rayjob_specs, shown
from .schema import REGENERATE_CONFIG_SCHEMA, SEARCH_CONFIG_SCHEMA, search_config_schema_problems


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


def effective_settings(data: dict, schema: dict) -> dict:
    """The dtype and scaling section a config runs with: its own values over the schema's defaults."""
    props = schema["properties"]
    scaling = {k: v.get("default") for k, v in props["scaling"]["properties"].items()}
    scaling.update(data.get("scaling") or {})
    return {"dtype": data.get("dtype", props["dtype"].get("default")), "scaling": scaling}


def search_config_problems(job: dict, settings: dict, accelerator: str) -> list[str]:
    """Does one trial of this search fit the Ray cluster the RayJob creates? `settings`: effective_settings()."""
    problems = []
    cluster = job["rayClusterSpec"]
    head_cpus = float(cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus", "nan"))
    pods = []  # (cpus, gpus) per Ray node that can run trials
    for group in cluster.get("workerGroupSpecs") or []:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pods += [(_cpu_quantity(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0)))] * group.get("replicas", 0)
    if head_cpus > 0:
        pods.append((head_cpus, 0))
    sc, dtype = settings["scaling"], settings["dtype"]
    need_cpu = sc["trial_cpus"] + sc["num_workers"] * sc["cpus_per_worker"]
    if need_cpu > sum(c for c, _ in pods):
        problems.append(f"one trial needs {need_cpu} CPUs (scaling.trial_cpus + num_workers * cpus_per_worker), "
                        f"the cluster has {sum(c for c, _ in pods)}: lower them or add worker CPUs")
    if any(sc["cpus_per_worker"] > c for c, _ in pods):
        problems.append(f"a Ray Train worker needs {sc['cpus_per_worker']} CPUs on one pod (scaling.cpus_per_worker)")
    gpus = sum(g for _, g in pods)
    if accelerator == "gpu":
        if not sc["use_gpu"] or dtype != "bfloat16":
            problems.append("the GPU overlay must run a config with scaling.use_gpu: true and dtype: bfloat16")
        if sc["num_workers"] > gpus:
            problems.append(f"{sc['num_workers']} GPU train workers, but the worker pods have {gpus} GPUs")
    elif sc["use_gpu"] or dtype != "float32":
        problems.append("CPU variants must run a config with scaling.use_gpu: false and dtype: float32")
    return problems


def search_configs_problems(objs: list[dict], accelerator: str, pending: list | None = None,
                            schema_file: Path = SEARCH_CONFIG_SCHEMA) -> list[str]:
    """Every search config a RayJob runs matches the config schema the core writes, and one trial fits the cluster.

    Configs not written yet go to `pending`. Each config is checked from a copy, as it may come from a ConfigMap
    rather than the repository.
    """
    if not Path(schema_file).is_file():
        return [f"{shown(schema_file)} missing: run `{REGENERATE_CONFIG_SCHEMA}`"]
    schema = json.loads(Path(schema_file).read_text())
    found = []  # (label, job, copy)
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
            found.append((f"{where} ({match['config']})", job, path))
        problems = search_config_schema_problems([(label, path) for label, _, path in found], schema_file)
        problems = [f"{p} (fix the config; the keys and types are those of {shown(schema_file)})" for p in problems]
        for label, job, path in found:
            if any(p.startswith(label + ":") for p in problems):
                continue  # the fit needs a config that reads
            data = yaml.safe_load(path.read_text()) or {}
            problems += [f"{label}: {p}" for p in search_config_problems(job, effective_settings(data, schema),
                                                                           accelerator)]
    return problems
