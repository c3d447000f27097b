"""Tests for infra/: the Kubernetes manifests and the image pass the checks of infra/lint/.

The checkers (rendering via infra/k8s/render.py, schema validation by kubernetes-validate and
check-jsonschema, auth, secrets, MLflow exposure, images, RayJob clean-up, entrypoints, GPU/CPU
overlays, the Dockerfile) live in infra/lint/, one module per concern, which
users run on their own overlays as `python -m infra.lint`. Here they run on every deployable
variant: base, each overlay, and each overlay with the kubectl CronJob fallback instead of the
RayCronJob (older KubeRay operators).

Each checker returns a list of problems; the "checks can fail" tests feed each one a broken
copy and expect a complaint, so a checker that silently passes everything is caught.
"""
from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from infra.k8s import render  # noqa: E402
from infra.lint.auth import mlflow_auth_problems, mlflow_server_container, ray_auth_problems  # noqa: E402
from infra.lint.common import (  # noqa: E402
    AUTH_SECRET, DOCKERFILE, DOCKERIGNORE, K8S, KUBERAY_SCHEMAS, MLFLOW_CLIENT_LABEL, all_yaml_files, env_of, is_ray,
    kustomization_files, of_kind, one, pod_templates, ray_cluster_specs, rayjob_specs, runtime_env,
)
from infra.lint.configs import entrypoint_problems, search_configs_problems  # noqa: E402
from infra.lint.docker import (  # noqa: E402
    constraints_problems, dockerfile_copy_sources, dockerfile_global_args, dockerfile_problems, dockerignore_problems,
)
from infra.lint.images import accelerator_problems, image_pin_problems, ray_version_problems  # noqa: E402
from infra.lint.jobs import kubectl_cron_problems, rayjob_problems, reference_problems, schedule_problems  # noqa: E402
from infra.lint.network import mlflow_network_policy_problems, mlflow_problems, mlflow_service  # noqa: E402
from infra.lint.rules import MAX_RAYJOB_NAME, kuberay_rule_problems, name_problems  # noqa: E402
from infra.lint.schema import (  # noqa: E402
    K8S_VERSIONS, SEARCH_CONFIG_SCHEMA, core_schema_errors, core_schema_problems, crd_schema_errors, kuberay_problems,
    pod_template_errors,
)
from infra.lint.secrets import file_credential_problems, secret_problems  # noqa: E402


# ------------------------------------------------------------------------ variants
def _with_components(overlay: str, components: list[str]):
    def build():
        directory = K8S / "overlays" / overlay
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        k["components"] = components
        return render.build_from(k, directory)
    return build


# Everything that can be deployed: base alone, each overlay, and each overlay with the
# kubectl CronJob fallback instead of the RayCronJob (older KubeRay operators).
VARIANTS = {
    "base": lambda: render.build(K8S / "base"),
    "cpu": lambda: render.build(K8S / "overlays" / "cpu"),
    "gpu": lambda: render.build(K8S / "overlays" / "gpu"),
    "cpu-kubectl-cron": _with_components("cpu", ["../../components/kubectl-cronjob"]),
    "gpu-kubectl-cron": _with_components("gpu", ["../../components/kubectl-cronjob"]),
}


@functools.lru_cache(maxsize=None)
def _rendered(variant: str) -> tuple:
    return tuple(VARIANTS[variant]())


def rendered(variant: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(variant)))


def need_check_jsonschema():
    """The KubeRay CRD and search-config checks run check-jsonschema (the dev extra); an older venv lacks it."""
    import importlib.util

    if importlib.util.find_spec("check_jsonschema") is None:
        skip_or_fail("check-jsonschema is not installed (pip install -e '.[dev]'): KubeRay objects and search "
                     "configs are not schema-checked here")


