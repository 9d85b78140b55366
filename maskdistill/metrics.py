"""Scores of label maps: confusion matrices, IoU, the Hungarian matching of clusters to classes, mIoU.

Predicted label maps hold cluster ids (0 = background, 1..K = clusters); they are matched to the
ground-truth classes (0 = background, 1..C) one-to-one by the Hungarian algorithm, or by majority
vote when there are more clusters than classes. :func:`hungarian` is the one matching function of
the package (mask AP matches clusters to categories with it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from maskdistill.storage import IGNORE_LABEL

MODES = ("iou", "confusion")
MAJORITY_RULES = ("pixels", "iou")  # evaluation.majority: a cluster's class when K > C
ABSENT_RULES = ("skip", "zero")  # evaluation.absent_classes: a class in neither GT nor prediction


def _check_rule(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; use one of {allowed}")


# ---------------------------------------------------------------- confusion and matching


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_pred: int, num_gt: int, ignore: int = IGNORE_LABEL
) -> np.ndarray:
    """Counts (num_pred, num_gt): rows predicted labels, columns GT classes; GT ``ignore`` skipped."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    valid = gt != ignore
    p = pred[valid].astype(np.int64).ravel()
    g = gt[valid].astype(np.int64).ravel()
    if p.size and (p.min() < 0 or p.max() >= num_pred):
        bad = int(p.max()) if p.max() >= num_pred else int(p.min())
        raise ValueError(f"predicted label {bad} outside 0..{num_pred - 1}")
    if g.size and (g.min() < 0 or g.max() >= num_gt):
        bad = int(g.max()) if g.max() >= num_gt else int(g.min())
        raise ValueError(f"ground-truth label {bad} outside 0..{num_gt - 1} (ignore={ignore})")
    counts = np.bincount(p * num_gt + g, minlength=num_pred * num_gt)
    return counts.reshape(num_pred, num_gt).astype(np.int64)


def iou_matrix(conf: np.ndarray) -> np.ndarray:
    """IoU of every (predicted label, GT class) pair; 0 where both are empty."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(axis=1, keepdims=True) + conf.sum(axis=0, keepdims=True) - conf
    return np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)


def match_clusters(conf: np.ndarray, mode: str = "iou", majority: str = "pixels") -> np.ndarray:
    """GT class of each predicted label: Hungarian one-to-one if num_pred <= num_gt, else majority.

    The Hungarian assignment maximises the total IoU (``mode="iou"``) or the total matched pixel
    count (``mode="confusion"``). With more predicted labels than GT classes (overclustering) each
    predicted label goes to the GT class it shares most pixels with (``majority="pixels"``) or the
    GT class of largest IoU with it (``"iou"``, the authors' evaluation); ties: lowest class id.
    """
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {MODES}")
    _check_rule(majority, MAJORITY_RULES, "evaluation.majority")
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] == 0 or conf.shape[1] == 0:
        raise ValueError(f"confusion matrix must be 2-D and non-empty, got shape {conf.shape}")
    num_pred, num_gt = conf.shape
    if num_pred > num_gt:
        return (conf if majority == "pixels" else iou_matrix(conf)).argmax(axis=1).astype(np.int64)
    mapping = hungarian(iou_matrix(conf) if mode == "iou" else conf.astype(np.float64))
    assert (mapping >= 0).all()  # num_pred <= num_gt: every predicted label is assigned
    return mapping


def mapping_from_votes(votes: np.ndarray) -> np.ndarray:
    """GT class (0..C) of each predicted label 0..K from (K, C) votes of clusters 1..K for classes
    1..C (the authors' mapping from mined masks): background stays background; with K <= C the
    Hungarian assignment of maximal total votes (one-to-one), with K > C each cluster's most voted
    class (ties: lowest class id), and a cluster without any vote goes to background."""
    votes = np.asarray(votes, dtype=np.int64)
    if votes.ndim != 2 or votes.shape[0] == 0 or votes.shape[1] == 0:
        raise ValueError(f"votes must be a non-empty (clusters, classes) matrix, got shape {votes.shape}")
    k, c = votes.shape
    mapping = np.zeros(k + 1, dtype=np.int64)
    if k <= c:
        mapping[1:] = hungarian(votes) + 1
    else:
        mapping[1:] = np.where(votes.sum(axis=1) > 0, votes.argmax(axis=1) + 1, 0)
    return mapping


def hungarian(score: np.ndarray) -> np.ndarray:
    """The column matched to each row by the assignment of maximal total ``score`` (-1: none)."""
    rows, cols = linear_sum_assignment(np.asarray(score, dtype=np.float64), maximize=True)
    mapping = np.full(score.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def miou_after_matching(
    conf: np.ndarray, mapping: np.ndarray, class_names: Sequence[str], absent: str = "skip"
) -> dict[str, Any]:
    """mIoU (0-100) over the GT classes after mapping predicted labels. A class absent from both GT
    and the mapped prediction is left out (``absent="skip"``: its per-class entry is None) or
    counted as IoU 0 (``"zero"``, the authors' evaluation).

    Returns {"miou", "per_class": {name: IoU or None}, "pixel_accuracy", "mapping"}.
    """
    _check_rule(absent, ABSENT_RULES, "evaluation.absent_classes")
    conf = np.asarray(conf, dtype=np.int64)
    mapping = np.asarray(mapping, dtype=np.int64)
    num_pred, num_gt = conf.shape
    if len(class_names) != num_gt:
        raise ValueError(f"{len(class_names)} class names for {num_gt} GT classes")
    if mapping.shape != (num_pred,) or (mapping < 0).any() or (mapping >= num_gt).any():
        raise ValueError(f"mapping must give a class in 0..{num_gt - 1} for each of {num_pred} "
                         f"predicted labels, got {mapping.tolist()}")
    total = int(conf.sum())
    if total == 0:
        raise ValueError("confusion matrix is empty: no labelled ground-truth pixels")
    merged = np.zeros((num_gt, num_gt), dtype=np.int64)
    np.add.at(merged, mapping, conf)  # rows: mapped prediction, cols: GT
    tp = np.diag(merged).astype(np.float64)
    pred_count = merged.sum(axis=1)
    gt_count = merged.sum(axis=0)
    union = pred_count + gt_count - tp
    present = union > 0
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        per_class[str(name)] = float(100.0 * tp[c] / union[c]) if present[c] \
            else (0.0 if absent == "zero" else None)
    ious = [v for v in per_class.values() if v is not None]
    return {
        "miou": float(np.mean(ious)),
        "per_class": per_class,
        "pixel_accuracy": float(100.0 * tp.sum() / total),
        "mapping": [int(v) for v in mapping],
    }


