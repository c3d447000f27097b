"""No secret values: no Secret objects, no literal credentials anywhere, and secretKeyRefs that fail the right way
(required into lofit-auth, optional everywhere else)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .common import AUTH_SECRET, shown

SECRETISH_ENV = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|CREDENTIAL)", re.I)

# scheme://user:password@host: the password is the `secret` group (redacted in messages).
CREDENTIAL_URI = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?P<secret>[^@\s'\"]+)@", re.I)

# An env-style NAME=value or NAME: value with a secret-looking name and a literal (not $VAR) value,
# as it shows up in shell scripts, runtimeEnvYAML, ConfigMap data or a comment.
SECRET_ASSIGNMENT = re.compile(
    r"\b(?P<name>[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|CREDENTIAL)[A-Z0-9_]*)[\"']?"
    r"[ \t]*[=:][ \t]*[\"']?(?P<secret>[^\s\"'$|>{}\[\]#,&;`()][^\s\"',;`]*)")


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


def file_credential_problems(paths) -> list[str]:
    """Credentials and Secret objects in the files' text, comments included (rendering drops comments)."""
    problems = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            problems += [f"{shown(path)}:{n}: plain-text credential {c!r}" for c in credential_matches(line)]
            if re.search(r"^\s*kind:\s*Secret\s*$", line):
                problems.append(f"{shown(path)}:{n}: a Secret object: create Secrets out of band")
    return problems
