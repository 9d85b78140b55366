"""The shipped demo ViT (DINO on the demo scenes): it attends to objects, and carries its recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from maskdistill.backbone import DEMO_WEIGHTS, create_vit
from maskdistill.demo import draw_scene
from maskdistill.mask_quality import cls_attention_on_objects

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.fixture(scope="module")
def val_scenes():
    demo = DEMO_CONFIG["dataset"]["demo"]
    scenes = [draw_scene(demo, "val", i) for i in range(int(demo["num_val"]))]
    return [s[0] for s in scenes], [s[1] > 0 for s in scenes]


def test_demo_config_mines_and_clusters_with_the_shipped_weights():
    for section in ("mining", "clustering"):
        assert DEMO_CONFIG[section]["backbone"] == {"name": "vit_demo_patch8_128.dino_demo",
                                                    "pretrained": True, "checkpoint": None}
    assert DEMO_WEIGHTS.is_file() and DEMO_WEIGHTS.stat().st_size <= 15 * 2**20


def test_shipped_weights_record_the_config_that_reproduces_them():
    with safe_open(str(DEMO_WEIGHTS), "pt") as f:
        recipe = json.loads(f.metadata()["pretrain_config"])
        data = json.loads(f.metadata()["data_recipe"])
    for key, value in DEMO_CONFIG["pretrain"].items():
        if key != "enabled":
            assert recipe[key] == value, key
    # drawn by the demo generator with the demo's own settings (background included)
    assert data == {"demo": DEMO_CONFIG["dataset"]["demo"],
                    "demo_scenes": DEMO_CONFIG["pretrain"]["demo_scenes"]}


def test_shipped_vit_attends_to_objects_and_a_random_one_does_not(val_scenes):
    images, foregrounds = val_scenes
    trained = cls_attention_on_objects(create_vit("vit_demo_patch8_128.dino_demo", pretrained=True),
                                       images, foregrounds)
    random = cls_attention_on_objects(create_vit("vit_demo_patch8_128"), images, foregrounds)
    assert abs(random["share"] - random["area"]) < 3.0
    # the heads mining averages (mining.cls_heads of the demo config) look at objects 2.5x their area
    heads = DEMO_CONFIG["mining"]["cls_heads"]
    mined_heads = trained["share_per_head"][:heads]
    assert sum(mined_heads) / len(mined_heads) > 2.5 * trained["area"]
