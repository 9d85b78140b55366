"""The workflow configuration: JSON-schema validation with errors that name the key, and defaults."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from importlib import resources
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = resources.files("maskdistill") / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def load_schema() -> dict[str, Any]:
    """The config JSON schema."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        path = ".".join(filter(None, [path, *extra]))
    if error.validator == "required":
        missing = [m for m in error.validator_value if m not in error.instance]
        path = ".".join(filter(None, [path, *missing]))
    return path or "<top level>"


def config_errors(config: dict[str, Any]) -> list[str]:
    """One readable line per schema violation, each starting with the dotted key."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    return [f"config key '{_key_path(e)}': {e.message}" for e in errors]


def _fill_defaults(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> Any:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}
    if not isinstance(value, dict) or schema.get("type") != "object":
        return value
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _fill_defaults(sub, value[key], root)
    return value


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate, then return a copy with every default filled in; raise ConfigError naming keys."""
    schema = load_schema()
    errors = config_errors(config)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    filled = _fill_defaults(schema, copy.deepcopy(config), schema)
    errors = config_errors(filled)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    _check_semantics(filled)
    return filled


def _check_semantics(cfg: dict[str, Any]) -> None:
    ds = cfg["dataset"]
    if ds["source"] == "images" and not ds["train"].get("images"):
        raise ConfigError("config key 'dataset.train.images': required when dataset.source is 'images'")
    if ds["val"].get("annotations") and not ds["val"].get("images"):
        raise ConfigError("config key 'dataset.val.images': required when val annotations are given")
    demo = ds["demo"]
    if demo["min_objects"] > demo["max_objects"]:
        raise ConfigError("config key 'dataset.demo.min_objects': larger than max_objects")
    lo, hi = cfg["segmentation"]["scale_range"]
    if lo > hi:
        raise ConfigError("config key 'segmentation.scale_range': first value exceeds the second")
    lo, hi = cfg["detector"]["train_min_size"]
    if lo > hi:
        raise ConfigError("config key 'detector.train_min_size': first value exceeds the second")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    with open(path) as f:
        return validate_config(yaml.safe_load(f) or {})


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable value."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def weight_notes(cfg: dict[str, Any]) -> list[str]:
    """Plain statements for reports about where each ViT's weights came from."""
    notes = []
    for stage in ("mining", "clustering"):
        bb = cfg[stage]["backbone"]
        if bb.get("checkpoint"):
            source = f"weights from {bb['checkpoint']}"
        elif bb.get("pretrained"):
            source = "pretrained timm hub weights"
        else:
            source = ("RANDOMLY INITIALISED weights (no pretraining): these numbers show that the "
                      "pipeline runs, not that the method works")
        notes.append(f"{stage} ViT `{bb['name']}`: {source}")
    return notes


@functools.cache
def _all_defaults() -> dict[str, Any]:
    return validate_config({})


def section_defaults(section: str) -> dict[str, Any]:
    """The default values of one top-level config section (a fresh copy)."""
    return copy.deepcopy(_all_defaults()[section])
