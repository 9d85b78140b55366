"""Diagnostics of the mining backbone and its masks against ground truth: class-agnostic quality of
the mined masks (best-match IoU, CorLoc), CLS attention on objects, and how well the clustering
features of ground-truth objects separate their categories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score
from sklearn.model_selection import cross_val_score

from maskdistill.backbone import cls_features, last_block_qk, patch_size
from maskdistill.clustering import crop_box, whiten
from maskdistill.ground_truth import coco_ground_truth
from maskdistill.images import to_tensor
from maskdistill.metrics import confusion_matrix, match_clusters, miou_after_matching
from maskdistill.storage import (
    MaskIndex,
    box_iou,
    decode_segmentation,
    iter_mask_shard,
    key_of_file,
    mask_to_box,
    read_json,
)
from maskdistill.training import progress


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _gt_objects(coco: dict[str, Any]) -> dict[str, list[tuple[dict[str, Any], int, int]]]:
    """Key (file name without extension) -> its non-crowd annotations, each with the image's height
    and width (decoded one image at a time by :func:`_object_masks`)."""
    images = {im["id"]: im for im in coco["images"]}
    out: dict[str, list[tuple[dict[str, Any], int, int]]] = {
        key_of_file(im["file_name"]): [] for im in coco["images"]}
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        im = images[ann["image_id"]]
        out[key_of_file(im["file_name"])].append((ann, int(im["height"]), int(im["width"])))
    return out


def _object_masks(objects: list[tuple[dict[str, Any], int, int]]) -> list[tuple[np.ndarray, list[float]]]:
    """[(mask, box x0y0x1y1)] of one image's objects."""
    out = []
    for ann, h, w in objects:
        x, y, bw, bh = ann["bbox"]
        out.append((decode_segmentation(ann["segmentation"], h, w), [x, y, x + bw, y + bh]))
    return out


def mined_mask_quality(mask_shards: Sequence[Path], gt_instances: Path) -> dict[str, Any]:
    """Mean best-match IoU of each image's mined mask with a GT object, and CorLoc (share of
    images whose mined box has IoU >= 0.5 with some GT box). Images with objects but no mined mask
    (skipped) count as misses; images without objects are left out. Values in percent. One
    image's masks are in memory at a time."""
    with MaskIndex(mask_shards) as mined:
        return _mask_quality(_gt_objects(read_json(gt_instances)), mined, gt_instances)


def _mask_quality(gt: dict[str, list[tuple[dict[str, Any], int, int]]], mined: MaskIndex,
                  gt_instances: Path) -> dict[str, Any]:
    ious, hits, rows = [], [], []
    for key in progress(sorted(gt), total=len(gt), desc="mask quality"):
        if not gt[key]:
            continue
        objects = _object_masks(gt[key])
        m = mined.get(key) if key in mined else None
        if m is None:
            best_iou, best_box = 0.0, 0.0
        else:
            if objects[0][0].shape != m.mask.shape:
                raise ValueError(f"{key}: mined mask {m.mask.shape} and ground truth "
                                 f"{objects[0][0].shape} differ in size")
            best_iou = max(mask_iou(m.mask, obj) for obj, _ in objects)
            best_box = max(box_iou(m.box, box) for _, box in objects)
        ious.append(best_iou)
        hits.append(best_box >= 0.5)
        rows.append({"key": key, "mask_iou": round(100 * best_iou, 2), "box_iou": round(100 * best_box, 2)})
    if not ious:
        raise ValueError(f"{gt_instances}: no image with ground-truth objects")
    return {"mask_iou": 100.0 * float(np.mean(ious)), "corloc": 100.0 * float(np.mean(hits)),
            "images": len(ious), "missing": sum(1 for r in rows if r["key"] not in mined),
            "per_image": rows}


def mined_label_bounds(mask_shards: Sequence[Path], gt_instances: Path, num_clusters: int,
                       seeds: Sequence[int] = (0, 1, 2), mode: str = "iou") -> dict[str, Any]:
    """What labels can make of the mined masks, scored as the ``initial_masks`` stage is (each
    image's mined mask pasted with its label, mIoU over the GT classes). ``oracle_miou``: every
    mask labelled with the GT category covering most of it (a mask on no object: category 1), the
    ceiling set by mask quality alone. ``random_miou``: uniformly random labels among
    ``num_clusters`` clusters, Hungarian-matched like every stage (mean and std over ``seeds``),
    what clustering scores when it ignores the category. K-means labels near ``random_miou`` add
    nothing; the gap to ``oracle_miou`` is what better clustering could gain. Percent."""
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    gt = coco_ground_truth(Path(gt_instances), Path(gt_instances).parent)
    known, num_gt = set(gt.keys), len(gt.class_names)
    # per mask, GT pixel counts outside (row 0) and inside (row 1) it: all any labelling needs
    counts = []
    for shard in mask_shards:
        for m in iter_mask_shard(shard):
            if m.key not in known:
                raise ValueError(f"{shard}: mined image '{m.key}' is not in {gt_instances}")
            sem = gt.load(m.key)
            if sem.shape != m.mask.shape:
                raise ValueError(f"{m.key}: mined mask {m.mask.shape} and ground truth {sem.shape} "
                                 "differ in size")
            counts.append(confusion_matrix(m.mask.astype(np.int64), sem, 2, num_gt))
    if not counts:
        raise ValueError("no mined mask to label")

    def score(labels: Sequence[int], num_pred: int, matched: bool) -> float:
        conf = np.zeros((num_pred, num_gt), np.int64)
        for c, label in zip(counts, labels, strict=True):
            conf[0] += c[0]
            conf[label] += c[1]
        mapping = match_clusters(conf, mode) if matched else np.arange(num_gt)
        return float(miou_after_matching(conf, mapping, gt.class_names)["miou"])

    oracle = [int(c[1, 1:].argmax()) + 1 if c[1, 1:].any() else 1 for c in counts]
    randoms = [score(np.random.default_rng(s).integers(1, num_clusters + 1, len(counts)).tolist(),
                     num_clusters + 1, True) for s in seeds]
    return {"oracle_miou": score(oracle, num_gt, False), "random_miou": float(np.mean(randoms)),
            "random_miou_std": float(np.std(randoms)), "num_clusters": num_clusters,
            "masks": len(counts)}


