"""Ground truth: semantic maps pasted from COCO instances, and label folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdistill.ground_truth import folder_ground_truth, semantic_from_coco
from maskdistill.paper import VOC_CLASSES_WITH_BACKGROUND
from maskdistill.storage import encode_rle, write_label_png


def box_mask(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths starting with zeros), as crowd uses."""
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def voc_like_split(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    images, gt_dir = tmp_path / "images", tmp_path / "gt"
    gts = {}
    for i, key in enumerate(("a", "b")):
        gt = np.zeros((6, 8), np.uint8)
        gt[1:4, 1:5] = 15 if i == 0 else 8  # person / cat
        gt[0, :] = 255  # void border
        gts[key] = gt
        write_label_png(gt_dir / f"{key}.png", gt)
        images.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(images / f"{key}.jpg")
    return images, gt_dir, gts


# ---------------------------------------------------------------- COCO ground truth


def test_semantic_from_coco_crowd_and_small_on_top():
    h, w = 6, 8
    big = box_mask(h, w, 0, 5, 0, 6)  # person, 30 px
    small = box_mask(h, w, 1, 3, 1, 3)  # cat inside the person, 4 px
    crowd = box_mask(h, w, 4, 6, 5, 8)  # crowd of cats, overlapping the person's corner
    coco = {
        "images": [{"id": 7, "file_name": "x.jpg", "height": h, "width": w}],
        # unsorted category ids: person (1) -> 1, cat (3) -> 2
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": encode_rle(small)},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": encode_rle(big)},
            {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1,
             "segmentation": uncompressed_rle(crowd)},
            {"id": 4, "image_id": 8, "category_id": 1, "iscrowd": 0,
             "segmentation": encode_rle(np.ones((h, w), bool))},  # another image
        ],
    }
    expected = np.zeros((h, w), np.uint8)
    expected[0:5, 0:6] = 1
    expected[4:6, 5:8] = 255  # crowd (6 px) is smaller than the person: pasted after it
    expected[1:3, 1:3] = 2
    got = semantic_from_coco(coco, coco["images"][0])
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- GT label folders


def test_gt_folder_scores_the_split_and_needs_a_map_per_image(tmp_path):
    images, gt_dir, _ = voc_like_split(tmp_path)
    # other maps in the folder (VOC's SegmentationClass also holds train) are ignored
    assert folder_ground_truth(gt_dir, VOC_CLASSES_WITH_BACKGROUND, {"a": images / "a.jpg"}).keys == ("a",)
    with pytest.raises(FileNotFoundError, match="no label map, e.g. 'zzz.png'"):
        folder_ground_truth(gt_dir, VOC_CLASSES_WITH_BACKGROUND,
                            {"a": images / "a.jpg", "zzz": images / "zzz.jpg"})
