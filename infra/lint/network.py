"""No broad network access: MLflow stays in-cluster (ClusterIP, no Ingress) and a NetworkPolicy admits only the
Ray head/worker pods to it, on its port."""
from __future__ import annotations

import fnmatch

from .common import MLFLOW_CLIENT_LABEL, MLFLOW_PORT, env_of, of_kind, one, pod_templates


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
