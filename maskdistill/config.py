"""The workflow configuration: JSON-schema validation with errors that name the key, and defaults."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = resources.files("maskdistill") / "schemas" / "config.schema.yaml"
# The folders the workflow writes, relative to its working directory (see maskdistill.plan).
RESULTS = "results"
LOGS = "logs"


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
    """A copy of ``config`` with every default filled in, checked once against the schema (and the
    few rules a schema cannot state); raise ConfigError naming every bad key."""
    schema = load_schema()
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
    required = {"voc": ("root",), "coco20k": ("images", "filenames")}.get(ds["source"], ())
    for key in required:
        if not ds[ds["source"]].get(key):
            raise ConfigError(f"config key 'dataset.{ds['source']}.{key}': required when dataset.source "
                              f"is '{ds['source']}'")
    demo = ds["demo"]
    if demo["min_objects"] > demo["max_objects"]:
        raise ConfigError("config key 'dataset.demo.min_objects': larger than max_objects")
    lo, hi = cfg["segmentation"]["scale_range"]
    if lo > hi:
        raise ConfigError("config key 'segmentation.scale_range': first value exceeds the second")
    if cfg["choose_k"]["k_min"] > cfg["choose_k"]["k_max"]:
        raise ConfigError("config key 'choose_k.k_min': larger than k_max")
    lo, hi = cfg["detector"]["train_min_size"]
    if lo > hi:
        raise ConfigError("config key 'detector.train_min_size': first value exceeds the second")
    for section in ("pretrain", "detector", "segmentation", "linear_probe"):
        batch, gpus = cfg[section]["batch_size"], cfg[section]["gpus"]
        if batch % gpus:
            raise ConfigError(f"config key '{section}.batch_size': {batch} does not split into equal shares "
                              f"over {section}.gpus={gpus}; make it a multiple of {gpus}")


# Local files and folders a config may name: (dotted key, "file" | "dir", when it applies).
_PATH_KEYS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("mining.backbone.checkpoint", "file", None),
    ("clustering.backbone.checkpoint", "file", None),
    ("detector.pretrained_backbone", "file", None),
    ("segmentation.pretrained_backbone", "file", None),
    ("dataset.train.images", "images", ("images",)),
    ("dataset.train.annotations", "file", ("images",)),
    ("dataset.val.images", "images", ("images",)),
    ("dataset.val.annotations", "file", ("images",)),
    ("dataset.voc.root", "dir", ("voc",)),
    ("dataset.voc.train_list", "file", ("voc",)),
    ("dataset.coco20k.images", "dir", ("coco20k",)),
    ("dataset.coco20k.filenames", "file", ("coco20k",)),
    ("dataset.coco20k.annotations", "file", ("coco20k",)),
    ("linear_probe.train_labels", "dir", None),
    ("linear_probe.val_labels", "dir", None),
    ("segment.images", "images", None),
)
_TIMM_KEYS = ("mining.backbone.name", "clustering.backbone.name", "pretrain.arch")


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def reference_errors(cfg: dict[str, Any]) -> list[str]:
    """What a validated config names that does not exist: timm models, files, image folders.

    Paths are taken relative to the working directory (the workflow's). No file is downloaded:
    model names are looked up in timm's registry (after the package's own ViTs are registered).
    """
    from maskdistill.backbone import check_vit_name  # registers the demo ViT with timm
    from maskdistill.datasets import has_images

    errors = []
    for key in _TIMM_KEYS:
        name = _lookup(cfg, key)
        if isinstance(name, str):
            try:
                check_vit_name(name)
            except ValueError as err:
                errors.append(f"config key '{key}': {err}")
    cache = _lookup(cfg, "weights_cache")
    owner = _workflow_folder_holding(Path(cache).expanduser()) if cache else None
    if owner:
        errors.append(f"config key 'weights_cache': {cache} lies inside the workflow's {owner}/ folder, "
                      "whose files the workflow deletes; name a folder outside it")
    source = _lookup(cfg, "dataset.source")
    produced = bool(_lookup(cfg, "pretrain.enabled"))  # the workflow writes the ViT weights itself
    for key, kind, sources in _PATH_KEYS:
        value = _lookup(cfg, key)
        if not value or (sources is not None and source not in sources):
            continue
        if produced and key.endswith("backbone.checkpoint"):
            continue
        path = Path(value).expanduser()
        owner = _workflow_folder_holding(path)
        if owner:
            errors.append(f"config key '{key}': {path} lies inside the workflow's {owner}/ folder, "
                          "whose files the workflow overwrites and deletes; keep your data elsewhere")
        elif kind == "file" and not path.is_file():
            errors.append(f"config key '{key}': file not found: {path}")
        elif kind in ("dir", "images") and not path.is_dir():
            errors.append(f"config key '{key}': folder not found: {path}")
        elif kind == "images" and not has_images(path):
            errors.append(f"config key '{key}': empty dataset, no images found in {path}")
    return errors


def _workflow_folder_holding(path: Path) -> str | None:
    """``results`` or ``logs`` when ``path`` (links resolved) lies in that folder of the working directory."""
    real = Path(os.path.realpath(path))
    for folder in (RESULTS, LOGS):
        if real.is_relative_to(Path(os.path.realpath(folder))):
            return folder
    return None


def check_references(cfg: dict[str, Any]) -> None:
    """Raise ConfigError naming every key whose model name, file or folder does not exist."""
    errors = reference_errors(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


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
        elif bb.get("pretrained") and bb["name"].endswith(".dino_demo"):
            source = ("DINO weights pretrained on the demo's unlabeled train scenes, shipped in "
                      "maskdistill/weights/ (docs/pretraining.md)")
        elif bb.get("pretrained"):
            source = "pretrained timm hub weights"
        else:
            source = ("RANDOMLY INITIALISED weights (no pretraining): these numbers show that the "
                      "pipeline runs, not that the method works")
        notes.append(f"{stage} ViT `{bb['name']}`: {source}")
    return notes


# ---------------------------------------------------------------- the reference, from the schema

_REFERENCE_INTRO = """# Configuration reference

