"""The pipeline's front half on real photographs (../shared/data/coco128-seg)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, planned_rules, snakemake
from PIL import Image

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128-seg"
pytestmark = pytest.mark.skipif(not COCO128.is_dir(), reason=f"{COCO128} is not present")


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    """A workdir whose config points at coco128 (train: its images; val: a COCO file of 8)."""
    from maskdistill.storage import write_json
    from maskdistill.yolo import COCO80_NAMES, yolo_to_coco

    work = tmp_path_factory.mktemp("coco128")
    images = COCO128 / "images" / "train2017"
    coco = yolo_to_coco(images, COCO128 / "labels" / "train2017", COCO80_NAMES)
    keep = {im["id"] for im in coco["images"][:8]}
    val = {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}
    write_json(work / "val.json", val)
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"] = {"source": "images", "num_shards": 4,
                      "train": {"images": str(images)},
                      "val": {"images": str(images), "annotations": str(work / "val.json")}}
    cfg["mining"]["short_side"] = 96
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    return work, val


def test_dry_run_plans_every_stage_on_real_photos(coco128):
    work, _ = coco128
    planned = planned_rules(snakemake(work, "-n"))
    assert {"mine", "cluster_features", "cluster", "train_detector", "pseudo_labels", "initial_labels",
            "train_segmentation", "predict_segmentation", "evaluate"} <= planned
    assert "make_demo" not in planned


def test_mining_real_photos_gives_one_mask_per_image_at_full_size(coco128):
    from maskdistill.datasets import list_coco_images, shard_records
    from maskdistill.storage import read_mask_shard

    work, val = coco128
    snakemake(work, "results/masks/val/shard-000.h5", "results/masks/val/shard-001.h5",
              "results/masks/val/shard-002.h5", "results/masks/val/shard-003.h5")
    items = [it for s in range(4)
             for it in read_mask_shard(work / "results" / "masks" / "val" / f"shard-{s:03d}.h5")]
    expected = {Path(im["file_name"]).stem: (im["height"], im["width"]) for im in val["images"]}
    assert {it.key: (it.height, it.width) for it in items} == expected
    for it in items:
        with Image.open(COCO128 / "images" / "train2017" / it.file_name) as im:
            assert it.mask.shape == (im.height, im.width)
        assert it.mask.any() and it.mask.mean() < 1.0
    records = list_coco_images(COCO128 / "images" / "train2017", work / "val.json")
    assert sum(len(shard_records(records, s, 4)) for s in range(4)) == len(items) == 8
