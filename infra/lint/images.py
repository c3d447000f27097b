"""Images pinned: every container names a tag or digest (not latest), GPU/CPU pods run the matching image,
and every Ray cluster names the Ray version the image is built with."""
from __future__ import annotations

import re

from .common import containers, env_of, pod_templates, ray_cluster_specs, rayjob_specs, runtime_env


def image_pin_problems(objs: list[dict]) -> list[str]:
    """Every container and init container names its image by tag or digest, and the tag is not `latest`."""
    problems = []
    for obj in objs:
        for where, _, template in pod_templates(obj):
            for container in containers(template):
                image = container.get("image", "")
                if ":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest"):
                    problems.append(f"{where}/{container['name']}: pin the image by tag or digest, not {image!r} "
                                    f"(e.g. lofit-ray:0.1.0-cpu or image@sha256:...)")
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


def ray_version_problems(objs: list[dict], ray_version: str) -> list[str]:
    """Every Ray cluster names the Ray version the image is built with (the Dockerfile's RAY_VERSION)."""
    return [f"{where}: rayVersion {cluster.get('rayVersion')!r} differs from the Dockerfile's RAY_VERSION "
            f"{ray_version!r}"
            for obj in objs for where, cluster in ray_cluster_specs(obj) if cluster.get("rayVersion") != ray_version]
