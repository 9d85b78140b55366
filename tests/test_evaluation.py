"""Stage 5: evaluating prediction folders end to end (metrics.json, report, figure), and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_ground_truth import box_mask, voc_like_split

from maskdistill.evaluation import evaluate, evaluate_stage, mask_mapping, mask_votes
from maskdistill.paper import VOC_CLASSES_WITH_BACKGROUND
from maskdistill.storage import encode_rle, write_json, write_label_png


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
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md", "report.png", "report.rst",
                                                     "report_per_class.csv", "report_stages.csv"]
    front = (out / "report.rst").read_text()  # the HTML report's front page
    assert "   * - initial_masks\n     - 100.0\n     - 100.0" in front
    assert "- the ViT was randomly initialised" in front and "{" not in front

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


def test_cli_evaluate_gt_semantic(tmp_path):
    from maskdistill.cli import main

    images, gt_dir, gts = voc_like_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        p = np.where(gt == 15, 2, np.where(gt == 8, 1, 0)).astype(np.uint8)  # swapped ids
        p[0, :] = 1  # under the ignore label
        write_label_png(pred / f"{key}.png", p)
    cfg = json.dumps({"device": "cpu", "dataset": {"source": "images", "train": {"images": str(images)},
                                                   "val": {"images": str(images)}},
                      "clustering": {"num_clusters": 2}})  # 3 predicted labels with background
    out = tmp_path / "out"
    rc = main(["evaluate", "--config", cfg, "--gt-semantic", str(gt_dir), "--pred", f"s={pred}",
               "--out-metrics", str(out / "m.json"), "--out-report",
               str(out / "r.md"), "--out-figure", str(out / "f.png")])
    assert rc == 0
    m = json.loads((out / "m.json").read_text())
    assert m["s"]["miou"] == pytest.approx(100.0)
    assert (m["meta"]["class_names"] == list(VOC_CLASSES_WITH_BACKGROUND)
            and m["meta"]["ground_truth"] == str(gt_dir))
    # a GT label outside the class list is an error naming the file
    write_label_png(gt_dir / "b.png", np.full((6, 8), 30, np.uint8))
    assert main(["evaluate", "--config", cfg, "--gt-semantic", str(gt_dir), "--pred", f"s={pred}",
                 "--out-metrics", str(out / "m2.json"), "--out-report",
                 str(out / "r2.md"), "--out-figure", str(out / "f2.png")]) == 1


# ---------------------------------------------------------------- the mined-mask mapping (authors')

# image a: A (class 1) at x 0-10 and B (class 2) at x 8-20; image b: one class-2 object
TOY_OBJECTS = {"a": [([0, 0, 10, 10], 1), ([8, 0, 20, 10], 2)], "b": [([0, 0, 6, 6], 2)]}
TOY_MASKS = [("a", [9, 0, 20, 10], 1),  # box IoU 0.05 with A, 0.92 with B: votes class 2
             ("b", [0, 0, 5, 5], 1),  # IoU 0.69 with b's object: class 2
             ("a", [8, 0, 18, 10], 2),  # IoU 0.11 with A, 0.83 with B: class 2
             ("b", [50, 50, 60, 60], 2)]  # overlaps nothing: no vote


def test_mined_masks_vote_for_the_class_of_the_box_they_overlap_most():
    from maskdistill.metrics import mapping_from_votes

    votes = mask_votes(TOY_MASKS, TOY_OBJECTS, num_clusters=2, num_classes=2)
    assert votes.tolist() == [[0, 2], [0, 1]]
    assert mapping_from_votes(votes).tolist() == [0, 2, 1]  # K = C: Hungarian, one-to-one
    over = mask_votes(TOY_MASKS, TOY_OBJECTS, num_clusters=3, num_classes=2)
    assert mapping_from_votes(over).tolist() == [0, 2, 2, 0]  # K > C: majority; no votes: background
    with pytest.raises(ValueError, match="cluster 3"):
        mask_votes([("a", [0, 0, 1, 1], 3)], TOY_OBJECTS, num_clusters=2, num_classes=2)


def _write_clusters(tmp_path: Path) -> Path:
    """Mined masks of make_split's images (other image ids than the GT's: matched by file name):
    a's mask on its person, b's and c's on their cat; cluster 2 = person, cluster 1 = cat."""
    images = [{"id": i, "file_name": f"{k}.png", "height": h, "width": w, "key": k}
              for i, (k, h, w) in enumerate([("a", 6, 8), ("b", 6, 8), ("sub/c", 5, 7)])]
    boxes = [(0, [1, 1, 4, 3], 2), (1, [0, 0, 2, 2], 1), (2, [2, 2, 4, 3], 1)]  # x, y, w, h
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b} for i, (im, b, c) in enumerate(boxes)]
    write_json(tmp_path / "clusters.json", {"images": images, "annotations": anns, "categories": []})
    return tmp_path / "clusters.json"


