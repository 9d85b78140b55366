"""Configuration: schema errors name the key; defaults; the conda env matches pyproject."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from maskdistill.config import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"pseudo_labels": {"tau": 1.5}}, "pseudo_labels.tau"),
        ({"pseudo_labels": {"tau": -0.1}}, "pseudo_labels.tau"),
        ({"clustering": {"num_clusters": 0}}, "clustering.num_clusters"),
        ({"detector": {"epochs": "ten"}}, "detector.epochs"),
        ({"mining": {"proposal_ratio": 0}}, "mining.proposal_ratio"),
        ({"mining": {"backbone": {"nme": "vit_small_patch16_224"}}}, "mining.backbone.nme"),
        ({"segmentation": {"output_stride": 4}}, "segmentation.output_stride"),
        ({"dataset": {"source": "imgs"}}, "dataset.source"),
        ({"dataset": {"source": "images"}}, "dataset.train.images"),
        ({"unknown_section": 1}, "unknown_section"),
        ({"segmentation": {"scale_range": [1.5, 0.5]}}, "segmentation.scale_range"),
    ],
)
def test_invalid_values_name_their_key(patch, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        validate_config(patch)


def test_defaults_are_the_paper_settings():
    cfg = validate_config({})
    assert cfg["mining"]["short_side"] == 640
    assert cfg["mining"]["proposal_ratio"] == 0.4 and cfg["mining"]["mass"] == 0.5
    assert cfg["pseudo_labels"]["tau"] == 0.9
    assert cfg["segmentation"]["hard_pixel_fraction"] == 0.2
    assert cfg["segmentation"]["atrous_rates"] == [12, 24, 36]


def test_demo_config_is_valid():
    validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_conda_env_lists_the_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "maskdistill.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(project)
    assert _names(pip) == _names(project)
