"""Class-aware mask AP / AP50 of instance predictions (COCO ``segm``) after Hungarian matching.

Predictions carry cluster ids (``category_id`` 1..K) and scores. Clusters are matched to the
ground-truth categories by the Hungarian algorithm on the split-level mask IoU between clusters and
classes: each image's predictions are pasted into a label map (most confident mask wins a pixel,
as the pseudo-labels are pasted), the ground-truth instances into a semantic map (crowd = ignore),
and IoU[k, c] = |cluster k ∩ class c| / |cluster k ∪ class c| summed over the split (background
pixels count in the unions but background is not matched). The assignment maximises the total IoU,
one-to-one when K <= C; with more clusters than classes each cluster takes its best class
(majority). Then pycocotools' COCOeval (``iouType="segm"``) scores the relabelled predictions.

Settings:

- ``multi``: every prediction against every ground-truth object.
- ``single``: per image only the most confident prediction, against the one ground-truth object
  (non-crowd) whose box has the largest IoU with the prediction's box (ties: the larger object);
  other ground-truth objects of that image are dropped.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.ground_truth import (
    annotations_by_image,
    category_labels,
    check_image_entries,
    paste_semantic,
)
from maskdistill.metrics import confusion_matrix, hungarian, iou_matrix
from maskdistill.storage import IGNORE_LABEL, box_iou, decode_segmentation, key_of_file, read_json

log = logging.getLogger("maskdistill")

SETTINGS = ("multi", "single")


# ---------------------------------------------------------------- reading


def load_predictions(predictions: Path, gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Prediction annotations with ``image_id`` in the GT's ids.

    Accepts a COCO results list, or a dict with ``annotations`` (and optionally ``images``, whose
    file names are then matched to the GT's by key, so differing ids do not matter).
    """
    data = read_json(predictions)
    if isinstance(data, list):
        anns, images = data, None
    elif isinstance(data, dict) and "annotations" in data:
        anns, images = data["annotations"], data.get("images")
    else:
        raise ValueError(f"{predictions}: neither a COCO results list nor a dict with 'annotations'")
    gt_ids = {int(im["id"]) for im in gt["images"]}
    remap: dict[int, int] | None = None
    if images:
        by_key = {key_of_file(im["file_name"]): int(im["id"]) for im in gt["images"]}
        remap = {int(im["id"]): by_key[key_of_file(im["file_name"])] for im in images
                 if key_of_file(im["file_name"]) in by_key}
    out = []
    for i, ann in enumerate(anns):
        for field in ("image_id", "category_id", "score", "segmentation"):
            if field not in ann:
                raise ValueError(f"{predictions}: prediction {i} lacks '{field}'")
        image_id = int(ann["image_id"])
        image_id = remap.get(image_id, -1) if remap is not None else image_id
        if image_id not in gt_ids:
            continue  # an image outside the ground truth (e.g. predictions for a larger split)
        if int(ann["category_id"]) < 1:
            raise ValueError(f"{predictions}: prediction {i} has cluster id {ann['category_id']}; "
                             "clusters are 1..K")
        out.append(dict(ann, image_id=image_id))
    return out


# ---------------------------------------------------------------- single-object selection