# ============================================================================ tests
def test_every_manifest_file_is_yaml_and_used():
    referenced = {path for kfile in K8S.rglob("kustomization.yaml") for path in kustomization_files(kfile.parent)}
    files = all_yaml_files()
    assert files, "no YAML under infra/k8s"
    for path in files:
        list(yaml.safe_load_all(path.read_text()))  # raises on a syntax error
    orphans = [str(p.relative_to(REPO)) for p in files if p.resolve() not in referenced]
    assert not orphans, f"YAML files no kustomization uses: {orphans}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_renders_with_valid_unique_names(variant):
    objs = rendered(variant)
    assert objs
    problems = name_problems(objs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_core_objects_match_kubernetes_schema(variant, version):
    errors = core_schema_problems(rendered(variant), version)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kuberay_objects_match_crd_schema(variant):
    need_check_jsonschema()
    if not KUBERAY_SCHEMAS.is_dir():
        skip_or_fail(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (shared/ is not checked out beside "
                    f"the repo); RayJob/RayCronJob are not schema-checked here")
    objs = rendered(variant)
    assert [o for o in objs if is_ray(o)], "expected KubeRay objects"
    errors = kuberay_problems(objs)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_secret_values_in_manifests(variant):
    assert not secret_problems(rendered(variant))


def test_no_credentials_in_infra_files():
    hits = file_credential_problems(all_yaml_files() + [DOCKERFILE])
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mlflow_is_in_cluster_only_and_reachable(variant):
    assert not mlflow_problems(rendered(variant))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_locked_down_by_default(variant):
    objs = rendered(variant)
    assert not mlflow_auth_problems(objs)
    assert not ray_auth_problems(objs)
    assert not mlflow_network_policy_problems(objs)
    # What the checks rely on, stated plainly: basic auth on, token auth on every Ray cluster, no Secret shipped.
    assert "--app-name basic-auth" in mlflow_server_container(objs)["args"][0]
    clusters = [cluster for obj in objs for _, cluster in ray_cluster_specs(obj)]
    assert clusters and all(c["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET} for c in clusters)
    assert not of_kind(objs, "Secret")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rayjobs_clean_up_and_log_to_mlflow(variant):
    assert not rayjob_problems(rendered(variant))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_references_resolve_and_containers_have_resources(variant):
    assert not reference_problems(rendered(variant))
    assert not image_pin_problems(rendered(variant))


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_overlays_schedule_with_raycronjob(variant):
    objs = rendered(variant)
    assert len(of_kind(objs, "RayCronJob")) == 1
    assert not of_kind(objs, "CronJob"), "RayCronJob and the kubectl CronJob would both schedule searches"
    assert not schedule_problems(objs)


@pytest.mark.parametrize("variant", ["cpu-kubectl-cron", "gpu-kubectl-cron"])
def test_kubectl_cronjob_fallback(variant):
    objs = rendered(variant)
    assert not of_kind(objs, "RayCronJob")
    assert not kubectl_cron_problems(objs)
    assert not schedule_problems(objs)


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh to syntax-check the CronJob script")
def test_kubectl_cronjob_script_is_valid_sh():
    cron = one(rendered("cpu-kubectl-cron"), "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    result = subprocess.run(["sh", "-n"], input=container["args"][0], text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    # Kubernetes expands $(VAR) in args; '$$' would silently become '$'.
    assert "$$" not in container["args"][0]


FAKE_KUBECTL = r'''#!{python}
"""Stands in for kubectl: answers the calls the CronJob script makes, records the rest."""
import json, os, sys
from pathlib import Path
args, out = sys.argv[1:], Path(os.environ["FAKE_OUT"])
with open(out / "calls.txt", "a") as fh:
    fh.write(" ".join(args) + "\n")
if "create" in args:
    (out / "created.json").write_text(sys.stdin.read())
elif "delete" in args:
    with open(out / "deleted.txt", "a") as fh:
        fh.write(" ".join(a for a in args if a.startswith("rayjob")) + "\n")
elif "-o" in args and args[args.index("-o") + 1] == "name":
    print("\n".join(os.environ["FAKE_NAMES"].split()))
elif any(a.startswith("jsonpath={{range") for a in args):
    print("\n".join(os.environ["FAKE_STATUSES"].split()))
elif "jsonpath={{.spec}}" in args:
    if os.environ["FAKE_SPEC"] == "":
        sys.exit("Error from server (NotFound)")
    print(os.environ["FAKE_SPEC"], end="")
else:
    sys.exit("unexpected kubectl call: " + " ".join(args))
'''


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh to run the CronJob script")
@pytest.mark.parametrize("statuses, created", [("Complete Failed", True), ("Complete Running", False)])
def test_kubectl_cronjob_script_clones_the_rayjob(tmp_path, statuses, created):
    import json

    objs = rendered("gpu-kubectl-cron")
    rayjob = _rayjob(objs)
    container = one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    names = " ".join(f"rayjob.ray.io/lofit-search-{i}" for i in range(7))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_OUT": str(tmp_path), "FAKE_STATUSES": statuses,
           "FAKE_NAMES": names, "FAKE_SPEC": json.dumps(rayjob["spec"])}
    for item in container["env"]:
        env[item["name"]] = item.get("value", "lofit")  # POD_NAMESPACE comes from the downward API
    result = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    if not created:
        assert not (tmp_path / "created.json").exists() and "skipping" in result.stdout
        return
    obj = json.loads((tmp_path / "created.json").read_text())
    assert obj["kind"] == "RayJob" and obj["metadata"]["generateName"] == "lofit-search-"
    assert obj["metadata"]["labels"]["lofit-ray/scheduled-by"] == "cronjob"
    assert obj["spec"] == rayjob["spec"], "the scheduled run must be an exact copy of the RayJob's spec"
    obj["metadata"]["name"] = "lofit-search-abcde"  # what generateName turns into
    if KUBERAY_SCHEMAS.is_dir():
        assert not crd_schema_errors(obj)
    deleted = (tmp_path / "deleted.txt").read_text().split()
    assert deleted == ["rayjob.ray.io/lofit-search-0", "rayjob.ray.io/lofit-search-1"], "keeps the newest KEEP=5"
    calls = (tmp_path / "calls.txt").read_text()
    assert all(line.startswith("-n lofit ") for line in calls.splitlines()), calls


@pytest.mark.parametrize("variant", ["cpu", "cpu-kubectl-cron"])
def test_cpu_variants(variant):
    assert not accelerator_problems(rendered(variant), "cpu")


@pytest.mark.parametrize("variant", ["gpu", "gpu-kubectl-cron"])
def test_gpu_variants(variant):
    objs = rendered(variant)
    assert not accelerator_problems(objs, "gpu")
    workers = [t for o in objs for _, role, t in pod_templates(o) if role == "worker"]
    assert workers and all(
        any(t.get("key") == "nvidia.com/gpu" for t in w["spec"].get("tolerations") or []) for w in workers)



def test_entrypoint_scripts_and_configs_exist():
    problems, pending = [], []
    for variant in VARIANTS:
        problems += [f"{variant}: {p}" for p in entrypoint_problems(rendered(variant), pending)]
    assert not problems, "entrypoints name files that do not exist (repo or mounted ConfigMap):\n" + "\n".join(problems)
    if pending:
        skip_or_fail(f"not written yet (jobs/ or configs/ has no such files at all): {sorted(set(pending))}; "
                    f"the existence check runs once they land")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_search_configs_load_and_fit_the_cluster(variant):
    need_check_jsonschema()
    accelerator = "gpu" if variant.startswith("gpu") else "cpu"
    objs = rendered(variant)
    pending = []
    problems = search_configs_problems(objs, accelerator, pending)
    assert not problems, "\n".join(problems)
    if len(pending) == len([job for obj in objs for job in rayjob_specs(obj)]):
        skip_or_fail(f"search configs not written yet: {sorted(set(pending))}")


def test_rayversion_matches_image():
    ray_version = dockerfile_global_args(DOCKERFILE.read_text())["RAY_VERSION"]
    problems = [f"{variant}: {p}" for variant in VARIANTS for p in ray_version_problems(rendered(variant), ray_version)]
    assert not problems, "\n".join(problems)


def test_dockerfile():
    assert not dockerfile_problems(DOCKERFILE.read_text())
    assert not constraints_problems((REPO / "constraints.txt").read_text())


def test_dockerfile_copies_exist():
    missing, pending = dockerfile_copy_sources(DOCKERFILE.read_text())
    assert not missing, f"COPY sources missing: {missing}"
    if pending:
        skip_or_fail(f"{pending} not written yet: the image cannot be built until they exist")


def test_dockerignore_keeps_context_small():
    problems = dockerignore_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text())
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------- the checks can fail
def _rayjob(objs):
    return one(objs, "RayJob")


def test_checks_catch_broken_manifests():
    base = rendered("cpu")

    objs = copy.deepcopy(base)
    mlflow_service(objs)["spec"]["type"] = "LoadBalancer"
    assert mlflow_problems(objs)

    objs = copy.deepcopy(base)
    env = env_of(one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0])
    env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"] = "localhost:*"
    assert mlflow_problems(objs)

    objs = copy.deepcopy(base)
    objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"uri": "x"}})
    assert secret_problems(objs)

    objs = copy.deepcopy(base)
    container = one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "DB_PASSWORD", "value": "hunter2"})
    assert secret_problems(objs)

    for field, value in (("shutdownAfterJobFinishes", False), ("ttlSecondsAfterFinished", 0),
                         ("entrypoint", "python search.py"), ("runtimeEnvYAML", "env_vars: {}")):
        objs = copy.deepcopy(base)
        _rayjob(objs)["spec"][field] = value
        assert rayjob_problems(objs), field

    objs = copy.deepcopy(base)
    one(objs, "RayCronJob")["spec"]["jobTemplate"]["entrypoint"] += " --limit 1"
    assert rayjob_problems(objs)

    objs = copy.deepcopy(base)
    _rayjob(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0][
        "persistentVolumeClaim"]["claimName"] = "nope"
    assert reference_problems(objs)

    assert accelerator_problems(rendered("cpu"), "gpu")
    assert accelerator_problems(rendered("gpu"), "cpu")

    objs = rendered("cpu-kubectl-cron")
    one(objs, "Role")["rules"][0]["verbs"] = ["get"]
    assert kubectl_cron_problems(objs)


