"""Typed settings: one frozen dataclass per config section, equal to the schema, built once."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from conftest import REPO

from maskdistill.config import ConfigError, load_schema, validate_config
from maskdistill.settings import (
    MiningSettings,
    Settings,
    as_config,
    build,
    load_settings,
    section_settings,
)


def _schema_sections() -> dict[str, dict]:
    schema = load_schema()

    def resolve(node: dict) -> dict:
        if "$ref" in node:
            return schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def fields(node: dict) -> dict:
        node = resolve(node)
        return {k: fields(v) if resolve(v).get("type") == "object" else None
                for k, v in node.get("properties", {}).items()}

    return fields(schema)


def _dataclass_fields(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = next((h for h in typing.get_args(hint) if dataclasses.is_dataclass(h)), hint)
        out[f.name] = _dataclass_fields(inner) if dataclasses.is_dataclass(inner) else None
    return out


def test_the_settings_classes_have_exactly_the_schemas_keys():
    assert _dataclass_fields(Settings) == _schema_sections()


@pytest.mark.parametrize("config", ["config.yaml", "configs/voc.yaml", "configs/coco20k.yaml"])
def test_settings_hold_the_validated_config_typed(config):
    raw = yaml.safe_load((REPO / config).read_text())
    settings = load_settings(raw)
    assert as_config(settings) == validate_config(raw)  # nothing lost or changed on the way
    assert isinstance(settings.mining, MiningSettings)
    assert isinstance(settings.segmentation.scale_range, tuple)
    assert settings.num_labels == settings.clustering.num_clusters * settings.clustering.overclustering + 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mining.mass = 0.1  # type: ignore[misc]


def test_a_section_is_filled_with_its_defaults_and_checked():
    mining = section_settings("mining", {"mass": 0.3})
    assert mining.mass == 0.3 and mining.proposal_ratio == 0.4 and mining.backbone.name.endswith(".dino")
    with pytest.raises(ConfigError, match="mining.mass"):
        section_settings("mining", {"mass": 2})
    with pytest.raises(ConfigError, match="mining.unknown"):
        section_settings("mining", {"unknown": 1})


def test_build_refuses_keys_a_settings_class_does_not_know():
    with pytest.raises(TypeError, match="unknown keys"):
        build(MiningSettings, {**as_config(section_settings("mining")), "extra": 1})
