"""A small, dependency-light stand-in for `kustomize build`, enough for infra/k8s.

It exists so the manifests can be rendered and validated where no kustomize/kubectl
binary is installed (infra/lint/ and tests/test_infra.py). It implements the subset of kustomization
features this repository uses and refuses anything else, so a new kustomization field
fails loudly here instead of being silently ignored:

  resources (files and directories), components (kind: Component), namespace,
  labels (pairs, includeSelectors, includeTemplates), commonLabels,
  commonAnnotations, images (name, newName, newTag, digest) and patches
  (inline or path; JSON6902 op lists or strategic-merge documents; with an optional
  target selecting group/version/kind/name/namespace/labelSelector).

Semantics follow kustomize where it matters for these overlays:
  * components are applied after the kustomization's resources and before its own
    transformers; each component's transformers act on everything accumulated so far;
  * a patch with a target that matches nothing is a no-op; a strategic-merge patch
    without target must match a resource by kind and name;
  * strategic merge on built-in kinds merges named lists by their merge key
    (containers by name, env by name, volumeMounts by mountPath, ...) and honours
    `$patch: delete|replace`; on custom resources (RayJob, RayCronJob, ...) it is a
    JSON merge patch (RFC 7386: lists are replaced whole), as in kustomize, which has
    no schema for them;
  * the images transformer rewrites `image` in every `containers`/`initContainers`
    list at any depth (kustomize's legacy image filter), so nested Ray pod templates
    are covered.

Usage: python infra/k8s/render.py infra/k8s/overlays/cpu   (prints the YAML stream)
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {
    "apiVersion", "kind", "metadata", "resources", "components", "namespace", "labels",
    "commonLabels", "commonAnnotations", "images", "patches",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "RuntimeClass",
}
# Built-in API groups: strategic merge applies. Anything else is a custom resource.
BUILTIN_GROUPS = {
    "", "apps", "batch", "rbac.authorization.k8s.io", "networking.k8s.io", "policy",
    "autoscaling", "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io",
}
# Strategic-merge keys of the list fields we may patch (from the Kubernetes API types).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "imagePullSecrets": "name", "hostAliases": "ip", "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}
# Where selector / template labels live, for includeSelectors / includeTemplates.
SELECTOR_PATHS = {
    "Service": [("spec", "selector")],
    "Deployment": [("spec", "selector", "matchLabels")],
    "StatefulSet": [("spec", "selector", "matchLabels")],
    "DaemonSet": [("spec", "selector", "matchLabels")],
    "ReplicaSet": [("spec", "selector", "matchLabels")],
    "Job": [],
    "CronJob": [],
}
# Selector paths updated only where they already exist (kustomize: create: false).
EXISTING_SELECTOR_PATHS = {
    "NetworkPolicy": [("spec", "podSelector", "matchLabels")],
    "PodDisruptionBudget": [("spec", "selector", "matchLabels")],
}
TEMPLATE_LABEL_PATHS = {
    "Deployment": [("spec", "template", "metadata", "labels")],
    "StatefulSet": [("spec", "template", "metadata", "labels")],
    "DaemonSet": [("spec", "template", "metadata", "labels")],
    "ReplicaSet": [("spec", "template", "metadata", "labels")],
    "Job": [("spec", "template", "metadata", "labels")],
    "CronJob": [("spec", "jobTemplate", "metadata", "labels"),
                ("spec", "jobTemplate", "spec", "template", "metadata", "labels")],
}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not support, or is broken."""


