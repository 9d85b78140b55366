"""Configuration: schema errors name the key; defaults; the conda env matches pyproject."""

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, snakemake, write_config

from maskdistill.config import ConfigError, validate_config


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


# ---------------------------------------------------------------- names, files and folders that must exist


def _refs(patch: dict) -> list[str]:
    from maskdistill.config import reference_errors

    return reference_errors(validate_config(patch))


def test_existing_model_names_and_pretrained_tags_pass():
    assert _refs({"mining": {"backbone": {"name": "vit_small_patch16_224.dino"}},
                  "clustering": {"backbone": {"name": "vit_demo_patch8_128.dino_demo"}}}) == []


@pytest.mark.parametrize("key", ["mining.backbone.name", "clustering.backbone.name", "pretrain.arch"])
def test_unknown_timm_name_names_the_key_and_close_matches(key):
    section, *rest = key.split(".")
    patch = {section: {"backbone": {"name": "vit_smal_patch16_224"}} if rest[0] == "backbone"
             else {rest[0]: "vit_smal_patch16_224"}}
    errors = _refs(patch)
    assert len(errors) == 1 and f"'{key}'" in errors[0] and "vit_small_patch16_224" in errors[0]


@pytest.mark.parametrize("key", ["mining.backbone.checkpoint", "clustering.backbone.checkpoint",
                                 "detector.pretrained_backbone", "segmentation.pretrained_backbone"])
def test_missing_weights_file_names_the_key_and_the_path(tmp_path, key):
    missing = tmp_path / "nope.pth"
    patch: dict = {}
    node = patch
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {"name": "vit_tiny_patch16_224"} if part == "backbone" else {})
    node[parts[-1]] = str(missing)
    errors = _refs(patch)
    assert errors == [f"config key '{key}': file not found: {missing}"]
    missing.write_bytes(b"weights")
    assert _refs(patch) == []


def test_image_folders_and_annotation_files_must_exist_and_hold_images(tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "full" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "full" / "sub" / "a.jpg")
    patch = {"dataset": {"source": "images", "train": {"images": str(tmp_path / "empty")},
                         "val": {"images": str(tmp_path / "gone"),
                                 "annotations": str(tmp_path / "val.json")}}}
    errors = _refs(patch)
    assert errors == [
        f"config key 'dataset.train.images': empty dataset, no images found in {tmp_path / 'empty'}",
        f"config key 'dataset.val.images': folder not found: {tmp_path / 'gone'}",
        f"config key 'dataset.val.annotations': file not found: {tmp_path / 'val.json'}",
    ]
    patch["dataset"]["train"]["images"] = str(tmp_path / "full")
    del patch["dataset"]["val"]
    assert _refs(patch) == []


# ---------------------------------------------------------------- the workflow refuses before any job


def _dry_run(tmp_path: Path, cfg: dict):
    base = json.loads(json.dumps(TINY))
    for section, values in cfg.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    write_config(tmp_path, base)
    proc = snakemake(tmp_path, "-n", check=False, cores=1)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "job count" not in text  # nothing planned, nothing run
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    return text


def test_workflow_stops_before_any_job_naming_each_invalid_value(tmp_path):
    text = _dry_run(tmp_path, {"mining": {"backbone": {"name": "vit_tiny_patch16_224"}, "shortside": 64},
                               "detector": {"epochs": "ten"}, "pseudo_labels": {"tau": 1.5},
                               "clustering": {"num_clusters": 0}})
    for key in ("mining.shortside", "detector.epochs", "pseudo_labels.tau", "clustering.num_clusters"):
        assert f"config key '{key}'" in text, key


def test_workflow_stops_before_any_job_naming_missing_files_and_models(tmp_path):
    (tmp_path / "imgs").mkdir()
    text = _dry_run(tmp_path, {
        "dataset": {"source": "images", "train": {"images": str(tmp_path / "imgs")}},
        "mining": {"backbone": {"name": "vit_tiny_patch16_224", "checkpoint": "weights/dino.pth"}},
        "clustering": {"backbone": {"name": "vit_tiny_patch99_224"}},
    })
    assert "config key 'mining.backbone.checkpoint': file not found: weights/dino.pth" in text
    assert "config key 'clustering.backbone.name': unknown timm model 'vit_tiny_patch99_224'" in text
    assert f"config key 'dataset.train.images': empty dataset, no images found in {tmp_path / 'imgs'}" in text
