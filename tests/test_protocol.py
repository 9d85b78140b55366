"""Evaluation protocol: Hungarian mIoU by hand, mask AP vs pycocotools, CRF, linear probe, GT folders."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdistill.evaluation import (
    PAPER_VOC_PER_CLASS,
    VOC_CLASSES,
    evaluate,
    folder_ground_truth,
    match_clusters,
    miou_after_matching,
)
from maskdistill.storage import encode_rle, write_json, write_label_png

# ---------------------------------------------------------------- Hungarian / majority by hand


def test_hungarian_iou_beats_greedy_by_hand():
    # rows: predicted 0..2, cols: GT 0..2. Greedy on the largest IoU would give pred 0 -> GT 0
    # (IoU 50/(60+70-50) = 0.625), leaving pred 1 to GT 1 or 2. The optimum pairs 0->1, 1->0, 2->2.
    conf = np.array([[50, 10, 0], [20, 40, 0], [0, 0, 30]])
    # IoU table: (0,0) 50/80=.625 (0,1) 10/100=.1 (1,0) 20/110=.18 (1,1) 40/70=.571 (2,2) 1.0
    # identity: .625+.571+1 = 2.196; swap: .1+.18+1 = 1.28 -> identity wins here
    assert match_clusters(conf, "iou").tolist() == [0, 1, 2]
    # a case where maximising IoU and maximising matched pixels disagree
    conf = np.array([[60, 40], [0, 5]])
    # iou: identity 60/(100+60-60)=.6 + 5/(5+45-5)=.111 = .711; swap 40/(100+45-40)=.381 + 0 = .381
    assert match_clusters(conf, "iou").tolist() == [0, 1]
    m = miou_after_matching(conf, np.array([0, 1]), ["background", "a"])
    assert m["per_class"]["background"] == pytest.approx(60.0)
    assert m["per_class"]["a"] == pytest.approx(100 * 5 / 45)
    assert m["miou"] == pytest.approx((60.0 + 100 * 5 / 45) / 2)


def test_majority_vote_with_more_clusters_than_classes_by_hand():
    # 4 predicted labels, 2 GT classes: each predicted label goes to the class it overlaps most
    conf = np.array([[9, 1], [2, 8], [0, 3], [4, 4]])
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1, 1, 0]  # tie (4, 4) -> lowest class id
    m = miou_after_matching(conf, mapping, ["background", "thing"])
    # merged: class 0 <- rows 0, 3 = [13, 5]; class 1 <- rows 1, 2 = [2, 11]
    # IoU bg = 13 / (18 + 15 - 13) = 0.65, thing = 11 / (13 + 16 - 11) = 0.6111
    assert m["per_class"]["background"] == pytest.approx(65.0)
    assert m["per_class"]["thing"] == pytest.approx(100 * 11 / 18)
    assert m["pixel_accuracy"] == pytest.approx(100 * 24 / 31)


# ---------------------------------------------------------------- GT label folders


def _voc_like_split(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
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


def test_gt_semantic_folder_ignores_255_and_reports_paper_columns(tmp_path):
    images, gt_dir, gts = _voc_like_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        p = np.where(gt == 15, 1, np.where(gt == 8, 2, 0)).astype(np.uint8)
        p[0, :] = 2  # wrong everywhere the GT says ignore: must not count
        write_label_png(pred / f"{key}.png", p)
    gt = folder_ground_truth(gt_dir, VOC_CLASSES, {"a": images / "a.jpg", "b": images / "b.jpg"})
    out = tmp_path / "out"
    metrics = evaluate({"segmentation": pred}, gt, images, num_pred=3, out_metrics=out / "m.json",
                       out_report=out / "r.md", out_figure=out / "f.png", notes=[], paper="voc")
    seg = metrics["segmentation"]
    assert seg["miou"] == pytest.approx(100.0) and seg["pixel_accuracy"] == pytest.approx(100.0)
    assert seg["per_class"]["person"] == 100.0 and seg["per_class"]["aeroplane"] is None
    report = (out / "r.md").read_text()
    # this run beside the paper: the 45.8 row names the stage it came from
    assert "| clustering mIoU: segmentation model | 100.0 | 45.8 | +54.2 | segmentation |" in report
    assert "| linear probe mIoU | - | 58.7 | - | - |" in report
    # per-class table in VOC order with the paper's rows as columns
    assert "| class | segmentation | paper clustering | paper clustering+CRF | paper linear |" in report
    assert "| aeroplane | - | 74.7 | 80.3 | 80.5 |" in report
    table = report.split("## IoU per class")[1].split("##")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()
            if line.startswith("| ") and "class" not in line]
    assert rows == list(VOC_CLASSES)
    assert len(PAPER_VOC_PER_CLASS["clustering"]) == 21
    # the published per-class rows average to the headline numbers (up to the rows' rounding)
    for row, headline in (("clustering", 45.8), ("clustering+crf", 48.9), ("linear", 58.7),
                          ("linear+crf", 62.8)):
        assert np.mean(PAPER_VOC_PER_CLASS[row]) == pytest.approx(headline, abs=0.1)


def test_demo_report_says_no_paper_reference(tmp_path):
    images, gt_dir, gts = _voc_like_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        write_label_png(pred / f"{key}.png", np.zeros_like(gt))
    out = tmp_path / "out"
    write_json(tmp_path / "ap.json", {"multi": {"AP": 12.5, "AP50": 30.0, "AP75": 5.0, "num_matched": 2},
                                      "single": {"AP": 20.0, "AP50": 40.0, "AP75": 10.0}})
    write_json(tmp_path / "lp.json", {"miou": 55.5, "miou_crf": 57.0, "epochs": 3,
                                      "per_class": {"background": 90.0, "person": 21.0}})
    metrics = evaluate({"segmentation": pred}, folder_ground_truth(gt_dir), images, 3, out / "m.json",
                       out / "r.md", out / "f.png", notes=[], paper="demo",
                       extras={"mask_ap": tmp_path / "ap.json", "linear_probe": tmp_path / "lp.json"})
    report = (out / "r.md").read_text()
    assert "No paper reference for this dataset" in report and "45.8" not in report
    assert metrics["mask_ap"]["multi"]["AP50"] == 30.0 and metrics["meta"]["paper"] is None
    assert "| multi object | 12.5 | 30.0 | 5.0 | 2 |" in report
    assert "mIoU 55.5, with CRF 57.0" in report
    assert "| person | 0.0 | 21.0 |" in report  # the probe's per-class column


def test_cli_evaluate_gt_semantic(tmp_path):
    from maskdistill.cli import main

    images, gt_dir, gts = _voc_like_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        p = np.where(gt == 15, 2, np.where(gt == 8, 1, 0)).astype(np.uint8)  # swapped ids
        p[0, :] = 1  # under the ignore label
        write_label_png(pred / f"{key}.png", p)
    cfg = json.dumps({"device": "cpu", "dataset": {"source": "images", "train": {"images": str(images)},
                                                   "val": {"images": str(images)}}})
    out = tmp_path / "out"
    rc = main(["evaluate", "--config", cfg, "--gt-semantic", str(gt_dir), "--pred", f"s={pred}",
               "--num-pred", "3", "--out-metrics", str(out / "m.json"), "--out-report",
               str(out / "r.md"), "--out-figure", str(out / "f.png")])
    assert rc == 0
    m = json.loads((out / "m.json").read_text())
    assert m["s"]["miou"] == pytest.approx(100.0)
    assert m["meta"]["class_names"] == list(VOC_CLASSES) and m["meta"]["ground_truth"] == str(gt_dir)
    # a GT label outside the class list is an error naming the file
    write_label_png(gt_dir / "b.png", np.full((6, 8), 30, np.uint8))
    assert main(["evaluate", "--config", cfg, "--gt-semantic", str(gt_dir), "--pred", f"s={pred}",
                 "--num-pred", "3", "--out-metrics", str(out / "m2.json"), "--out-report",
                 str(out / "r2.md"), "--out-figure", str(out / "f2.png")]) == 1


def test_gt_folder_scores_the_split_and_needs_a_map_per_image(tmp_path):
    images, gt_dir, _ = _voc_like_split(tmp_path)
    # other maps in the folder (VOC's SegmentationClass also holds train) are ignored
    assert folder_ground_truth(gt_dir, VOC_CLASSES, {"a": images / "a.jpg"}).keys == ("a",)
    with pytest.raises(FileNotFoundError, match="no label map, e.g. 'zzz.png'"):
        folder_ground_truth(gt_dir, VOC_CLASSES, {"a": images / "a.jpg", "zzz": images / "zzz.jpg"})


# ---------------------------------------------------------------- mask AP


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


# ---------------------------------------------------------------- CRF


def test_crf_moves_a_noisy_label_map_to_the_image_edge():
    from maskdistill.crf import refine_labels

    h, w, edge = 40, 40, 20
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :edge] = (30, 30, 30)
    image[:, edge:] = (220, 200, 190)
    truth = np.zeros((h, w), np.uint8)
    truth[:, edge:] = 1
    rng = np.random.default_rng(0)
    noisy = np.zeros((h, w), np.uint8)
    noisy[:, edge - 4:] = 1  # boundary 4 px off the edge
    flip = rng.random((h, w)) < 0.15
    noisy[flip] = 1 - noisy[flip]
    noisy[0, 0] = 255  # an unlabelled pixel gets a label
    before = (noisy == truth).mean()
    refined = refine_labels(image, noisy)
    after = (refined == truth).mean()
    assert refined.dtype == np.uint8 and refined.shape == (h, w) and 255 not in refined
    assert before < 0.85 and after > 0.97, (before, after)
    # probabilities in, labels out; a label map with one label stays as it is
    probs = np.stack([1.0 - truth, truth]).astype(np.float32) * 0.6 + 0.2
    assert (refine_labels(image, probs) == truth).mean() > 0.97
    assert (refine_labels(image, np.full((h, w), 3, np.uint8)) == 3).all()


def test_crf_refine_folder_and_bad_input(tmp_path):
    from maskdistill.crf import probabilities_from_labels, refine_folder, refine_labels
    from maskdistill.images import ImageRecord
    from maskdistill.storage import read_label_png

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    write_label_png(tmp_path / "lab" / "a.png", np.eye(8, dtype=np.uint8))
    refine_folder([ImageRecord("a", tmp_path / "a.png")], tmp_path / "lab", tmp_path / "out")
    assert read_label_png(tmp_path / "out" / "a.png").shape == (8, 8)
    with pytest.raises(ValueError, match="do not match"):
        refine_labels(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="label 2 outside"):
        probabilities_from_labels(np.array([[2]]), 2)


# ---------------------------------------------------------------- linear probe


def _tiny_segmentation_model(path: Path, images: list[Path] | None = None) -> None:
    """A random DeepLab-v3 saved like train_segmentation does; BatchNorm statistics calibrated on
    ``images`` (as training would), so that its features are not vanishingly small."""
    from maskdistill.images import read_rgb, to_tensor
    from maskdistill.segmentation import build_deeplabv3
    from maskdistill.training import save_checkpoint

    torch.manual_seed(0)
    cfg = {"arch": "resnet18", "output_stride": 8, "atrous_rates": [2, 4, 6], "frozen_stages": 0,
           "pretrained_backbone": None}
    model = build_deeplabv3("resnet18", 4, 8, (2, 4, 6), None, 0)
    if images:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            model(torch.stack([to_tensor(read_rgb(p)) for p in images]))
    save_checkpoint(path, {"state_dict": model.state_dict(), "cfg": cfg, "num_classes": 4})


def _probe_data(tmp_path: Path, n: int = 6) -> tuple[list, Path]:
    from maskdistill.images import ImageRecord

    records, labels = [], tmp_path / "labels"
    for i in range(n):  # a reddish object (class 1) or a bluish one (class 2) on grey background
        img = np.full((32, 32, 3), 128, np.uint8)
        lab = np.zeros((32, 32), np.uint8)
        img[4:28, 4:28] = (220, 20, 20) if i % 2 == 0 else (20, 20, 220)
        lab[4:28, 4:28] = 1 if i % 2 == 0 else 2
        lab[:2] = 255
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        write_label_png(labels / f"{i}.png", lab)
        records.append(ImageRecord(str(i), tmp_path / f"{i}.png"))
    return records, labels


def test_linear_probe_learns_with_the_model_frozen(tmp_path):
    from maskdistill.linear_probe import build_probe, evaluate_probe, load_probe, train_linear_probe
    from maskdistill.training import load_checkpoint

    torch.set_num_threads(1)
    seg = tmp_path / "seg.pt"
    records, labels = _probe_data(tmp_path)
    _tiny_segmentation_model(seg, [r.path for r in records])
    names = ["background", "red", "blue"]
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    untrained = evaluate_probe(build_probe(seg, 3, cpu), records, labels, names, cpu)
    cfg = {"num_classes": 3, "epochs": 12, "batch_size": 3, "lr": 0.1, "lr_drop_epochs": [10],
           "crop_size": 32, "scale_range": [1.0, 1.0], "num_workers": 0, "log_every": 100}
    train_linear_probe(seg, records, labels, tmp_path / "ckpt", tmp_path / "probe.pt", cfg, cpu)
    probe = load_probe(tmp_path / "probe.pt", seg, cpu)
    trained = evaluate_probe(probe, records, labels, names, cpu)
    assert trained["miou"] > untrained["miou"] + 20, (untrained["miou"], trained["miou"])
    assert trained["per_class"]["red"] > 50 and trained["per_class"]["blue"] > 50
    # everything but the new classifier is exactly the saved segmentation model (BN stats too)
    saved = load_checkpoint(seg)["state_dict"]
    now = probe.model.state_dict()
    last = "classifier.4."
    for k, v in saved.items():
        if not k.startswith(last):
            assert torch.equal(now[k], v), k
    assert now[last + "weight"].shape == (3, 256, 1, 1)
    # resuming: a finished run's checkpoint carries the epoch count
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 12


def test_linear_probe_missing_labels_is_a_clear_error(tmp_path):
    from maskdistill.linear_probe import train_linear_probe

    seg = tmp_path / "seg.pt"
    _tiny_segmentation_model(seg)
    records, labels = _probe_data(tmp_path, n=2)
    (labels / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1\.png"):
        train_linear_probe(seg, records, labels, tmp_path / "ck", tmp_path / "p.pt",
                           {"num_classes": 3, "epochs": 1}, torch.device("cpu"))
