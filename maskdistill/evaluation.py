"""Stage 5: clustering evaluation (Hungarian-matched mIoU) of each stage, with a report and a figure.

Predicted label maps (``<pred_dir>/<key>.png``) hold cluster ids (0 = background, 1..K =
clusters); they are matched to the ground-truth classes (0 = background, 1..C) one-to-one by the
Hungarian algorithm, or by majority vote when there are more clusters than classes
(:mod:`maskdistill.metrics`). Ground truth: :mod:`maskdistill.ground_truth`; the report and the
figure: :mod:`maskdistill.report`.

Two mappings of clusters to classes (``evaluation.mapping`` picks the primary one; both are reported
when the mined masks and COCO instances of the split are at hand):

- ``pixels``: per stage, matched on that stage's pixels of the evaluated split (above).
- ``masks``: the authors' mapping, one for every stage: each mined mask of the evaluated split
  (``results/clusters/<split>.json``) votes for the class of the ground-truth object whose box has
  the largest IoU with the mask's box (:func:`mask_votes`); clusters go to classes by Hungarian on
  the votes (K <= C) or majority (K > C) (:func:`maskdistill.metrics.mapping_from_votes`). It is
  computed from labels, so it only scores; no stage trains on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.ground_truth import (
    GroundTruth,
    annotations_by_image,
    as_ground_truth,
    category_labels,
    check_image_entries,
)
from maskdistill.mask_ap import annotation_box
from maskdistill.metrics import (
    MODES,
    confusion_matrix,
    mapping_from_votes,
    match_clusters,
    miou_after_matching,
)
from maskdistill.paper import PAPER_REFERENCE
from maskdistill.report import write_examples_figure, write_report
from maskdistill.storage import (
    IGNORE_LABEL,
    box_iou,
    iter_json_items,
    key_of_file,
    read_json,
    read_label_png,
    write_json,
)
from maskdistill.training import progress

log = logging.getLogger("maskdistill")

MAPPINGS = ("pixels", "masks")  # evaluation.mapping
# Stages whose labels are not the K-means clusters of the mined masks: the mined-mask mapping does
# not apply to them, they are matched on pixels under either mapping.
OWN_LABEL_STAGES = frozenset({"patch_kmeans"})


# ---------------------------------------------------------------- the mapping from mined masks


def box_class(box: Sequence[float], objects: Sequence[tuple[Sequence[float], int]]) -> int | None:
    """Class of the ground-truth object (box x0, y0, x1, y1; class) whose box has the largest IoU
    with ``box`` (ties: the first); None when no object overlaps it."""
    best, best_iou = None, 0.0
    for obj_box, label in objects:
        iou = box_iou(box, obj_box)
        if iou > best_iou:
            best, best_iou = label, iou
    return best


def mask_votes(masks: Sequence[tuple[str, Sequence[float], int]],
               objects: Mapping[str, Sequence[tuple[Sequence[float], int]]],
               num_clusters: int, num_classes: int) -> np.ndarray:
    """(K, C) votes: each mined mask (image key, box x0, y0, x1, y1, cluster 1..K) counts once for
    its cluster and the class 1..C of :func:`box_class` among the image's GT ``objects``; a mask
    that overlaps no object does not vote."""
    votes = np.zeros((num_clusters, num_classes), dtype=np.int64)
    for key, box, cluster in masks:
        if not 1 <= cluster <= num_clusters:
            raise ValueError(f"mined mask of '{key}' has cluster {cluster}; clusters are 1..{num_clusters}")
        label = box_class(box, objects.get(key, ()))
        if label is not None:
            votes[cluster - 1, label - 1] += 1
    return votes


def gt_object_boxes(gt_instances: Path) -> tuple[dict[str, list[tuple[np.ndarray, int]]], int]:
    """Image key -> (box, class 1..C) of its non-crowd GT objects, and C, from a COCO instances file."""
    coco = read_json(gt_instances)
    to_label, names = category_labels(coco)
    index = annotations_by_image(coco)
    objects = {}
    for im in check_image_entries(coco, gt_instances):
        h, w = int(im["height"]), int(im["width"])
        anns = [a for a in index.get(int(im["id"]), []) if not a.get("iscrowd", 0)]
        objects[key_of_file(im["file_name"])] = [(annotation_box(a, h, w), to_label[int(a["category_id"])])
                                                 for a in anns]
    return objects, len(names) - 1


def mined_masks(clusters_json: Path) -> list[tuple[str, list[float], int]]:
    """(image key, box x0, y0, x1, y1, cluster) of each mask of a clusters file (streamed)."""
    keys = {int(im["id"]): key_of_file(im["file_name"])
            for im in iter_json_items(clusters_json, "images.item")}
    out = []
    for ann in iter_json_items(clusters_json, "annotations.item"):
        x, y, w, h = (float(v) for v in ann["bbox"])
        if int(ann["image_id"]) not in keys:
            raise ValueError(f"{clusters_json}: mask {ann.get('id')} names image {ann['image_id']}, "
                             "which is not listed")
        out.append((keys[int(ann["image_id"])], [x, y, x + w, y + h], int(ann["category_id"])))
    return out


def mask_mapping(clusters_json: Path, gt_instances: Path, num_clusters: int) -> dict[str, Any]:
    """The authors' mapping of clusters 1..K to classes from the mined masks of a split and its GT
    instances: ``{"mapping" (label 0..K -> class 0..C), "votes" (K, C), "num_masks", "num_voting",
    "clusters", "ground_truth"}``."""
    objects, num_classes = gt_object_boxes(gt_instances)
    masks = mined_masks(clusters_json)
    try:
        votes = mask_votes(masks, objects, num_clusters, num_classes)
    except ValueError as err:
        raise ValueError(f"{clusters_json}: {err}") from err
    return {"mapping": mapping_from_votes(votes).tolist(), "votes": votes.tolist(), "num_masks": len(masks),
            "num_voting": int(votes.sum()), "clusters": str(clusters_json), "ground_truth": str(gt_instances)}


def read_prediction(pred_dir: Path, key: str, stage: str, shape: tuple[int, int]) -> np.ndarray:
    """``pred_dir/<key>.png`` of ``stage``, checked to exist and to have the ground truth's ``shape``."""
    path = Path(pred_dir) / f"{key}.png"
    if not path.is_file():
        raise FileNotFoundError(f"stage '{stage}': prediction file missing: {path}")
    pred = read_label_png(path)
    if pred.shape != shape:
        raise ValueError(f"stage '{stage}': {path} is {pred.shape[0]}x{pred.shape[1]} but the "
                         f"ground truth of '{key}' is {shape[0]}x{shape[1]}")
    return pred