def _auth_config(objs) -> dict:
    return one(objs, "ConfigMap", "lofit-mlflow-auth")["data"]


def test_auth_checks_catch_broken_manifests():
    base = rendered("cpu")

    # MLflow without its basic-auth app; the `--app-name=basic-auth` spelling counts as on.
    objs = copy.deepcopy(base)
    server = mlflow_server_container(objs)
    server["args"][0] = server["args"][0].replace("--app-name basic-auth", "")
    assert any("--app-name basic-auth" in p for p in mlflow_auth_problems(objs))
    server["args"][0] = server["args"][0].replace("exec mlflow server", "exec mlflow server --app-name=basic-auth")
    assert not mlflow_auth_problems(objs)

    # The Flask key as a literal: not from the Secret, and a plain-text credential.
    objs = copy.deepcopy(base)
    env = mlflow_server_container(objs)["env"]
    env[:] = [{"name": e["name"], "value": "hunter2"} if e["name"] == "MLFLOW_FLASK_SERVER_SECRET_KEY" else e
              for e in env]
    assert mlflow_auth_problems(objs) and secret_problems(objs)

    # The user store off the volume (the packaged relative default), or no auth config at all.
    objs = copy.deepcopy(base)
    _auth_config(objs)["basic_auth.ini"] = _auth_config(objs)["basic_auth.ini"].replace(
        "sqlite:////mlflow/basic_auth.db", "sqlite:///basic_auth.db")
    assert mlflow_auth_problems(objs)
    objs = copy.deepcopy(base)
    mlflow_server_container(objs)["env"] = [e for e in mlflow_server_container(objs)["env"]
                                            if e["name"] != "MLFLOW_AUTH_CONFIG_PATH"]
    assert mlflow_auth_problems(objs)

    # A credential reference to lofit-auth that lets the pod start without the Secret.
    objs = copy.deepcopy(base)
    env_of(_head_container(objs))["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] = True
    assert secret_problems(objs)


@pytest.mark.parametrize("variant", ["gpu", "gpu-kubectl-cron"])
def test_ray_auth_check_catches_pods_without_auth(variant):
    base = rendered(variant)

    # No token auth on the RayJob (and, on the fallback, on the RayJob it clones) or on the RayCronJob.
    objs = copy.deepcopy(base)
    del _rayjob(objs)["spec"]["rayClusterSpec"]["authOptions"]
    assert any("without token auth" in p for p in ray_auth_problems(objs))
    if of_kind(base, "RayCronJob"):
        objs = copy.deepcopy(base)
        del one(objs, "RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]["authOptions"]
        assert ray_auth_problems(objs)

    # The token from a Secret clients are not told about; Kubernetes-delegated auth (RayCluster only).
    for field, value in (("secretName", "other-secret"), ("mode", "disabled"), ("enableK8sTokenAuth", True)):
        objs = copy.deepcopy(base)
        _rayjob(objs)["spec"]["rayClusterSpec"]["authOptions"][field] = value
        assert ray_auth_problems(objs), field

    # The same by hand (env on head and workers) counts as on; half of it does not.
    objs = copy.deepcopy(base)
    cluster = _rayjob(objs)["spec"]["rayClusterSpec"]
    del cluster["authOptions"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        template["spec"]["containers"][0]["env"] += [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": AUTH_SECRET, "key": "auth_token"}}}]
    assert not ray_auth_problems(objs)
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].pop()
    assert ray_auth_problems(objs)

    # A worker that switches token auth off again (the operator only adds RAY_AUTH_MODE when absent).
    objs = copy.deepcopy(base)
    worker = _rayjob(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})
    assert ray_auth_problems(objs)

    # A Ray pod without the MLflow password, or with one from another key than the server's account.
    objs = copy.deepcopy(base)
    worker = _rayjob(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"] = [e for e in worker["env"] if e["name"] != "MLFLOW_TRACKING_PASSWORD"]
    assert ray_auth_problems(objs)
    objs = copy.deepcopy(base)
    env_of(_head_container(objs))["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] = "other"
    assert ray_auth_problems(objs)

    # KubeRay rejects token auth below Ray 2.52.
    job = copy.deepcopy(_rayjob(base))
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.51.0"
    assert kuberay_rule_problems(job)


def _mlflow_policy(objs) -> dict:
    return one(objs, "NetworkPolicy", "lofit-mlflow")


def test_network_policy_check_catches_broader_rules():
    base = rendered("cpu-kubectl-cron")
    peer = {"podSelector": {"matchLabels": dict([MLFLOW_CLIENT_LABEL])}}
    broken = {
        "every pod of the namespace": lambda p: p["ingress"][0].update({"from": [{"podSelector": {}}]}),
        "a namespaceSelector": lambda p: p["ingress"][0]["from"].append({"namespaceSelector": {}}),
        "a namespaceSelector beside the podSelector": lambda p: p["ingress"][0]["from"][0].update(
            {"namespaceSelector": {}}),
        "an ipBlock": lambda p: p["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
        "no from": lambda p: p["ingress"][0].pop("from"),
        "no ports": lambda p: p["ingress"][0].pop("ports"),
        "another port": lambda p: p["ingress"][0]["ports"].append({"port": 22, "protocol": "TCP"}),
        "a port range": lambda p: p["ingress"][0]["ports"][0].update({"endPort": 6000}),
        "a second, open rule": lambda p: p["ingress"].append({"ports": [{"port": 5000}]}),
        "a selector without positive requirement": lambda p: p["ingress"][0].update({"from": [{"podSelector": {
            "matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}}]}),
        "a selector on labels no Ray pod template has": lambda p: p["ingress"][0].update({"from": [{"podSelector": {
            "matchLabels": {"app.kubernetes.io/created-by": "kuberay-operator"}}}]}),
        "the policy not isolating ingress": lambda p: p.update({"policyTypes": ["Egress"]}),
        "the policy selecting other pods": lambda p: p.update({"podSelector": {"matchLabels": {"app": "x"}}}),
    }
    for what, breaks in broken.items():
        objs = copy.deepcopy(base)
        breaks(_mlflow_policy(objs)["spec"])
        assert mlflow_network_policy_problems(objs), what

    # A second policy that opens MLflow to everyone adds up with the first.
    objs = copy.deepcopy(base)
    wide = copy.deepcopy(_mlflow_policy(objs))
    wide["metadata"]["name"] = "allow-all"
    wide["spec"]["ingress"] = [{}]
    assert mlflow_network_policy_problems(objs + [wide])

    # The selector also matches the scheduler CronJob's pod, or a Ray worker lost its label.
    objs = copy.deepcopy(base)
    one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"].update(
        dict([MLFLOW_CLIENT_LABEL]))
    assert any("not Ray pods" in p for p in mlflow_network_policy_problems(objs))
    objs = copy.deepcopy(base)
    del _rayjob(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["metadata"]
    assert any("does not admit" in p for p in mlflow_network_policy_problems(objs))

    objs = [o for o in copy.deepcopy(base) if o["kind"] != "NetworkPolicy"]
    assert mlflow_network_policy_problems(objs)
    assert _mlflow_policy(base)["spec"]["ingress"][0]["from"] == [peer]


@pytest.mark.parametrize("version", K8S_VERSIONS[:1])
def test_schema_checks_catch_broken_fields(version):
    objs = rendered("cpu")
    svc = copy.deepcopy(mlflow_service(objs))
    svc["spec"]["tipe"] = "ClusterIP"
    assert core_schema_errors(svc, version)
    head = copy.deepcopy(_rayjob(objs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    head["spec"]["containers"][0]["resource"] = {}
    assert pod_template_errors("head", head, version)


def test_crd_checks_catch_broken_fields():
    need_check_jsonschema()
    if not KUBERAY_SCHEMAS.is_dir():
        skip_or_fail(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS}")
    objs = rendered("gpu")
    broken = copy.deepcopy(_rayjob(objs))
    broken["spec"]["shutdownAfterJobFinish"] = True  # typo: the API server would prune it
    assert crd_schema_errors(broken)
    broken = copy.deepcopy(_rayjob(objs))
    broken["spec"]["ttlSecondsAfterFinished"] = "600"
    assert crd_schema_errors(broken)
    cron = copy.deepcopy(one(objs, "RayCronJob"))
    cron["spec"]["concurrencyPolicy"] = "Forbid"  # not a RayCronJob field in this CRD
    assert crd_schema_errors(cron)
    cron = copy.deepcopy(one(objs, "RayCronJob"))
    del cron["spec"]["schedule"]
    assert crd_schema_errors(cron)
    long_name = copy.deepcopy(_rayjob(objs))
    long_name["metadata"]["name"] = "x" * (MAX_RAYJOB_NAME + 1)
    assert kuberay_rule_problems(long_name)


def test_dockerfile_check_catches_unpinned_torch():
    text = DOCKERFILE.read_text()
    torch_line = "RUN pip install -c constraints.txt \\"
    assert torch_line in text
    assert dockerfile_problems(text.replace(torch_line, "RUN pip install \\"))
    assert dockerfile_problems(text.replace("ENV DS_ACCELERATOR=cpu", "ENV DS_ACCELERATOR_X=cpu"))
    assert dockerfile_problems(text.replace("AS cpu", "AS cpu-image"))



def _head_container(objs):
    return _rayjob(objs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_credential_checks_catch_plain_text_secrets(tmp_path):
    base = rendered("gpu")
    broken = []

    objs = copy.deepcopy(base)
    _head_container(objs).setdefault("env", []).append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})
    broken.append(("env literal", objs))

    objs = copy.deepcopy(base)
    one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0].setdefault("args", []).append(
        "--backend-store-uri=postgresql://user:hunter2@host/db")
    broken.append(("URI in args", objs))

    objs = copy.deepcopy(base)
    one(objs, "ConfigMap", "lofit-search-config-gpu")["data"]["MLFLOW_TRACKING_PASSWORD"] = "hunter2"
    broken.append(("ConfigMap data", objs))

    objs = copy.deepcopy(base)
    job = _rayjob(objs)["spec"]
    env = runtime_env(job)
    env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] = "hunter2"
    job["runtimeEnvYAML"] = yaml.safe_dump(env)
    broken.append(("runtimeEnvYAML env_vars", objs))

    objs = rendered("gpu-kubectl-cron")
    one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0] += (
        "export MLFLOW_TRACKING_PASSWORD=hunter2\n")
    broken.append(("assignment in a script", objs))

    objs = copy.deepcopy(base)
    env_of(one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0])["BACKEND_URI"][
        "valueFrom"]["secretKeyRef"]["optional"] = False
    broken.append(("required secretKeyRef", objs))

    for what, objs in broken:
        problems = secret_problems(objs)
        assert problems, what
        assert not any("hunter2" in p for p in problems), f"{what}: the report must not repeat the secret"

    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("# backend: postgresql://user:hunter2@db/mlflow\ndata:\n  MLFLOW_TRACKING_PASSWORD: hunter2\n"
                     "---\nkind: Secret\n")
    problems = file_credential_problems([leaky])
    assert len(problems) == 3 and not any("hunter2" in p for p in problems), problems


def test_lint_checks_catch_broken_input(tmp_path):
    objs = rendered("cpu")
    one(objs, "Service", "lofit-mlflow")["metadata"]["namespace"] = "default"
    assert name_problems(objs)
    objs = rendered("cpu")
    assert name_problems(objs + [copy.deepcopy(objs[0])])

    assert schedule_problems(rendered("cpu") + of_kind(rendered("cpu-kubectl-cron"), "CronJob"))
    assert ray_version_problems(rendered("cpu"), "0.0.1")

    objs = rendered("cpu")
    _rayjob(objs)["spec"]["entrypoint"] = "python jobs/search.py --config configs/no_such_config.yaml"
    assert entrypoint_problems(objs)

    text = DOCKERFILE.read_text()
    assert constraints_problems("numpy==2.0\n")
    assert dockerignore_problems(text, ".git\n")
    assert dockerignore_problems(text, ".git\n.venv\nlofit_ray\n")
    missing, _ = dockerfile_copy_sources(text, context=tmp_path)
    assert missing


def test_search_config_check_catches_a_misfit():
    need_check_jsonschema()
    objs, pending = rendered("cpu"), []
    problems = search_configs_problems(objs, "gpu", pending)
    if pending:
        skip_or_fail(f"search configs not written yet: {pending}")
    assert any("use_gpu: true and dtype: bfloat16" in p for p in problems), problems

    # A config the core would reject: check-jsonschema against the schema the core writes names the key.
    objs = rendered("gpu")
    data = one(objs, "ConfigMap", "lofit-search-config-gpu")["data"]
    key = next(iter(data))
    data[key] = data[key] + "\nscaling_typo: 1\n"
    problems = search_configs_problems(objs, "gpu")
    assert any("scaling_typo" in p and "RayJob/" in p for p in problems), problems
    data[key] = yaml.safe_dump({**yaml.safe_load(data[key].replace("scaling_typo: 1", "")),
                                "scaling": {"num_workers": "two"}})
    assert any("scaling.num_workers" in p for p in search_configs_problems(objs, "gpu")), problems
    # Too many CPUs for the cluster, with the rest of the scaling section from the schema's defaults.
    data[key] = yaml.safe_dump({"dtype": "bfloat16", "scaling": {"use_gpu": True, "trial_cpus": 1000}})
    assert any("one trial needs" in p for p in search_configs_problems(objs, "gpu"))


def test_search_config_schema_is_current():
    """infra/search-config.schema.json is what scripts/gen_config_schema.py writes from lofit_ray's config."""
    try:
        import lofit_ray.config  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"lofit_ray.config not importable: {exc}")
    result = subprocess.run([sys.executable, "scripts/gen_config_schema.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + "\n(run `python scripts/gen_config_schema.py` and commit it)"
    assert SEARCH_CONFIG_SCHEMA.is_file()


def test_infra_does_not_import_the_core():
    import ast

    for path in (REPO / "infra").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "lofit_ray" for n in names), f"{path.relative_to(REPO)} imports lofit_ray"


def test_image_pin_check_catches_unpinned_images():
    for image in ("lofit-ray", "lofit-ray:latest", "registry:5000/lofit-ray"):
        objs = rendered("cpu")
        one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0]["image"] = image
        problems = image_pin_problems(objs)
        assert len(problems) == 1 and "pin the image" in problems[0] and repr(image) in problems[0], (image, problems)
    objs = rendered("cpu")
    one(objs, "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0]["image"] = (
        "lofit-ray@sha256:" + "0" * 64)
    assert not image_pin_problems(objs)


# -------------------------------------------------------------- the linter command
def _lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.lint", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_lint_command_passes_the_repo():
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("infra.lint: no problems in 3 targets")


def test_lint_command_names_a_planted_password(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "cpu"
    container = one(rendered("cpu"), "Deployment", "lofit-mlflow")["spec"]["template"]["spec"]["containers"][0]
    (overlay / "leak.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "lofit-mlflow"},
        "spec": {"template": {"spec": {"containers": [{"name": container["name"], "env": [
            {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}]}]}}}}))
    k = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    k["patches"].append({"path": "leak.yaml"})
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(k) + "# db: postgresql://user:pass@host/db\n")

    result = _lint(str(overlay))
    assert result.returncode == 1, result.stdout + result.stderr
    *problems, summary = result.stdout.splitlines()
    assert summary.startswith("infra.lint: 2 problems in 1 of 1 target"), result.stdout
    assert all(line.startswith(f"{overlay}: ") for line in problems), result.stdout
    assert any("MLFLOW_TRACKING_PASSWORD has a literal value" in line for line in problems), result.stdout
    assert any("postgresql://user:***@" in line for line in problems), result.stdout
    assert "hunter2" not in result.stdout and "user:pass@" not in result.stdout


def test_lint_command_names_a_server_without_basic_auth(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    deployment = tmp_path / "k8s" / "base" / "mlflow-deployment.yaml"
    text = deployment.read_text()
    assert "--app-name basic-auth\n" in text
    deployment.write_text(text.replace("--app-name basic-auth\n", ""))
    overlay = tmp_path / "k8s" / "overlays" / "gpu"

    result = _lint(str(overlay))
    assert result.returncode == 1, result.stdout + result.stderr
    *problems, summary = result.stdout.splitlines()
    assert summary.startswith("infra.lint: 1 problem in 1 of 1 target"), result.stdout
    assert "Deployment/lofit-mlflow: the server runs without --app-name basic-auth" in problems[0], result.stdout


def test_lint_command_rejects_bad_arguments(tmp_path):
    for args in ([str(tmp_path / "nope")], [str(tmp_path)], ["--k8s-version", "latest"], ["--accelerator", "tpu"]):
        result = _lint(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "infra.lint: error:" in result.stderr, result.stderr


# ----------------------------------------------------------------- renderer itself
def test_renderer_json6902_and_merge_semantics():
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"template": {"spec": {"containers": [
               {"name": "a", "image": "img:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
               {"name": "b", "image": "other:2"}]}}}}
    patched = render.apply_json6902(obj, [
        {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "Z", "value": "3"}},
        {"op": "remove", "path": "/spec/template/spec/containers/1"},
        {"op": "replace", "path": "/metadata/name", "value": "e"},
    ])
    assert [e["name"] for e in patched["spec"]["template"]["spec"]["containers"][0]["env"]] == ["X", "Y", "Z"]
    assert len(patched["spec"]["template"]["spec"]["containers"]) == 1 and patched["metadata"]["name"] == "e"
    assert obj["metadata"]["name"] == "d", "patching must not mutate its input"
    with pytest.raises(render.RenderError):
        render.apply_json6902(obj, [{"op": "replace", "path": "/spec/nope/x", "value": 1}])

    smp = render.strategic_merge(obj, {"spec": {"template": {"spec": {"containers": [
        {"name": "a", "env": [{"name": "X", "value": "9"}, {"name": "Y", "$patch": "delete"}]}]}}}})
    env = smp["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "X", "value": "9"}]
    assert len(smp["spec"]["template"]["spec"]["containers"]) == 2, "containers merge by name"

    crd = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "r"}, "spec": {"l": [1, 2], "k": 1}}
    merged = render.json_merge_patch(crd, {"spec": {"l": [3], "k": None}})
    assert merged["spec"] == {"l": [3]}, "custom resources get RFC 7386 merge: lists replaced, null deletes"


def test_renderer_images_namespace_labels(tmp_path):
    (tmp_path / "res.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"},
         "spec": {"rayClusterSpec": {"headGroupSpec": {"template": {"spec": {"containers": [
             {"name": "h", "image": "lofit-ray:old"}, {"name": "s", "image": "busybox:1"}]}}}}}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "rb"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
         "subjects": [{"kind": "ServiceAccount", "name": "sa"}]},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}},
    ]))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["res.yaml"], "namespace": "ns",
        "labels": [{"pairs": {"a": "b"}}],
        "images": [{"name": "lofit-ray", "newName": "reg/lofit-ray", "newTag": "new"}],
    }))
    objs = render.build(tmp_path)
    job = one(objs, "RayJob")
    images = [c["image"] for c in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]]
    assert images == ["reg/lofit-ray:new", "busybox:1"]
    assert job["metadata"]["namespace"] == "ns" and job["metadata"]["labels"] == {"a": "b"}
    assert one(objs, "RoleBinding")["subjects"][0]["namespace"] == "ns"
    assert "namespace" not in one(objs, "Namespace")["metadata"]

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["res.yaml"], "namePrefix": "x-"}))
    with pytest.raises(render.RenderError, match="namePrefix"):
        render.build(tmp_path)
