"""Mined-mask quality (IoU, CorLoc, label bounds), CLS attention on objects, category separability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskdistill.backbone import create_vit
from maskdistill.mask_quality import (
    category_separability,
    mask_iou,
    mined_label_bounds,
    mined_mask_quality,
    object_crop_features,
)
from maskdistill.storage import (
    MaskShardWriter,
    MinedMask,
    box_iou,
    encode_rle,
    mask_to_box,
    write_json,
)


def square(h, w, y0, x0, size):
    m = np.zeros((h, w), bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def write_gt(path, objects_per_image, categories_per_image=None):
    images, anns = [], []
    for i, objects in enumerate(objects_per_image, start=1):
        images.append({"id": i, "file_name": f"im{i}.png", "height": 20, "width": 20})
        cats = categories_per_image[i - 1] if categories_per_image else [1] * len(objects)
        for mask, cat in zip(objects, cats, strict=True):
            x0, y0, x1, y1 = mask_to_box(mask)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "iscrowd": 0,
                         "segmentation": encode_rle(mask), "area": int(mask.sum()),
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})
    names = sorted({c for cs in categories_per_image or [[1]] for c in cs})
    write_json(path, {"images": images, "annotations": anns,
                      "categories": [{"id": c, "name": f"c{c}"} for c in names]})


def write_shard(path, masks):
    with MaskShardWriter(path, {"backbone": "test"}) as w:
        for key, mask in masks.items():
            w.append(MinedMask(key, f"{key}.png", 20, 20, mask, mask_to_box(mask),
                               np.zeros((2, 2), bool), np.arange(4, dtype=np.float32).reshape(2, 2), 0))


def test_box_and_mask_iou_of_known_geometry():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert mask_iou(square(20, 20, 0, 0, 10), square(20, 20, 0, 5, 10)) == pytest.approx(50 / 150)


def test_mined_mask_quality_takes_the_best_object_and_counts_corloc(tmp_path):
    a, b = square(20, 20, 0, 0, 8), square(20, 20, 10, 10, 8)
    write_gt(tmp_path / "gt.json", [[a, b], [a], []])
    # image 1: exactly object b; image 2: shifted by 4 px (IoU 4*8/(2*64-32) = 1/3 < 0.5)
    write_shard(tmp_path / "s.h5", {"im1": b, "im2": square(20, 20, 0, 4, 8)})
    q = mined_mask_quality([tmp_path / "s.h5"], tmp_path / "gt.json")
    assert q["images"] == 2  # im3 has no objects
    assert q["mask_iou"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert q["corloc"] == pytest.approx(50.0)


def test_an_image_without_a_mined_mask_counts_as_a_miss(tmp_path):
    a = square(20, 20, 0, 0, 8)
    write_gt(tmp_path / "gt.json", [[a], [a]])
    write_shard(tmp_path / "s.h5", {"im1": a})
    q = mined_mask_quality([tmp_path / "s.h5"], tmp_path / "gt.json")
    assert q["corloc"] == 50.0 and q["missing"] == 1


def test_label_bounds_of_perfect_masks_are_100_for_the_oracle_and_less_for_chance(tmp_path):
    a, b = square(20, 20, 0, 0, 8), square(20, 20, 10, 10, 6)
    objects = [[a if i % 2 else b] for i in range(16)]
    cats = [[1 + i % 2] for i in range(16)]
    write_gt(tmp_path / "gt.json", objects, cats)
    write_shard(tmp_path / "s.h5", {f"im{i + 1}": obj[0] for i, obj in enumerate(objects)})
    bounds = mined_label_bounds([tmp_path / "s.h5"], tmp_path / "gt.json", num_clusters=2)
    assert bounds["oracle_miou"] == pytest.approx(100.0)
    assert bounds["random_miou"] < 90.0 and bounds["masks"] == 16


def test_label_bounds_oracle_is_limited_by_mask_quality(tmp_path):
    obj = square(20, 20, 0, 0, 8)  # 64 px; the mined mask doubles it with 64 background pixels
    mined = obj | np.roll(obj, 8, axis=1)
    write_gt(tmp_path / "gt.json", [[obj]])
    write_shard(tmp_path / "s.h5", {"im1": mined})
    bounds = mined_label_bounds([tmp_path / "s.h5"], tmp_path / "gt.json", num_clusters=1)
    background = (400 - 128) / (400 - 64)
    assert bounds["oracle_miou"] == pytest.approx(100 * (0.5 + background) / 2)
    assert bounds["random_miou"] == pytest.approx(bounds["oracle_miou"])  # one cluster: no choice


def test_mask_quality_command_adds_the_label_bounds_when_given_clusters(tmp_path):
    from maskdistill.cli import main
    from maskdistill.storage import read_json

    obj = square(20, 20, 0, 0, 8)
    write_gt(tmp_path / "gt.json", [[obj]])
    write_shard(tmp_path / "s.h5", {"im1": obj})
    args = ["mask-quality", "--masks", str(tmp_path / "s.h5"), "--gt", str(tmp_path / "gt.json")]
    main([*args, "--out", str(tmp_path / "plain.json")])
    main([*args, "--num-clusters", "3", "--out", str(tmp_path / "q.json")])
    assert "label_bounds" not in read_json(tmp_path / "plain.json")
    bounds = read_json(tmp_path / "q.json")["label_bounds"]
    assert bounds["oracle_miou"] == pytest.approx(100.0) and bounds["num_clusters"] == 3


def test_label_bounds_refuse_a_mined_image_missing_from_the_ground_truth(tmp_path):
    write_gt(tmp_path / "gt.json", [[square(20, 20, 0, 0, 8)]])
    write_shard(tmp_path / "s.h5", {"other": square(20, 20, 0, 0, 8)})
    with pytest.raises(ValueError, match="'other' is not in"):
        mined_label_bounds([tmp_path / "s.h5"], tmp_path / "gt.json", num_clusters=2)


def test_cls_attention_share_counts_object_patches(monkeypatch):
    from maskdistill import mask_quality

    vit = create_vit("vit_demo_patch8_128")
    rgb = np.zeros((32, 32, 3), np.uint8)
    fg = np.zeros((32, 32), bool)
    fg[:8, :16] = True  # patches 0 and 1 of the 4x4 grid: 2 of 16 (12.5 %)
    heads, prefix = 3, vit.num_prefix_tokens

    def fake_qk(model, x):
        q = torch.zeros(1, heads, prefix + 16, 4)
        k = torch.zeros(1, heads, prefix + 16, 4)
        q[0, :, 0, 0] = 1.0
        k[0, 0, prefix:prefix + 2, 0] = 100.0  # head 0 looks at the object patches only
        k[0, 1, prefix + 5, 0] = 100.0  # head 1 at one background patch; head 2 is uniform
        return q, k

    monkeypatch.setattr(mask_quality, "last_block_qk", fake_qk)
    out = mask_quality.cls_attention_on_objects(vit, [rgb], [fg])
    assert out["area"] == 12.5
    assert out["share_per_head"][0] == pytest.approx(100.0, abs=0.01)
    assert out["share_per_head"][1] == pytest.approx(0.0, abs=0.01)
    assert out["share_per_head"][2] == pytest.approx(12.5, abs=0.01)


def test_category_separability_of_clustered_features_is_high():
    rng = np.random.default_rng(0)
    cats = np.repeat(np.arange(1, 5), 25)
    centres = rng.normal(size=(4, 16)) * 10
    out = category_separability(centres[cats - 1] + rng.normal(size=(100, 16)), cats)
    assert out["kmeans_nmi"] > 95 and out["linear_accuracy"] == 100.0
    assert out["chance_accuracy"] == 25.0 and out["objects"] == 100


def test_a_weak_category_cue_under_strong_nuisance_is_linear_but_not_clustered():
    # 20 nuisance dimensions (like the objects' random colours) and one that holds the category
    rng = np.random.default_rng(1)
    cats = np.repeat(np.arange(1, 5), 50)
    cue = 3.0 * cats[:, None] + 0.1 * rng.normal(size=(200, 1))
    feats = np.concatenate([rng.normal(size=(200, 20)), cue], 1)
    out = category_separability(feats, cats)
    assert out["kmeans_nmi"] < 20
    assert out["linear_accuracy"] > 90


def test_category_separability_refuses_bad_input():
    feats = np.zeros((10, 4))
    with pytest.raises(ValueError, match="10 feature rows but 9 categories"):
        category_separability(feats, [1] * 9)
    with pytest.raises(ValueError, match="at least 2 categories"):
        category_separability(feats, [1] * 8 + [2] * 2)


def test_object_crop_features_describe_each_object_by_its_box():
    vit = create_vit("vit_demo_patch8_128")
    disc = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disc[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = 1
    rgb = np.full((64, 64, 3), 128, np.uint8)
    rgb[disc == 1] = (200, 40, 40)
    moved_inst, moved_rgb = np.roll(disc, (30, 30), (0, 1)) * 3, np.roll(rgb, (30, 30), (0, 1))
    feats, objects = object_crop_features(vit, [rgb, moved_rgb], [disc, moved_inst], crop_size=32)
    assert feats.shape == (2, vit.num_features)  # id 3 counted once, absent ids 1-2 skipped
    assert objects == [(0, 1), (1, 3)]
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-5)  # same object, same box crop
    with pytest.raises(ValueError, match="no ground-truth object"):
        object_crop_features(vit, [rgb], [np.zeros((64, 64), int)], crop_size=32)