def stage_confusions(stages: Mapping[str, Path], gt: GroundTruth, num_pred: int) -> dict[str, np.ndarray]:
    """(num_pred, num classes) confusion matrix of each stage over every image of ``gt``, in one
    pass over the ground-truth label maps."""
    num_gt = len(gt.class_names)
    confs = {s: np.zeros((num_pred, num_gt), dtype=np.int64) for s in stages}
    for key in progress(gt.keys, total=len(gt.keys), desc="evaluating"):
        labels = gt.load(key)
        for stage, pred_dir in stages.items():
            pred = read_prediction(pred_dir, key, stage, labels.shape)
            try:
                confs[stage] += confusion_matrix(pred, labels, num_pred, num_gt)
            except ValueError as err:
                raise ValueError(f"stage '{stage}', {Path(pred_dir) / (key + '.png')} vs ground "
                                 f"truth '{key}' of {gt.source}: {err}") from err
    return confs


def evaluate_stage(
    pred_dir: Path, gt_coco_path: Path | GroundTruth, gt_images_root: Path, num_pred: int,
    mode: str = "iou", majority: str = "pixels", absent: str = "skip",
) -> tuple[dict[str, Any], np.ndarray]:
    """Hungarian-matched mIoU of one folder of predicted label PNGs over the whole GT split.

    ``gt_coco_path`` is a COCO instances file or a :class:`GroundTruth` (e.g. a label folder);
    ``majority`` and ``absent``: :func:`match_clusters`, :func:`miou_after_matching`.
    Returns :func:`miou_after_matching`'s result and the matching (GT class of each label).
    """
    gt = as_ground_truth(gt_coco_path, gt_images_root)
    conf = stage_confusions({"stage": Path(pred_dir)}, gt, num_pred)["stage"]
    mapping = match_clusters(conf, mode, majority)
    return miou_after_matching(conf, mapping, list(gt.class_names), absent), mapping