def _box(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """x0, y0, x1, y1 of an annotation (its bbox, else its mask's extent)."""
    if "bbox" in ann:
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        return np.array([x, y, x + bw, y + bh])
    m = decode_segmentation(ann["segmentation"], h, w)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return np.zeros(4)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def select_single(gt: dict[str, Any], preds: list[dict[str, Any]]) -> tuple[dict[str, Any], list]:
    """The single-object setting: top prediction per image, GT object of largest box IoU."""
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
    best: dict[int, dict[str, Any]] = {}
    for p in preds:
        cur = best.get(p["image_id"])
        if cur is None or float(p["score"]) > float(cur["score"]):
            best[p["image_id"]] = p
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt.get("annotations", []):
        if not ann.get("iscrowd", 0):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    kept = []
    for image_id, anns in by_image.items():
        h, w = sizes[image_id]
        if image_id in best:
            pbox = _box(best[image_id], h, w)
            scored = [(box_iou(pbox, _box(a, h, w)), float(a.get("area", 0)), a) for a in anns]
            kept.append(max(scored, key=lambda t: (t[0], t[1]))[2])
        else:  # no prediction: the largest object stays (a miss either way)
            kept.append(max(anns, key=lambda a: float(a.get("area", 0))))
    single_gt = dict(gt, annotations=kept)
    return single_gt, sorted(best.values(), key=lambda p: p["image_id"])


# ---------------------------------------------------------------- matching


def _pasted(preds: list[dict[str, Any]], h: int, w: int) -> np.ndarray:
    """Cluster label map of one image's predictions, most confident first (no overwrite)."""
    labels = np.zeros((h, w), dtype=np.int64)
    for p in sorted(preds, key=lambda p: -float(p["score"])):
        m = decode_segmentation(p["segmentation"], h, w) & (labels == 0)
        labels[m] = int(p["category_id"])
    return labels


def cluster_class_confusion(gt: dict[str, Any], preds: list[dict[str, Any]], num_clusters: int
                            ) -> np.ndarray:
    """Pixel counts (K+1, C+1) of pasted predictions vs the GT semantic maps over the split."""
    to_label, names = category_labels(gt)
    index = annotations_by_image(gt)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for p in preds:
        by_image.setdefault(p["image_id"], []).append(p)
    conf = np.zeros((num_clusters + 1, len(names)), dtype=np.int64)
    for im in gt["images"]:
        h, w = int(im["height"]), int(im["width"])
        sem = paste_semantic(index.get(int(im["id"]), []), to_label, h, w, str(im["file_name"]))
        pred = _pasted(by_image.get(int(im["id"]), []), h, w)
        conf += confusion_matrix(pred, sem, num_clusters + 1, len(names), IGNORE_LABEL)
    return conf


def match_to_categories(conf: np.ndarray) -> np.ndarray:
    """GT class index (1..C) of each cluster 1..K (index 0 unused, -1) from a (K+1, C+1) confusion."""
    score = iou_matrix(conf)[1:, 1:]
    k, c = score.shape
    mapping = np.full(k + 1, -1, dtype=np.int64)
    if k > c:
        mapping[1:] = score.argmax(axis=1) + 1
    else:
        matched = hungarian(score)
        mapping[1:] = np.where(matched >= 0, matched + 1, -1)
    return mapping


# ---------------------------------------------------------------- AP


def coco_segm_stats(gt: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """AP, AP50, AP75 (0-100; -1 when undefined) of COCO results with pycocotools ``segm``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = copy.deepcopy(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
    for i, ann in enumerate(gt.get("annotations", [])):
        ann["id"] = i + 1  # unique ids (pycocotools indexes annotations by id)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            h, w = sizes[int(ann["image_id"])]
            ann["area"] = float(decode_segmentation(ann["segmentation"], h, w).sum())
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: r[k] for k in ("image_id", "category_id", "score",
                                                       "segmentation")} for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats

    def pct(v: float) -> float:
        return float(100.0 * v) if v >= 0 else -1.0

    return {"AP": pct(stats[0]), "AP50": pct(stats[1]), "AP75": pct(stats[2])}


def mask_ap(gt_instances: Path, predictions: Path, setting: str = "multi") -> dict[str, Any]:
    """Class-aware mask AP / AP50 / AP75 (0-100) of cluster predictions after Hungarian matching.

    Returns ``{"AP", "AP50", "AP75", "setting", "mapping" {cluster id: GT category id},
    "num_images", "num_predictions", "num_gt_objects", "num_matched"}``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown mask AP setting {setting!r}; use one of {SETTINGS}")
    gt = read_json(gt_instances)
    if not gt.get("images") or not gt.get("categories"):
        raise ValueError(f"{gt_instances}: a COCO instances file needs 'images' and 'categories'")
    check_image_entries(gt, gt_instances)
    preds = load_predictions(Path(predictions), gt)
    if setting == "single":
        gt, preds = select_single(gt, preds)
    num_clusters = max((int(p["category_id"]) for p in preds), default=0)
    cats = sorted(int(c["id"]) for c in gt["categories"])
    mapping: dict[int, int] = {}
    if num_clusters:
        conf = cluster_class_confusion(gt, preds, num_clusters)
        label_of = match_to_categories(conf)
        mapping = {k: cats[int(label_of[k]) - 1] for k in range(1, num_clusters + 1)
                   if label_of[k] >= 1}
    results = [dict(p, category_id=mapping[int(p["category_id"])]) for p in preds
               if int(p["category_id"]) in mapping]
    stats = coco_segm_stats(gt, results)
    out = {**stats, "setting": setting, "mapping": {str(k): v for k, v in mapping.items()},
           "num_images": len(gt["images"]), "num_predictions": len(results),
           "num_gt_objects": sum(1 for a in gt.get("annotations", []) if not a.get("iscrowd", 0)),
           "num_matched": len(set(mapping.values()))}
    log.info("mask AP (%s): AP %.2f AP50 %.2f over %d images, %d predictions", setting, out["AP"],
             out["AP50"], out["num_images"], out["num_predictions"])
    return out


def mask_ap_report(gt_instances: Path, predictions: Path) -> dict[str, Any]:
    """Both settings: ``{"multi": {...}, "single": {...}, "ground_truth", "predictions"}``."""
    return {"multi": mask_ap(gt_instances, predictions, "multi"),
            "single": mask_ap(gt_instances, predictions, "single"),
            "ground_truth": str(gt_instances), "predictions": str(predictions)}