Generated from `maskdistill/schemas/config.schema.yaml` by `uv run maskdistill config-reference >
docs/configuration.md` (a test fails when the two differ). The defaults are the paper's settings;
`config.yaml` (the demo) applies only when no `--configfile` is given. Unknown keys and bad values
stop the workflow before any job, naming the key; `uv run maskdistill check-config --config my.yaml`
checks a config and prints it with every default filled in.
"""


def config_reference() -> str:
    """The Markdown reference of every config key: one table per section (key, type, default, what it
    does), from the schema's types, defaults and descriptions."""
    schema = load_schema()
    lines = [_REFERENCE_INTRO]
    top = [(k, v) for k, v in schema["properties"].items() if _resolved(schema, v).get("type") != "object"]
    if top:
        lines += ["## Top level", "", *_key_table(schema, top, ""), ""]
    for name, node in schema["properties"].items():
        if _resolved(schema, node).get("type") == "object":
            lines += _section(schema, name, node, 2)
    return "\n".join(lines).rstrip() + "\n"


def _resolved(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return {**schema["$defs"][node["$ref"].rsplit("/", 1)[-1]], **node}
    return node


def _is_section(schema: dict[str, Any], node: dict[str, Any]) -> bool:
    """A nested object with keys of its own (a ViT setting is shown as one value instead)."""
    node = _resolved(schema, node)
    return node.get("type") == "object" and "properties" in node and "required" not in node


def _section(schema: dict[str, Any], dotted: str, node: dict[str, Any], level: int) -> list[str]:
    node = _resolved(schema, node)
    lines = ["#" * level + f" `{dotted}`", ""]
    if node.get("description"):
        lines += [" ".join(node["description"].split()), ""]
    keys = [(k, v) for k, v in node["properties"].items() if not _is_section(schema, v)]
    if keys:
        lines += [*_key_table(schema, keys, dotted), ""]
    for key, sub in node["properties"].items():
        if _is_section(schema, sub):
            lines += _section(schema, f"{dotted}.{key}", sub, level + 1)
    return lines


def _key_table(schema: dict[str, Any], keys: list[tuple[str, dict[str, Any]]], prefix: str) -> list[str]:
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, node in keys:
        full = _resolved(schema, node)
        name = f"{prefix}.{key}" if prefix else key
        rows.append(f"| `{name}` | {_type_of(full)} | `{json.dumps(full.get('default'))}` | "
                    f"{' '.join(str(full.get('description', '')).split()).replace('|', '/')} |")
    return rows


def _type_of(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " / ".join(f"`{v}`" for v in node["enum"])
    kinds = node.get("type", "object")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    text = " or ".join(str(k) for k in kinds)
    bounds = [f"≥ {node['minimum']}" if "minimum" in node else "",
              f"> {node['exclusiveMinimum']}" if "exclusiveMinimum" in node else "",
              f"≤ {node['maximum']}" if "maximum" in node else "",
              f"< {node['exclusiveMaximum']}" if "exclusiveMaximum" in node else ""]
    bounds = [b for b in bounds if b]
    return text + (f" ({', '.join(bounds)})" if bounds else "")