def test_the_mined_mask_mapping_scores_every_stage_beside_the_pixel_one(tmp_path):
    coco_path, root, gts = make_split(tmp_path)
    clusters = _write_clusters(tmp_path)
    assert mask_mapping(clusters, coco_path, 2)["mapping"] == [0, 2, 1]  # 1 -> cat, 2 -> person
    pred = tmp_path / "pred"  # GT label ids as cluster ids: pixel matching is the identity
    for key, gt in gts.items():
        write_label_png(pred / f"{key}.png", np.where(gt == 255, 0, gt))
    out = tmp_path / "out"
    args = ({"s": pred}, coco_path, root, 3, out / "m.json", out / "r.md", out / "f.png", [])
    metrics = evaluate(*args, max_figure_rows=1, mined=(clusters, coco_path))
    # under the mined-mask mapping person and cat swap: both IoU 0, background 88 / 88
    expected = {"pixels": {"miou": 100.0, "pixel_accuracy": 100.0},
                "masks": {"miou": pytest.approx(100 / 3), "pixel_accuracy": pytest.approx(100 * 88 / 124)}}
    assert metrics["s"]["by_mapping"] == expected
    assert metrics["s"]["miou"] == 100.0 and metrics["meta"]["mapping"] == "pixels"
    assert metrics["meta"]["mask_mapping"]["votes"] == [[0, 2], [1, 0]]
    assert "| s | 100.0 | 100.0 | 100.0 | 33.3 |" in (out / "r.md").read_text()
    primary = evaluate(*args, max_figure_rows=1, mapping="masks", mined=(clusters, coco_path))
    assert primary["s"]["miou"] == pytest.approx(100 / 3) and primary["s"]["mapping"] == [0, 2, 1]
    assert primary["s"]["per_class"] == {"background": 100.0, "person": 0.0, "cat": 0.0}
    # the patch K-means baseline has clusters of its own: the mined masks' mapping does not apply
    own = evaluate({"s": pred, "patch_kmeans": pred}, *args[1:], max_figure_rows=1, mapping="masks",
                   mined=(clusters, coco_path))
    assert own["patch_kmeans"]["miou"] == 100.0 and "by_mapping" not in own["patch_kmeans"]
    assert own["s"]["miou"] == pytest.approx(100 / 3)
    assert "| patch_kmeans | 100.0 | 100.0 | - | - |" in (out / "r.md").read_text()
    with pytest.raises(ValueError, match="evaluation.mapping: masks"):
        evaluate(*args, mapping="masks")
    with pytest.raises(ValueError, match=r"clusters\.json: mined mask of 'a' has cluster 2; clusters are 1"):
        mask_mapping(clusters, coco_path, 1)  # a clusters file of another k


def test_cli_evaluate_with_the_clusters_file_uses_the_configured_mapping(tmp_path):
    from maskdistill.cli import main

    coco_path, root, gts = make_split(tmp_path)
    clusters = _write_clusters(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        write_label_png(pred / f"{key}.png", np.where(gt == 255, 0, gt))
    cfg = json.dumps({"device": "cpu", "clustering": {"num_clusters": 2},
                      "dataset": {"source": "images", "train": {"images": str(root)},
                                  "val": {"images": str(root), "annotations": str(coco_path)}},
                      "evaluation": {"mapping": "masks", "figure_rows": 1}})
    out = tmp_path / "out"
    assert main(["evaluate", "--config", cfg, "--pred", f"s={pred}", "--clusters", str(clusters),
                 "--out-metrics", str(out / "m.json"), "--out-report", str(out / "r.md"),
                 "--out-figure", str(out / "f.png")]) == 0
    m = json.loads((out / "m.json").read_text())
    assert m["meta"]["mapping"] == "masks" and m["s"]["miou"] == pytest.approx(100 / 3)
    assert m["s"]["by_mapping"]["pixels"]["miou"] == pytest.approx(100.0)


def test_cli_evaluate_scores_with_the_configured_majority_and_absent_class_rules(tmp_path):
    """Four labels over three classes (K > C). Cluster 2 holds all 16 cat pixels and 20 of the 88
    background pixels: most pixels say background, largest IoU says cat (16 / 36 against
    20 / 104). Background pixels -> cluster 1, person -> cluster 3."""
    from maskdistill.cli import main

    coco_path, root, gts = make_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        p = np.choose(np.where(gt == 255, 0, gt), [1, 3, 2]).astype(np.uint8)
        if key == "a":
            p[5], p[4, :4] = 2, 2  # 12 background pixels
        if key == "b":
            p[5] = 2  # 8 more
        write_label_png(pred / f"{key}.png", p)
    base = {"device": "cpu", "clustering": {"num_clusters": 3},
            "dataset": {"source": "images", "train": {"images": str(root)},
                        "val": {"images": str(root), "annotations": str(coco_path)}}}
    metrics = {}
    for majority, absent in (("pixels", "skip"), ("iou", "zero")):
        rules = {"figure_rows": 1, "majority": majority, "absent_classes": absent}
        cfg = json.dumps(base | {"evaluation": rules})
        out = tmp_path / majority
        assert main(["evaluate", "--config", cfg, "--pred", f"s={pred}", "--out-metrics", str(out / "m.json"),
                     "--out-report", str(out / "r.md"), "--out-figure", str(out / "f.png")]) == 0
        metrics[majority] = json.loads((out / "m.json").read_text())
    pixels, iou = metrics["pixels"], metrics["iou"]
    assert pixels["s"]["mapping"] == [0, 0, 0, 1] and iou["s"]["mapping"] == [0, 0, 2, 1]
    # pixels: background 88 / 104, person 100, cat 0; iou: background 68 / 88, person 100, cat 16 / 36
    assert pixels["s"]["miou"] == pytest.approx((100 * 88 / 104 + 100 + 0) / 3)
    assert iou["s"]["miou"] == pytest.approx((100 * 68 / 88 + 100 + 100 * 16 / 36) / 3)
    assert (iou["meta"]["majority"], iou["meta"]["absent_classes"]) == ("iou", "zero")