def evaluate(
    stages: Mapping[str, Path],
    gt_coco_path: Path | GroundTruth,
    gt_images_root: Path,
    num_pred: int,
    out_metrics: Path,
    out_report: Path,
    out_figure: Path,
    notes: Sequence[str],
    mode: str = "iou",
    max_figure_rows: int = 6,
    extras: Mapping[str, Path] | None = None,
    paper: str | None = None,
    mapping: str = "pixels",
    mined: tuple[Path, Path] | None = None,
    majority: str = "pixels",
    absent: str = "skip",
) -> dict[str, Any]:
    """Evaluate every stage; write metrics.json, a Markdown report (with its tables as CSV beside
    it, see :func:`maskdistill.report.table_paths`) and a figure; return the metrics.

    ``gt_coco_path`` is a COCO instances file or a :class:`GroundTruth` (e.g. a label folder).
    ``extras`` names JSON results of other protocols (``mask_ap``, ``linear_probe``) copied into
    the metrics and the report; ``paper`` (``voc``, ``coco20k``) adds the published numbers beside
    this run's (any other value: the report says there is no paper reference). ``mined`` (the
    split's clusters file and COCO instances) adds the ``masks`` mapping (:func:`mask_mapping`): each
    stage then has ``by_mapping`` {pixels, masks: mIoU and pixel accuracy}, and ``mapping`` picks
    which of the two is the stage's primary result (its per-class IoU, the figure's colours).
    ``majority`` (a cluster's class when K > C under ``pixels``) and ``absent`` (classes in neither
    GT nor prediction): :func:`match_clusters`, :func:`miou_after_matching`.
    """
    if not stages:
        raise ValueError("no stages to evaluate")
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {MODES}")
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r} (evaluation.mapping); use one of {MAPPINGS}")
    if mapping == "masks" and mined is None:
        raise ValueError("evaluation.mapping: masks needs the mined masks of the evaluated split and its "
                         "COCO instances")
    gt = as_ground_truth(gt_coco_path, gt_images_root)
    stage_dirs = {name: Path(d) for name, d in stages.items()}
    confs = stage_confusions(stage_dirs, gt, num_pred)
    names = list(gt.class_names)
    metrics: dict[str, Any] = {}
    mappings: dict[str, np.ndarray] = {}
    from_masks = mask_mapping(mined[0], mined[1], num_pred - 1) if mined is not None else None
    if from_masks is not None and len(from_masks["votes"][0]) != len(names) - 1:
        raise ValueError(f"{mined[1]} has {len(from_masks['votes'][0])} classes, the ground truth "
                         f"{gt.source} {len(names) - 1}")
    for stage, conf in confs.items():
        by = {"pixels": miou_after_matching(conf, match_clusters(conf, mode, majority), names, absent)}
        primary = "pixels"
        if from_masks is not None and stage not in OWN_LABEL_STAGES:
            by["masks"] = miou_after_matching(conf, np.asarray(from_masks["mapping"]), names, absent)
            by[mapping]["by_mapping"] = {k: {"miou": v["miou"], "pixel_accuracy": v["pixel_accuracy"]}
                                         for k, v in by.items()}
            primary = mapping
        metrics[stage] = by[primary]
        mappings[stage] = np.asarray(by[primary]["mapping"])
        log.info("%s: mIoU %.2f, pixel accuracy %.2f", stage, metrics[stage]["miou"],
                 metrics[stage]["pixel_accuracy"])
    metrics["meta"] = {
        "num_images": len(gt.keys),
        "num_pred": num_pred,
        "num_gt": len(names),
        "class_names": names,
        "matching": "hungarian" if num_pred <= len(names) else "majority_vote",
        "mode": mode,
        "majority": majority,
        "absent_classes": absent,
        "mapping": mapping,
        **({"mask_mapping": from_masks} if from_masks is not None else {}),
        "ignore_label": IGNORE_LABEL,
        "ground_truth": gt.source,
        "predictions": {s: str(d) for s, d in stage_dirs.items()},
        "notes": list(notes),
        "paper": paper if paper in PAPER_REFERENCE else None,
    }
    for name, path in (extras or {}).items():
        if name in metrics:
            raise ValueError(f"extra result '{name}' clashes with a stage name")
        metrics[name] = read_json(path)

    def stage_prediction(stage: str, key: str, shape: tuple[int, int]) -> np.ndarray:
        return read_prediction(stage_dirs[stage], key, stage, shape)

    write_examples_figure(out_figure, gt.keys[: max(0, max_figure_rows)], gt, mappings, stage_prediction)
    write_json(out_metrics, metrics)
    write_report(out_report, out_figure, metrics, list(confs), notes)
    return metrics
