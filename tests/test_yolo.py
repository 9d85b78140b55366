"""Tests of the YOLO-segmentation -> COCO converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskdistill.images import read_rgb
from maskdistill.storage import decode_segmentation, read_json
from maskdistill.yolo import (
    COCO80_NAMES,
    image_size,
    orphan_label_files,
    write_coco,
    yolo_to_coco,
)

COCO128 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco128-seg"


def _dataset(tmp_path: Path, labels: dict[str, str], size_wh=(8, 4)) -> tuple[Path, Path]:
    images, label_dir = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    label_dir.mkdir()
    for key in ("a", "b"):
        Image.new("RGB", size_wh, (10, 20, 30)).save(images / f"{key}.png")
    for key, text in labels.items():
        (label_dir / f"{key}.txt").write_text(text)
    return images, label_dir


def test_coco80_names():
    assert len(COCO80_NAMES) == 80 == len(set(COCO80_NAMES))
    assert COCO80_NAMES[0] == "person" and COCO80_NAMES[45] == "bowl"
    assert COCO80_NAMES[-1] == "toothbrush"


def test_square_polygon_gives_known_box_area_and_mask(tmp_path):
    # image 8 wide x 4 high; square x in [0.25, 0.75] -> 2..6 px, y in [0.25, 0.75] -> 1..3 px
    images, labels = _dataset(tmp_path, {"a": "2 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75\n\n"})
    data = yolo_to_coco(images, labels, ["x", "y", "z"])
    assert data["images"] == [
        {"id": 1, "file_name": "a.png", "height": 4, "width": 8},
        {"id": 2, "file_name": "b.png", "height": 4, "width": 8},
    ]
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert data["categories"][2]["name"] == "z"
    (ann,) = data["annotations"]
    assert ann["image_id"] == 1 and ann["category_id"] == 3 and ann["iscrowd"] == 0
    assert ann["segmentation"] == [[2.0, 1.0, 6.0, 1.0, 6.0, 3.0, 2.0, 3.0]]
    assert ann["bbox"] == [2.0, 1.0, 4.0, 2.0]
    assert ann["area"] == 8
    expected = np.zeros((4, 8), bool)
    expected[1:3, 2:6] = True
    assert np.array_equal(decode_segmentation(ann["segmentation"], 4, 8), expected)


def test_write_coco_loads_with_pycocotools(tmp_path):
    images, labels = _dataset(
        tmp_path, {"a": "0 0 0 1 0 1 1 0 1\n", "b": "1 0 0 0.5 0 0 1\n"}
    )
    out = tmp_path / "out" / "instances.json"
    write_coco(out, yolo_to_coco(images, labels, ["x", "y"]))
    assert read_json(out)["annotations"][0]["area"] == 32
    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    assert [a["category_id"] for a in anns] == [2]
    mask = coco.annToMask(anns[0])
    assert mask.shape == (4, 8) and mask.sum() == anns[0]["area"] > 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.1 0.1 0.5 0.1 0.5", "odd number"),
        ("3 0.1 0.1 0.5 0.1 0.5 0.5", "class 3 outside 0..2"),
        ("-1 0.1 0.1 0.5 0.1 0.5 0.5", "outside"),
        ("0.5 0.1 0.1 0.5 0.1 0.5 0.5", "outside"),
        ("0 0.1 0.1 0.5 0.1", "at least 3 vertices"),
        ("0 0.1 0.1 0.5 x 0.5 0.5", "non-numeric"),
        ("0 10 10 50 10 50 50", "normalised"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    images, labels = _dataset(tmp_path, {"b": "1 0.1 0.1 0.5 0.1 0.5 0.5\n" + line + "\n"})
    with pytest.raises(ValueError, match=message) as err:
        yolo_to_coco(images, labels, ["x", "y", "z"])
    assert "b.txt, line 2" in str(err.value)


def test_exif_rotated_size_matches_read_rgb(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    Image.new("RGB", (10, 4)).save(path, exif=exif)
    assert image_size(path) == read_rgb(path).shape[:2] == (10, 4)


def test_orphan_label_files_are_reported(tmp_path):
    images, labels = _dataset(tmp_path, {"a": "0 0 0 1 0 1 1\n", "zz": "0 0 0 1 0 1 1\n"})
    assert orphan_label_files(images, labels) == ["zz.txt"]
    assert len(yolo_to_coco(images, labels, ["x"])["annotations"]) == 1


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"coco128-seg not found at {COCO128}")
def test_real_coco128_seg():
    images = COCO128 / "images" / "train2017"
    labels = COCO128 / "labels" / "train2017"
    data = yolo_to_coco(images, labels, COCO80_NAMES)
    assert len(data["images"]) == 128
    # DATA.md counts 941 label lines, but 000000000656.txt (3) and 000000000659.txt (9) have no
    # image (and 000000000250.jpg, 000000000508.jpg have no label file): 941 - 12 remain.
    assert orphan_label_files(images, labels) == ["000000000656.txt", "000000000659.txt"]
    assert len(data["annotations"]) == 929
    assert len({a["category_id"] for a in data["annotations"]}) == 71
    assert all(a["area"] > 0 for a in data["annotations"])
    first = next(im for im in data["images"] if im["file_name"] == "000000000009.jpg")
    assert (first["height"], first["width"]) == (480, 640)
    bowls = [a for a in data["annotations"] if a["image_id"] == first["id"]]
    assert bowls[0]["category_id"] == COCO80_NAMES.index("bowl") + 1
