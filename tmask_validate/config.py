"""Workflow/simulation configuration: loading and schema validation.

A config is one YAML mapping. Its top-level sections each have their own JSON-schema file in
``tmask_validate/schemas/<section>.schema.yaml`` (so each stage owns its part of the schema);
this module assembles them, rejects unknown top-level keys and reports every problem with its
path in the config (e.g. ``simulation.semiangle_mrad: -1 is less than the minimum of 0``).
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

#: top-level sections, in the order they are documented; each has a schema file
SECTIONS = ("simulation", "structures", "dose", "analysis", "evidence", "experiments",
            "workflow")
#: top-level scalar keys
SCALARS = {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
    "description": {"type": "string"},
    "seed": {"type": "integer", "minimum": 0},
}
REQUIRED = ("name", "seed")


@cache
def _section_schema(section: str) -> dict:
    text = resources.files("tmask_validate.schemas").joinpath(f"{section}.schema.yaml").read_text()
    return yaml.safe_load(text)


def config_schema() -> dict:
    """Return the full JSON schema (a fresh copy) of a tmask_validate config."""
    props: dict[str, Any] = {k: dict(v) for k, v in SCALARS.items()}
    for section in SECTIONS:
        props[section] = copy.deepcopy(_section_schema(section))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": list(REQUIRED),
        "properties": props,
    }


def _apply_defaults(instance: Any, schema: dict) -> None:
    """Fill ``default`` values of object properties in place (recursively)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _apply_defaults(instance[key], sub)
    addl = schema.get("additionalProperties")
    if isinstance(addl, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _apply_defaults(value, addl)


def validate_config(config: dict) -> dict:
    """Validate a config mapping and return a copy with schema defaults filled in.

    Raises
    ------
    ValueError
        Listing every violation with its location, e.g. unknown keys or values out of range.
    """
    if not isinstance(config, dict):
        raise ValueError(f"a config must be a mapping, got {type(config).__name__}")
    schema = config_schema()
    cfg = copy.deepcopy(config)
    _apply_defaults(cfg, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        for err in errors:
            where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  {where}: {err.message}")
        raise ValueError("invalid config:\n" + "\n".join(lines))
    from tmask_validate.evidence import check_evidence_config

    try:
        check_evidence_config(cfg)
    except ValueError as exc:
        raise ValueError(f"invalid config:\n  {exc}") from None
    return cfg


def read_yaml(path: str | Path, *, what: str = "YAML file") -> Any:
    """Parse a YAML file; a syntax error is one ValueError line naming the file and line.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        ``<path>: line L, column C: YAML syntax error in this <what>: <problem>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file (cannot read it as a {what}: {exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: {where}YAML syntax error in this {what}: {problem}") from None


def load_config(path: str | Path) -> dict:
    """Read a YAML config file, validate it and fill defaults (see :func:`validate_config`)."""
    path = Path(path)
    raw = read_yaml(path, what="config file")
    try:
        return validate_config(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
