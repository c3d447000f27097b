"""Write infra/search-config.schema.json: the search config (lofit_ray.config.SearchJobConfig) as a JSON Schema.

    python scripts/gen_config_schema.py            # rewrite the committed file
    python scripts/gen_config_schema.py --check    # exit 1 when the committed file is stale

The core owns the config; infra/lint (`python -m infra.lint`) validates the configs a RayJob runs against this
file with check-jsonschema and reads the defaults it needs (scaling, dtype) from it, so infra/ never imports
lofit_ray. tests/test_infra.py fails when the committed file differs from what this script writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "infra" / "search-config.schema.json"
SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _type_schema(hint) -> dict:
    """The JSON Schema of one type hint; {} (anything) for what it cannot express."""
    from lofit_ray.config import Space

    if hint is Space:  # `k: 8`, `k: [8, 16]` and `k: {values: [...]}` all mean a Space (the loader's shorthand)
        return {"anyOf": [_section(Space), {"type": "array", "items": {"type": ["number", "string"]}},
                          {"type": ["number", "string"]}]}
    if dataclasses.is_dataclass(hint):
        return _section(hint)
    if hint in SCALARS:
        return {"type": SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a) for a in args]
        if all(set(o) == {"type"} for o in options):
            return {"type": [o["type"] for o in options]}
        return {"anyOf": options}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])} if args else {"type": "object"}
    return {}


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return None if dataclasses.is_dataclass(value) else value


def _section(cls) -> dict:
    """A config section: its fields with type, default and help text; unknown keys are errors (as in the loader)."""
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        schema = dict(_type_schema(hints[f.name]))
        default = _default(f)
        if default is not None or f.default is None:
            schema["default"] = default
        if f.metadata.get("help"):
            schema["description"] = " ".join(str(f.metadata["help"]).split())
        properties[f.name] = schema
    return {"type": "object", "properties": properties, "additionalProperties": False}


def schema() -> dict:
    from lofit_ray.config import SearchJobConfig

    return {"$schema": "http://json-schema.org/draft-07/schema#",
            "title": "lofit-ray search config",
            "description": f"Written by scripts/gen_config_schema.py from lofit_ray.config.{SearchJobConfig.__name__}; "
                           f"do not edit.",
            **_section(SearchJobConfig)}


def text() -> str:
    return json.dumps(schema(), indent=1, sort_keys=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file is stale")
    args = parser.parse_args(argv)
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text():
            print(f"{OUT.relative_to(ROOT)} is stale: run `python scripts/gen_config_schema.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
