"""Stage 5: clustering evaluation (Hungarian-matched mIoU) of each stage, with a report and a figure.

Predicted label maps (``<pred_dir>/<key>.png``) hold cluster ids (0 = background, 1..K =
clusters); they are matched to the ground-truth classes (0 = background, 1..C) one-to-one by the
Hungarian algorithm, or by majority vote when there are more clusters than classes
(:mod:`maskdistill.metrics`). Ground truth: :mod:`maskdistill.ground_truth`; the report and the
figure: :mod:`maskdistill.report`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.ground_truth import GroundTruth, as_ground_truth
from maskdistill.metrics import MODES, confusion_matrix, match_clusters, miou_after_matching
from maskdistill.paper import PAPER_REFERENCE
from maskdistill.report import write_examples_figure, write_report
from maskdistill.storage import IGNORE_LABEL, read_json, read_label_png, write_json
from maskdistill.training import progress

log = logging.getLogger("maskdistill")


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
    mode: str = "iou",
) -> tuple[dict[str, Any], np.ndarray]:
    """Hungarian-matched mIoU of one folder of predicted label PNGs over the whole GT split.

    ``gt_coco_path`` is a COCO instances file or a :class:`GroundTruth` (e.g. a label folder).
    Returns :func:`miou_after_matching`'s result and the matching (GT class of each label).
    """
    gt = as_ground_truth(gt_coco_path, gt_images_root)
    conf = stage_confusions({"stage": Path(pred_dir)}, gt, num_pred)["stage"]
    mapping = match_clusters(conf, mode)
    return miou_after_matching(conf, mapping, list(gt.class_names)), mapping


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
) -> dict[str, Any]:
    """Evaluate every stage; write metrics.json, a Markdown report (with its tables as CSV beside
    it, see :func:`maskdistill.report.table_paths`) and a figure; return the metrics.

    ``gt_coco_path`` is a COCO instances file or a :class:`GroundTruth` (e.g. a label folder).
    ``extras`` names JSON results of other protocols (``mask_ap``, ``linear_probe``) copied into
    the metrics and the report; ``paper`` (``voc``, ``coco20k``) adds the published numbers beside
    this run's (any other value: the report says there is no paper reference).
    """
    if not stages:
        raise ValueError("no stages to evaluate")
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {MODES}")
    gt = as_ground_truth(gt_coco_path, gt_images_root)
    stage_dirs = {name: Path(d) for name, d in stages.items()}
    confs = stage_confusions(stage_dirs, gt, num_pred)
    names = list(gt.class_names)
    metrics: dict[str, Any] = {}
    mappings: dict[str, np.ndarray] = {}
    for stage, conf in confs.items():
        mappings[stage] = match_clusters(conf, mode)
        metrics[stage] = miou_after_matching(conf, mappings[stage], names)
        log.info("%s: mIoU %.2f, pixel accuracy %.2f", stage, metrics[stage]["miou"],
                 metrics[stage]["pixel_accuracy"])
    metrics["meta"] = {
        "num_images": len(gt.keys),
        "num_pred": num_pred,
        "num_gt": len(names),
        "class_names": names,
        "matching": "hungarian" if num_pred <= len(names) else "majority_vote",
        "mode": mode,
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
