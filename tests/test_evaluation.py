"""Stage 5: confusion, Hungarian / majority matching, mIoU, COCO ground truth and the report."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdistill.evaluation import (
    confusion_matrix,
    evaluate,
    evaluate_stage,
    match_clusters,
    miou_after_matching,
    semantic_from_coco,
)
from maskdistill.storage import encode_rle, write_json, write_label_png


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


# ---------------------------------------------------------------- confusion


def test_confusion_by_hand_and_ignore_skipped():
    pred = np.array([[0, 1, 2], [1, 2, 2]])
    gt = np.array([[0, 1, 255], [255, 1, 0]])
    conf = confusion_matrix(pred, gt, num_pred=3, num_gt=2)
    # kept pixels (pred, gt): (0,0) (1,1) (2,1) (2,0); the two gt=255 pixels are skipped
    assert conf.dtype == np.int64
    assert conf.tolist() == [[1, 0], [0, 1], [1, 1]]
    assert conf.sum() == 4


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="predicted label 3"):
        confusion_matrix(np.array([[3]]), np.array([[0]]), num_pred=3, num_gt=2)
    with pytest.raises(ValueError, match="ground-truth label 5"):
        confusion_matrix(np.array([[0]]), np.array([[5]]), num_pred=3, num_gt=2)
    # a bad prediction under an ignored GT pixel does not count
    assert confusion_matrix(np.array([[9]]), np.array([[255]]), 3, 2).sum() == 0


# ---------------------------------------------------------------- matching + mIoU


def test_hungarian_iou_on_a_permuted_case():
    # pred 0 is mostly class 2, pred 1 is class 0, pred 2 mostly class 1
    conf = np.array([[0, 2, 8], [10, 0, 0], [2, 6, 0]])
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [2, 0, 1]
    m = miou_after_matching(conf, mapping, ["background", "a", "b"])
    # IoU bg = 10/(10+12-10), a = 6/(8+8-6), b = 8/(10+8-8)
    assert m["per_class"]["background"] == pytest.approx(100 * 10 / 12)
    assert m["per_class"]["a"] == pytest.approx(60.0)
    assert m["per_class"]["b"] == pytest.approx(80.0)
    assert m["miou"] == pytest.approx((100 * 10 / 12 + 60 + 80) / 3)  # 74.44
    assert m["pixel_accuracy"] == pytest.approx(100 * 24 / 28)
    assert m["mapping"] == [2, 0, 1]


def test_class_absent_from_gt_and_prediction_is_left_out():
    conf = np.array([[4, 0, 0], [1, 3, 0]])  # class 2 never appears; 2 preds <= 3 classes
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1]
    m = miou_after_matching(conf, mapping, ["bg", "x", "y"])
    assert m["per_class"] == {"bg": pytest.approx(80.0), "x": pytest.approx(75.0), "y": None}
    assert m["miou"] == pytest.approx(77.5)


def test_gt_class_with_no_matched_prediction_counts_as_zero():
    conf = np.array([[6, 2]])  # one predicted label, two present classes
    m = miou_after_matching(conf, match_clusters(conf), ["bg", "x"])
    assert m["per_class"] == {"bg": pytest.approx(75.0), "x": 0.0}
    assert m["miou"] == pytest.approx(37.5)


def test_permuting_predicted_ids_keeps_miou():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(20, 30))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.integers(0, 4))
    names = ["bg", "a", "b", "c"]
    perm = np.array([3, 0, 2, 1])
    for mode in ("iou", "confusion"):
        c1 = confusion_matrix(pred, gt, 4, 4)
        c2 = confusion_matrix(perm[pred], gt, 4, 4)
        m1 = miou_after_matching(c1, match_clusters(c1, mode), names)
        m2 = miou_after_matching(c2, match_clusters(c2, mode), names)
        assert m1["miou"] == pytest.approx(m2["miou"])
        assert m1["per_class"] == pytest.approx(m2["per_class"])
        assert match_clusters(c1, mode).tolist() == [0, 1, 2, 3]
        assert match_clusters(c2, mode)[perm].tolist() == [0, 1, 2, 3]


def test_confusion_and_iou_modes_pick_different_matchings():
    conf = np.array([[0, 2], [2, 5]])
    # counts: identity 0+5=5 > swap 2+2=4; IoU: identity 0 + 5/9 = 0.556 < swap 2/7 + 2/7 = 0.571
    assert match_clusters(conf, "confusion").tolist() == [0, 1]
    assert match_clusters(conf, "iou").tolist() == [1, 0]
    by_iou = miou_after_matching(conf, match_clusters(conf, "iou"), ["bg", "x"])
    by_count = miou_after_matching(conf, match_clusters(conf, "confusion"), ["bg", "x"])
    assert by_iou["miou"] == pytest.approx(100 * 2 / 7)
    assert by_count["miou"] == pytest.approx(100 * 5 / 9 / 2)
    assert by_iou["pixel_accuracy"] == pytest.approx(100 * 4 / 9)
    assert by_count["pixel_accuracy"] == pytest.approx(100 * 5 / 9)
    with pytest.raises(ValueError, match="matching mode"):
        match_clusters(conf, "dice")


def test_overclustering_majority_vote():
    conf = np.array([[5, 1], [0, 3], [2, 2], [0, 0]])  # 4 preds > 2 classes
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1, 0, 0]  # tie -> lowest class, empty row -> class 0
    m = miou_after_matching(conf, mapping, ["bg", "x"])
    # merged: class 0 <- preds 0,2,3 = [7, 3]; class 1 <- pred 1 = [0, 3]
    assert m["per_class"]["bg"] == pytest.approx(70.0)  # 7 / (10 + 7 - 7)
    assert m["per_class"]["x"] == pytest.approx(50.0)  # 3 / (3 + 6 - 3)
    assert m["miou"] == pytest.approx(60.0)
    assert m["pixel_accuracy"] == pytest.approx(100 * 10 / 13)


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


# ---------------------------------------------------------------- end to end


def make_split(tmp_path: Path):
    """3 tiny images with GT; returns (coco path, images root, {key: GT label map})."""
    root = tmp_path / "images"
    specs = {  # key: (h, w, [(category id, iscrowd, r0, r1, c0, c1)])
        "a": (6, 8, [(1, 0, 1, 4, 1, 5)]),
        "b": (6, 8, [(3, 0, 0, 2, 0, 2), (1, 0, 3, 5, 3, 7)]),
        "sub/c": (5, 7, [(3, 0, 2, 5, 2, 6), (1, 1, 0, 1, 0, 7)]),
    }
    images, anns, gts = [], [], {}
    for i, (key, (h, w, objs)) in enumerate(specs.items()):
        path = root / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(path)
        images.append({"id": 10 + i, "file_name": f"{key}.png", "height": h, "width": w})
        gt = np.zeros((h, w), np.uint8)
        for cat, crowd, r0, r1, c0, c1 in objs:
            m = box_mask(h, w, r0, r1, c0, c1)
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": cat,
                         "iscrowd": crowd, "segmentation": encode_rle(m)})
            gt[m] = 255 if crowd else {1: 1, 3: 2}[cat]
        gts[key] = gt
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "cat"}]}
    write_json(tmp_path / "instances.json", coco)
    return tmp_path / "instances.json", root, gts


def test_evaluate_end_to_end(tmp_path):
    coco_path, root, gts = make_split(tmp_path)
    perm = np.array([2, 0, 1, 2])  # GT class -> predicted id (255 -> 2, any valid id)
    perfect, zeros = tmp_path / "pred_perfect", tmp_path / "pred_zeros"
    for key, gt in gts.items():
        write_label_png(perfect / f"{key}.png", perm[np.where(gt == 255, 3, gt)])
        write_label_png(zeros / f"{key}.png", np.zeros_like(gt))
    out = tmp_path / "out"
    metrics = evaluate({"initial_masks": perfect, "segmentation": zeros}, coco_path, root,
                       num_pred=3, out_metrics=out / "metrics.json", out_report=out / "report.md",
                       out_figure=out / "report.png", notes=["the ViT was randomly initialised"])
    assert metrics["initial_masks"]["miou"] == pytest.approx(100.0)
    assert metrics["initial_masks"]["mapping"] == [1, 2, 0]  # inverse of perm
    # labelled pixels: 48 + 48 + (35 - 7 crowd) = 124; person 12 + 8, cat 4 + 12, background 88
    z = metrics["segmentation"]
    assert z["per_class"]["background"] == pytest.approx(100 * 88 / 124)
    assert z["per_class"]["person"] == 0.0 and z["per_class"]["cat"] == 0.0
    assert z["miou"] == pytest.approx(100 * 88 / 124 / 3)
    assert z["pixel_accuracy"] == pytest.approx(100 * 88 / 124)

    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"initial_masks", "segmentation", "meta"}
    assert saved["initial_masks"]["per_class"]["cat"] == pytest.approx(100.0)
    assert saved["meta"]["class_names"] == ["background", "person", "cat"]
    assert saved["meta"]["num_images"] == 3
    report = (out / "report.md").read_text()
    assert "| initial_masks | 100.0 | 100.0 |" in report
    assert "| class | initial_masks | segmentation |" in report
    assert "| person | 100.0 | 0.0 |" in report
    assert "- the ViT was randomly initialised" in report
    assert "![examples](report.png)" in report
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md", "report.png"]

    m, mapping = evaluate_stage(perfect, coco_path, root, num_pred=3)
    assert m["miou"] == pytest.approx(100.0) and mapping.tolist() == [1, 2, 0]


def test_evaluate_missing_or_mismatched_prediction(tmp_path):
    coco_path, root, gts = make_split(tmp_path)
    pred = tmp_path / "pred"
    write_label_png(pred / "a.png", gts["a"])
    write_label_png(pred / "b.png", gts["b"])
    with pytest.raises(FileNotFoundError, match=r"sub/c\.png"):
        evaluate_stage(pred, coco_path, root, num_pred=3)
    write_label_png(pred / "sub/c.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"c\.png is 4x4 .* 5x7"):
        evaluate_stage(pred, coco_path, root, num_pred=3)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate({"s": tmp_path / "nowhere"}, coco_path, root, 3, out / "m.json",
                 out / "r.md", out / "f.png", notes=[])
    assert not out.exists() or not any(out.iterdir())
