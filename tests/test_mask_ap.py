"""Mask AP: Hungarian matching of clusters to categories, then pycocotools ``segm``."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import pytest

from maskdistill.storage import encode_rle, write_json


def _rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def _ann(i: int, image_id: int, cat: int, mask: np.ndarray, score: float | None = None) -> dict:
    ys, xs = np.nonzero(mask)
    a = {"id": i, "image_id": image_id, "category_id": cat, "segmentation": encode_rle(mask),
         "area": int(mask.sum()), "iscrowd": 0,
         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                  float(ys.max() - ys.min() + 1)]}
    if score is not None:
        a["score"] = score
    return a


H, W = 40, 40
# two images; GT categories 3 ("cat") and 7 ("dog")
GT_MASKS = {
    1: [(3, _rect(H, W, 2, 12, 2, 12)), (7, _rect(H, W, 20, 36, 20, 36))],
    2: [(7, _rect(H, W, 5, 25, 5, 25))],
}


def _write_gt(tmp_path: Path) -> Path:
    anns = [_ann(0, im, cat, m) for im, objs in GT_MASKS.items() for cat, m in objs]
    for i, a in enumerate(anns):
        a["id"] = i + 1
    gt = {"images": [{"id": i, "file_name": f"im{i}.png", "height": H, "width": W} for i in GT_MASKS],
          "annotations": anns, "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    write_json(tmp_path / "gt.json", gt)
    return tmp_path / "gt.json"


def _write_preds(tmp_path: Path, preds: list[dict], name: str = "pred.json") -> Path:
    write_json(tmp_path / name, preds)
    return tmp_path / name


def test_mask_ap_perfect_and_swapped_cluster_ids_score_100(tmp_path):
    from maskdistill.mask_ap import mask_ap

    gt = _write_gt(tmp_path)
    for cluster_of in ({3: 1, 7: 2}, {3: 2, 7: 1}):  # cluster ids in either order
        preds = [_ann(0, im, cluster_of[cat], m, 0.9) for im, objs in GT_MASKS.items()
                 for cat, m in objs]
        r = mask_ap(gt, _write_preds(tmp_path, preds), "multi")
        assert r["AP"] == pytest.approx(100.0) and r["AP50"] == pytest.approx(100.0)
        assert r["mapping"] == {str(v): k for k, v in cluster_of.items()}


def test_mask_ap_partial_overlap_counts_at_50_not_75(tmp_path):
    from maskdistill.mask_ap import mask_ap

    gt_mask = _rect(H, W, 0, 10, 0, 10)  # 100 pixels
    pred = _rect(H, W, 0, 6, 0, 10)
    pred[6, :2] = True  # 62 pixels inside the GT: IoU 0.62
    gt = {"images": [{"id": 1, "file_name": "x.png", "height": H, "width": W}],
          "annotations": [_ann(1, 1, 5, gt_mask)], "categories": [{"id": 5, "name": "thing"}]}
    write_json(tmp_path / "gt.json", gt)
    r = mask_ap(tmp_path / "gt.json", _write_preds(tmp_path, [_ann(0, 1, 1, pred, 0.8)]), "multi")
    assert r["AP50"] == pytest.approx(100.0)
    assert r["AP75"] == pytest.approx(0.0)
    assert r["AP"] == pytest.approx(30.0)  # thresholds 0.50, 0.55, 0.60 of ten


def test_mask_ap_equals_pycocotools_on_the_matched_results(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from maskdistill.mask_ap import mask_ap

    gt = _write_gt(tmp_path)
    rng = np.random.default_rng(0)
    preds = []
    for im, objs in GT_MASKS.items():
        for cat, m in objs:  # jittered copies with cluster 1 = dog, 2 = cat, and a false positive
            shift = int(rng.integers(-3, 4))
            preds.append(_ann(0, im, {3: 2, 7: 1}[cat], np.roll(m, shift, axis=1),
                              float(rng.uniform(0.3, 1.0))))
        preds.append(_ann(0, im, 2, _rect(H, W, 30, 38, 0, 8), 0.5))
    r = mask_ap(gt, _write_preds(tmp_path, preds), "multi")
    assert r["mapping"] == {"1": 7, "2": 3}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        dets = coco.loadRes([dict(p, category_id={1: 7, 2: 3}[p["category_id"]]) for p in preds])
        ev = COCOeval(coco, dets, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert r["AP"] == pytest.approx(100 * ev.stats[0])
    assert r["AP50"] == pytest.approx(100 * ev.stats[1])
    assert 0 < r["AP"] < 100


def test_single_object_setting_keeps_top_prediction_and_its_best_box_object(tmp_path):
    from maskdistill.mask_ap import mask_ap, select_single
    from maskdistill.storage import read_json

    gt = _write_gt(tmp_path)
    cat_m, dog_m = GT_MASKS[1][0][1], GT_MASKS[1][1][1]
    preds = [_ann(0, 1, 1, dog_m, 0.95), _ann(0, 1, 2, cat_m, 0.4),
             _ann(0, 2, 1, GT_MASKS[2][0][1], 0.7)]
    single_gt, single_preds = select_single(read_json(gt), preds)
    assert [p["score"] for p in single_preds] == [0.95, 0.7]
    kept = {a["image_id"]: a["category_id"] for a in single_gt["annotations"]}
    assert kept == {1: 7, 2: 7}  # image 1: the dog (box IoU 1 with the top prediction), not the cat
    r = mask_ap(gt, _write_preds(tmp_path, preds), "single")
    assert r["AP"] == pytest.approx(100.0) and r["num_gt_objects"] == 2 and r["num_predictions"] == 2
    multi = mask_ap(gt, _write_preds(tmp_path, preds), "multi")
    assert multi["AP"] == pytest.approx(100.0)  # cluster 2 -> cat, all three found


def test_the_reference_single_object_rule_skips_images_without_a_prediction(tmp_path):
    from maskdistill.mask_ap import mask_ap, mask_ap_report, select_single
    from maskdistill.storage import read_json

    gt = _write_gt(tmp_path)
    preds = _write_preds(tmp_path, [_ann(0, 1, 1, GT_MASKS[1][0][1], 0.9)])  # image 1's cat; none on 2
    ours = mask_ap(gt, preds, "single")
    # ours: image 2 keeps its dog as a miss: cat AP 100, dog AP 0
    assert (ours["AP"], ours["AP50"], ours["num_gt_objects"]) == (pytest.approx(50.0), pytest.approx(50.0), 2)
    reference = mask_ap(gt, preds, "single", single_rule="reference")
    # the reference skips image 2: no dog is left, only the cat is scored
    assert (reference["AP"], reference["AP50"], reference["num_gt_objects"]) == (pytest.approx(100.0),
                                                                                pytest.approx(100.0), 1)
    assert reference["single_object"] == "reference" and reference["mapping"] == {"1": 3}
    kept, _ = select_single(read_json(gt), [_ann(0, 1, 1, GT_MASKS[1][0][1], 0.9)], rule="reference")
    assert [(a["image_id"], a["category_id"]) for a in kept["annotations"]] == [(1, 3)]
    both = mask_ap_report(gt, preds, "reference")
    assert both["single"]["AP"] == pytest.approx(100.0)
    assert both["multi"]["AP"] == pytest.approx(50.0)  # multi is unchanged: cat 100, both dogs missed
    with pytest.raises(ValueError, match="evaluation.single_object"):
        mask_ap(gt, preds, "single", single_rule="authors")


def test_mask_ap_reads_detector_output_by_file_name(tmp_path):
    from maskdistill.mask_ap import mask_ap

    gt = _write_gt(tmp_path)
    anns = [_ann(k, {1: 11, 2: 12}[im], {3: 1, 7: 2}[cat], m, 0.9)
            for k, (im, objs) in enumerate(GT_MASKS.items()) for cat, m in objs]
    det = {"images": [{"id": 11, "file_name": "im1.png"}, {"id": 12, "file_name": "im2.png"}],
           "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
    write_json(tmp_path / "det.json", det)
    assert mask_ap(gt, tmp_path / "det.json", "multi")["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="setting"):
        mask_ap(gt, tmp_path / "det.json", "both")


def _random_split(seed: int, n_images: int = 7):
    """GT (crowd objects too) and results: shifted copies of the objects, some with the wrong
    category, false positives, scores tied across images, and one image with more than 100
    detections of a category (pycocotools keeps the 100 best)."""
    rng = np.random.default_rng(seed)
    h, w, cats = 24, 32, [2, 5, 9]

    def rect() -> np.ndarray:
        r0, c0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        r1, c1 = r0 + int(rng.integers(3, h - r0 + 1)), c0 + int(rng.integers(3, w - c0 + 1))
        return _rect(h, w, r0, r1, c0, c1)

    def score() -> float:
        return float(rng.choice([0.3, 0.6, 0.9]))

    images = [{"id": 10 + 3 * i, "file_name": f"im{i}.png", "height": h, "width": w} for i in range(n_images)]
    anns, results = [], []
    for im in images:
        for _ in range(int(rng.integers(0, 4))):
            mask, cat = rect(), int(rng.choice(cats))
            anns.append(_ann(len(anns) + 1, im["id"], cat, mask))
            anns[-1]["iscrowd"] = int(rng.random() < 0.15)
            if rng.random() < 0.8:
                found = cat if rng.random() < 0.8 else int(rng.choice(cats))
                results.append(_ann(0, im["id"], found, np.roll(mask, int(rng.integers(-2, 3)), 1), score()))
        results += [_ann(0, im["id"], int(rng.choice(cats)), rect(), score())
                    for _ in range(int(rng.integers(3)))]
    many = _rect(h, w, 2, 20, 2, 20)
    anns.append(_ann(len(anns) + 1, images[1]["id"], 5, many))
    results += [_ann(0, images[1]["id"], 5, np.roll(many, int(rng.integers(-6, 7)), 0), float(rng.uniform()))
                for _ in range(104)]
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cats]}
    return gt, results


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_accumulated_over_chunks_of_images_equals_pycocotools_at_once(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from maskdistill.mask_ap import coco_segm_stats

    gt, results = _random_split(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    expected = {"AP": 100 * ev.stats[0], "AP50": 100 * ev.stats[1], "AP75": 100 * ev.stats[2]}
    assert 0 < expected["AP"] < 100
    for chunk in (1, 2, 3, 7):
        assert coco_segm_stats(gt, results, chunk_images=chunk) == expected  # exactly, not approximately


def test_mask_ap_streams_predictions_in_any_order_with_the_same_result(tmp_path):
    from maskdistill.mask_ap import mask_ap

    gt, results = _random_split(2)
    write_json(tmp_path / "gt.json", gt)
    preds = [dict(r, category_id={2: 3, 5: 1, 9: 2}[r["category_id"]]) for r in results]  # cluster ids
    # interleaved: the first prediction of every image, then the second, ... (each image's own
    # order kept: it breaks ties between equal scores)
    rank = [sum(q["image_id"] == p["image_id"] for q in preds[:i]) for i, p in enumerate(preds)]
    order = sorted(range(len(preds)), key=lambda i: rank[i])
    assert order != sorted(order)
    for setting in ("multi", "single"):
        grouped = mask_ap(tmp_path / "gt.json", _write_preds(tmp_path, preds, "a.json"), setting)
        shuffled = mask_ap(tmp_path / "gt.json", _write_preds(tmp_path, [preds[i] for i in order], "b.json"),
                           setting, chunk_images=2)
        assert shuffled == grouped
        assert grouped["num_predictions"] == (len(preds) if setting == "multi" else 7)


def test_cli_mask_ap_passes_the_single_object_rule(tmp_path):
    from maskdistill.cli import main
    from maskdistill.storage import read_json

    gt = _write_gt(tmp_path)
    preds = _write_preds(tmp_path, [_ann(0, 1, 1, GT_MASKS[1][0][1], 0.9)])
    for rule, single_ap in (("reference", 100.0), ("ours", 50.0)):
        out = tmp_path / f"{rule}.json"
        assert main(["mask-ap", "--gt", str(gt), "--predictions", str(preds), "--single-object", rule,
                     "--out", str(out)]) == 0
        single = read_json(out)["single"]
        assert single["AP"] == pytest.approx(single_ap) and single["single_object"] == rule
