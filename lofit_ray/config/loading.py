"""The one YAML + `--set` loader: reads a file (or a shipped config by name), applies overrides, builds the typed
dataclasses and checks every field, each error naming the dotted field and the fix."""
from __future__ import annotations

import dataclasses
import reprlib
import types
import typing

from pathlib import Path

import yaml

from .fields import ConfigError
from .search_job import SearchJobConfig, Space


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_shown = reprlib.Repr()  # values quoted in errors: short and one line, however big or deep the YAML value
_shown.maxstring, _shown.maxother = 80, 80


def _key(name) -> str:
    """A key in an error's dotted path: text keys as written, odd ones (not text, unprintable, long) quoted short."""
    if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 60:
        return name
    return _shown.repr(name)


def _load_yaml(text: str, where: str):
    """yaml.safe_load, its errors as one-line ConfigErrors naming the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # a value YAML cannot build, e.g. an integer of 5000 digits
        raise ConfigError(f"{where}: not valid YAML: {str(exc).split(';')[0]}") from None


def coerce(value, hint, where: str, normalize=None):
    """Check `value` against a type hint (recursing into lists, dicts and dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        first = None
        for option in options:
            try:
                return coerce(value, option, where, normalize)
            except ConfigError as exc:
                first = first or exc
        raise first
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, normalize)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {_shown.repr(value)}")
        return [coerce(v, args[0], f"{where}[{i}]", normalize) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown.repr(value)}")
        return {str(k): coerce(v, args[1], f"{where}.{_key(k)}", normalize) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown.repr(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_shown.repr(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_shown.repr(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown.repr(value)}")
        return value
    return value


def build(cls, data, where: str = "", normalize=None):
    """Build dataclass `cls` from YAML data, checking every value against its type hint.

    Unknown keys and wrongly typed values raise ConfigError naming the dotted field.
    `normalize(cls, name, hint, value)` may rewrite a value first (shorthands).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_shown.repr(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields, key=str)  # YAML keys need not be text: 1, null, true
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{_key(unknown[0])}: unknown key; known keys here: "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        if normalize:
            try:
                value = normalize(cls, name, hints[name], value)
            except TypeError as exc:  # e.g. a shorthand list holding a list or mapping
                raise ConfigError(f"{path}: cannot read {_shown.repr(value)} ({exc})") from None
        kwargs[name] = coerce(value, hints[name], path, normalize)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc
    except ConfigError as exc:
        # a section's own check names "<its usual section>.field"; say where it sits in this file. One line,
        # even when it quotes a YAML key holding a line break.
        text, section = str(exc).replace("\r", "\\r").replace("\n", "\\n"), getattr(cls, "SECTION", None)
        if where and section and text.startswith(section + ".") and where != section:
            text = where + text[len(section):]
        raise ConfigError(text) from None


def _shorthands(cls, name, hint, value):
    """`k: [8, 16]` or `k: 8` means `k: {values: [...]}`; `tasks: [a, b]` means defaults for each."""
    if hint is Space and not isinstance(value, dict):
        return {"values": value if isinstance(value, list) else [value]}
    if name == "tasks" and isinstance(value, list):
        value = {t: {} for t in value}
    if name == "tasks" and isinstance(value, dict):
        value = {k: ({} if v is None else v) for k, v in value.items()}
    return value


def parse_set(pairs: list[str]) -> dict:
    """`--set a.b=VALUE` pairs (VALUE read as YAML) -> {"a.b": value}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. search.num_trials=2), got {_shown.repr(pair)}")
        out[key] = _load_yaml(value, f"--set {_key(key)}")
    return out


def shipped_configs() -> dict[str, Path]:
    """The configs that come with lofit-ray, by name: configs/ of this checkout, or, in an installed wheel,
    lofit_ray/configs/ (the same files, shipped as package data)."""
    folder = Path(__file__).resolve().parents[2] / "configs"
    if not folder.is_dir():
        folder = Path(__file__).resolve().parents[1] / "configs"  # site-packages/lofit_ray/configs
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_file(name_or_path: str | Path) -> Path:
    """A config path as given, else a shipped config by name ("quickstart" or "quickstart.yaml")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml")
    if name in shipped and (len(path.parts) == 1 or path.parent.name == "configs"):
        return shipped[name]
    raise ConfigError(f"config file not found: {name_or_path}; pass a YAML file or the name of a shipped config "
                      f"({', '.join(shipped) or 'none found'})")


def load_config(path: str | Path | None = None, overrides: dict | None = None, schema=SearchJobConfig):
    """Read a YAML config of `schema` (the schema's defaults when path is None), apply overrides, check it.
    `path` may also name a shipped config ("quickstart", "configs/smoke.yaml" outside a checkout)."""
    data = {}
    if path is not None:
        path = config_file(path)
        try:
            if path.stat().st_size > 1 << 20:  # configs are a few KB; do not spend minutes parsing a stray file
                raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config (at most 1 MiB); "
                                  f"pass one of the files in configs/")
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        data = _load_yaml(text, str(path))
        if data is None:  # empty, or comments only: every default
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields at the top level, got "
                              f"{type(data).__name__}")
    return build(schema, apply_overrides(data, overrides), "", normalize=_shorthands)


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Put `--set a.b=VALUE` overrides ({"a.b": value}) into a config's plain data, in place."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a section")
            node = child
        node[leaf] = value
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(schema, data: dict):
    """The inverse of to_dict (e.g. a config shipped to a Ray worker as plain data)."""
    return build(schema, data, "", normalize=_shorthands)