def cls_attention_on_objects(model: torch.nn.Module, images: Sequence[np.ndarray],
                             foregrounds: Sequence[np.ndarray]) -> dict[str, Any]:
    """Share of the last block's CLS attention (per head, over patch tokens) that lands on object
    patches, beside the share of patches the objects cover. A ViT that attends to objects has a
    share well above the area; a random one sits at the area. ``foregrounds``: boolean (H, W)
    masks; a patch is an object patch when objects cover more than half of it. Values in percent."""
    ps = patch_size(model)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    shares, areas = [], []
    for rgb, fg in zip(images, foregrounds, strict=True):
        h, w = (rgb.shape[0] // ps) * ps, (rgb.shape[1] // ps) * ps
        q, k = last_block_qk(model, to_tensor(rgb[:h, :w])[None])
        logits = (q[0, :, :1] @ k[0, :, prefix:].transpose(-1, -2))[:, 0] * q.shape[-1] ** -0.5
        attn = logits.softmax(-1).numpy()  # heads x patches
        cells = fg[:h, :w].reshape(h // ps, ps, w // ps, ps).mean(axis=(1, 3)).ravel() > 0.5
        shares.append(attn[:, cells].sum(axis=1))
        areas.append(cells.mean())
    per_head = 100.0 * np.mean(shares, axis=0)
    return {"share_per_head": [round(float(s), 2) for s in per_head],
            "share": round(float(per_head.mean()), 2), "area": round(100.0 * float(np.mean(areas)), 2)}


def object_crop_features(model: torch.nn.Module, images: Sequence[np.ndarray],
                         instance_maps: Sequence[np.ndarray], crop_size: int,
                         batch_size: int = 64) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The clustering stage's feature (CLS of the box crop at ``crop_size``) of every ground-truth
    object, and which object each row is: (image index, instance id), in image then id order.
    ``instance_maps``: (H, W) ints, 0 = background, object n = n; absent ids are skipped."""
    crops, objects = [], []
    for i, (rgb, inst) in enumerate(zip(images, instance_maps, strict=True)):
        for n in range(1, int(inst.max()) + 1):
            box = mask_to_box(inst == n)
            if box[2] > box[0]:
                crops.append(to_tensor(crop_box(rgb, box, crop_size)))
                objects.append((i, n))
    if not crops:
        raise ValueError("no ground-truth object to describe")
    with torch.no_grad():
        feats = np.concatenate([cls_features(model, torch.stack(crops[i:i + batch_size])).float().numpy()
                                for i in range(0, len(crops), batch_size)])
    return feats, objects


def category_separability(features: np.ndarray, categories: Sequence[int],
                          seeds: Sequence[int] = (0, 1, 2), folds: int = 5) -> dict[str, Any]:
    """How much of the object category the features carry, as the clustering stage sees them
    (whitened, L2-normalised). ``kmeans_nmi``: NMI between K-means clusters (K = number of
    categories, one run per seed) and the categories (0 = clusters ignore the category, 100 = they
    are the categories). ``linear_accuracy``: cross-validated accuracy of a logistic regression
    on the standardised features trained on the categories, a supervised ceiling that shows whether
    the information is there at all. Percent."""
    y = np.asarray(categories)
    if len(y) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(y)} categories")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < folds:
        raise ValueError(f"need at least 2 categories with {folds} objects each, got counts "
                         f"{dict(zip(classes.tolist(), counts.tolist(), strict=True))}")
    mean, std = features.mean(0), features.std(0)
    z = whiten(features, mean, std)
    nmis = [100.0 * normalized_mutual_info_score(y, KMeans(len(classes), n_init=3, random_state=s)
                                                 .fit_predict(z)) for s in seeds]
    standardised = (features - mean) / np.maximum(std, 1e-6)
    acc = cross_val_score(LogisticRegression(C=10.0, max_iter=5000), standardised, y, cv=folds).mean()
    return {"kmeans_nmi": round(float(np.mean(nmis)), 2), "kmeans_nmi_std": round(float(np.std(nmis)), 2),
            "linear_accuracy": round(100.0 * float(acc), 2), "chance_accuracy":
            round(100.0 * float(counts.max() / counts.sum()), 2), "objects": int(len(y))}


def scene_category_separability(model: torch.nn.Module,
                                scenes: Sequence[tuple[np.ndarray, np.ndarray, Sequence[int]]],
                                crop_size: int) -> dict[str, Any]:
    """``category_separability`` of the clustering features of every object in ``scenes``, given as
    (rgb, instance map, category of instance n at n - 1), e.g. drawn demo scenes."""
    feats, objects = object_crop_features(model, [s[0] for s in scenes], [s[1] for s in scenes],
                                          crop_size)
    return category_separability(feats, [int(scenes[i][2][n - 1]) for i, n in objects])