def load_yaml_documents(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise RenderError(f"{path}: every document must be a Kubernetes object with apiVersion and kind")
    return docs


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise RenderError(f"{directory}: no kustomization.yaml")


def api_group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def is_builtin(obj: dict) -> bool:
    return api_group(obj.get("apiVersion", "")) in BUILTIN_GROUPS


# --------------------------------------------------------------------------- patches
def _json_pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"JSON patch path must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError) as exc:
                raise RenderError(f"JSON patch path {path!r}: no list index {part!r}") from exc
        elif isinstance(node, dict):
            if part not in node:
                raise RenderError(f"JSON patch path {path!r}: no key {part!r}")
            node = node[part]
        else:
            raise RenderError(f"JSON patch path {path!r}: cannot descend into a scalar at {part!r}")
    return node


def apply_json6902(obj: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/remove/replace/move/copy/test."""
    obj = copy.deepcopy(obj)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in {"add", "remove", "replace", "move", "copy", "test"} or path is None:
            raise RenderError(f"unsupported JSON patch operation: {op}")
        parts = _json_pointer(path)
        if kind == "test":
            if _walk(obj, parts, path) != op.get("value"):
                raise RenderError(f"JSON patch test failed at {path!r}")
            continue
        value = None
        if kind in {"move", "copy"}:
            src_parts = _json_pointer(op["from"])
            value = copy.deepcopy(_walk(obj, src_parts, op["from"]))
            if kind == "move":
                obj = apply_json6902(obj, [{"op": "remove", "path": op["from"]}])
            kind = "add"
        elif kind in {"add", "replace"}:
            if "value" not in op:
                raise RenderError(f"JSON patch {kind} at {path!r} needs a value")
            value = copy.deepcopy(op["value"])
        if not parts:
            if kind == "remove":
                raise RenderError("JSON patch cannot remove the whole document")
            obj = value
            continue
        parent = _walk(obj, parts[:-1], path)
        last = parts[-1]
        if isinstance(parent, list):
            if kind == "add":
                if last == "-":
                    parent.append(value)
                else:
                    index = int(last)
                    if not 0 <= index <= len(parent):
                        raise RenderError(f"JSON patch add at {path!r}: index out of range")
                    parent.insert(index, value)
            else:
                index = int(last)
                if not 0 <= index < len(parent):
                    raise RenderError(f"JSON patch {kind} at {path!r}: index out of range")
                if kind == "remove":
                    del parent[index]
                else:
                    parent[index] = value
        elif isinstance(parent, dict):
            if kind in {"remove", "replace"} and last not in parent:
                raise RenderError(f"JSON patch {kind} at {path!r}: no key {last!r}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = value
        else:
            raise RenderError(f"JSON patch path {path!r}: parent is a scalar")
    return obj


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def strategic_merge(target: Any, patch: Any, field: str | None = None) -> Any:
    """Strategic merge for the built-in fields listed in MERGE_KEYS."""
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if directive == "delete":
            return None
        if directive is not None:
            raise RenderError(f"unsupported $patch directive {directive!r}")
        result = copy.deepcopy(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                raise RenderError(f"unsupported strategic-merge directive {key!r}")
            if value is None:
                result.pop(key, None)
                continue
            merged = strategic_merge(result.get(key), value, key)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        return result
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(target, list):
        key = MERGE_KEYS[field]
        result = copy.deepcopy(target)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"strategic merge of {field}: every item needs {key!r}")
            index = next((i for i, cur in enumerate(result) if cur.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del result[index]
                continue
            if index is None:
                result.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
            else:
                result[index] = strategic_merge(result[index], item, None)
        return result
    return copy.deepcopy(patch)


def _matches_selector(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def matches_target(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace", "labelSelector"}
    if unknown:
        raise RenderError(f"unsupported patch target fields: {sorted(unknown)}")
    api_version = obj.get("apiVersion", "")
    version = api_version.split("/")[-1]
    meta = obj.get("metadata", {})
    checks = [
        ("group", api_group(api_version)), ("version", version), ("kind", obj.get("kind")),
        ("name", meta.get("name")), ("namespace", meta.get("namespace")),
    ]
    for field, actual in checks:
        if field in target and target[field] != actual:
            return False
    if "labelSelector" in target and not _matches_selector(meta.get("labels") or {}, target["labelSelector"]):
        return False
    return True


def apply_patch(resources: list[dict], entry: dict, base_dir: Path) -> list[dict]:
    unknown = set(entry) - {"path", "patch", "target", "options"}
    if unknown:
        raise RenderError(f"unsupported patch fields: {sorted(unknown)}")
    if ("path" in entry) == ("patch" in entry):
        raise RenderError(f"a patch needs exactly one of path or patch: {entry}")
    if entry.get("options"):
        raise RenderError(f"patch options are not supported: {entry['options']}")
    if "path" in entry:
        text = (base_dir / entry["path"]).read_text(encoding="utf-8")
        where = str(base_dir / entry["path"])
    else:
        text, where = entry["patch"], "inline patch"
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise RenderError(f"{where}: a patch must be one YAML document")
    body = docs[0]
    target = entry.get("target")
    out = []
    matched = 0
    for obj in resources:
        if target is not None:
            hit = matches_target(obj, target)
        else:
            if not isinstance(body, dict):
                raise RenderError(f"{where}: a JSON6902 patch needs a target")
            hit = (obj.get("kind") == body.get("kind")
                   and obj.get("metadata", {}).get("name") == body.get("metadata", {}).get("name"))
        if not hit:
            out.append(obj)
            continue
        matched += 1
        if isinstance(body, list):
            out.append(apply_json6902(obj, body))
        elif isinstance(body, dict):
            merged = strategic_merge(obj, body) if is_builtin(obj) else json_merge_patch(obj, body)
            if merged is not None:
                out.append(merged)
        else:
            raise RenderError(f"{where}: a patch must be a mapping or a list of operations")
    if target is None and matched == 0:
        raise RenderError(f"{where}: strategic-merge patch matches no resource "
                          f"({body.get('kind')}/{body.get('metadata', {}).get('name')})")
    return out


# ------------------------------------------------------------------ transformers
def _ensure_path(obj: dict, path: tuple[str, ...]) -> dict | None:
    node = obj
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.setdefault(key, {})
    return node if isinstance(node, dict) else None


def set_labels(resources: list[dict], pairs: dict, selectors: bool, templates: bool) -> None:
    for obj in resources:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("labels", {}).update(pairs)
        kind = obj.get("kind")
        paths = []
        if selectors:
            paths += SELECTOR_PATHS.get(kind, []) + TEMPLATE_LABEL_PATHS.get(kind, [])
        elif templates:
            paths += TEMPLATE_LABEL_PATHS.get(kind, [])
        for path in paths:
            node = _ensure_path(obj, path)
            if node is not None:
                node.update(pairs)
        if selectors:
            for path in EXISTING_SELECTOR_PATHS.get(kind, []):
                node = obj
                for key in path:
                    node = node.get(key) if isinstance(node, dict) else None
                if isinstance(node, dict):
                    node.update(pairs)


def set_annotations(resources: list[dict], pairs: dict) -> None:
    for obj in resources:
        obj.setdefault("metadata", {}).setdefault("annotations", {}).update(pairs)


def set_namespace(resources: list[dict], namespace: str) -> None:
    for obj in resources:
        kind = obj.get("kind")
        if kind in CLUSTER_SCOPED_KINDS:
            continue
        meta = obj.setdefault("metadata", {})
        old = meta.get("namespace")
        meta["namespace"] = namespace
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (None, old):
                    subject["namespace"] = namespace


def split_image(image: str) -> tuple[str, str, str]:
    """name, tag (with ':' or ''), digest (with '@' or '')."""
    name, digest = (image.split("@", 1) + [""])[:2]
    digest = "@" + digest if digest else ""
    last = name.rsplit("/", 1)[-1]
    tag = ""
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        tag = ":" + tag
    return name, tag, digest


def _rewrite_image(image: str, rules: list[dict]) -> str:
    name, tag, digest = split_image(image)
    for rule in rules:
        if rule["name"] != name:
            continue
        new_name = rule.get("newName", name)
        if rule.get("digest"):
            return f"{new_name}@{rule['digest']}"
        if "newTag" in rule:
            return f"{new_name}:{rule['newTag']}"
        return f"{new_name}{tag}{digest}"
    return image


def set_images(node: Any, rules: list[dict]) -> None:
    for rule in rules:
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown or "name" not in rule:
            raise RenderError(f"unsupported images entry: {rule}")
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for key, value in cur.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"), str):
                            container["image"] = _rewrite_image(container["image"], rules)
                stack.append(value)
        elif isinstance(cur, list):
            stack.extend(cur)


# ------------------------------------------------------------------------- build
def _load_resources(directory: Path, entries: list[str]) -> list[dict]:
    out: list[dict] = []
    for entry in entries:
        if "://" in entry or entry.startswith("github.com/"):
            raise RenderError(f"{directory}: remote resources are not supported: {entry}")
        path = (directory / entry).resolve()
        if path.is_dir():
            out.extend(build(path))
        elif path.is_file():
            out.extend(load_yaml_documents(path))
        else:
            raise RenderError(f"{directory}: resource not found: {entry}")
    return out


def _apply_transformers(resources: list[dict], k: dict, directory: Path) -> list[dict]:
    for entry in k.get("patches") or []:
        resources = apply_patch(resources, entry, directory)
    if k.get("namespace"):
        set_namespace(resources, k["namespace"])
    if k.get("commonLabels"):
        set_labels(resources, k["commonLabels"], selectors=True, templates=True)
    for group in k.get("labels") or []:
        unknown = set(group) - {"pairs", "includeSelectors", "includeTemplates"}
        if unknown:
            raise RenderError(f"{directory}: unsupported labels fields: {sorted(unknown)}")
        set_labels(resources, group.get("pairs") or {}, bool(group.get("includeSelectors")),
                   bool(group.get("includeTemplates")))
    if k.get("commonAnnotations"):
        set_annotations(resources, k["commonAnnotations"])
    if k.get("images"):
        for obj in resources:
            set_images(obj, k["images"])
    return resources


def _check_keys(k: dict, where: Path, kind: str) -> None:
    if k.get("kind", "Kustomization") != kind:
        raise RenderError(f"{where}: expected kind {kind}, found {k.get('kind')}")
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{where}: kustomization fields not supported by render.py: {sorted(unknown)}")


def build_from(k: dict, directory: Path) -> list[dict]:
    """Render a kustomization given as a dict whose relative paths resolve in `directory`."""
    directory = Path(directory)
    _check_keys(k, directory, "Kustomization")
    resources = _load_resources(directory, k.get("resources") or [])
    for entry in k.get("components") or []:
        comp_dir = (directory / entry).resolve()
        comp_file = find_kustomization(comp_dir)
        comp = yaml.safe_load(comp_file.read_text(encoding="utf-8")) or {}
        _check_keys(comp, comp_file, "Component")
        if comp.get("components"):
            raise RenderError(f"{comp_file}: nested components are not supported")
        resources = resources + _load_resources(comp_dir, comp.get("resources") or [])
        resources = _apply_transformers(resources, comp, comp_dir)
    resources = _apply_transformers(resources, k, directory)
    seen = set()
    for obj in resources:
        ident = (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("namespace"),
                 obj.get("metadata", {}).get("name"))
        if ident in seen:
            raise RenderError(f"{directory}: duplicate resource {ident}")
        seen.add(ident)
    return resources


def build(directory: str | Path) -> list[dict]:
    """Render the kustomization in `directory` (like `kustomize build DIR`)."""
    directory = Path(directory).resolve()
    kfile = find_kustomization(directory)
    k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    return build_from(k, directory)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    yaml.safe_dump_all(build(argv[1]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
