"""Auth on: MLflow's basic-auth app and Ray token auth on every Ray cluster, credentials from the lofit-auth Secret."""
from __future__ import annotations

import configparser
import re

from .common import AUTH_SECRET, RAY_TOKEN_KEY, env_of, of_kind, one, ray_cluster_specs

# MLflow server env (basic-auth app) -> Ray pod env (MLflow client) that must read the same Secret key.
MLFLOW_AUTH_ENV = {"MLFLOW_AUTH_ADMIN_USERNAME": "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_AUTH_ADMIN_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}


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
