"""Class-agnostic quality of the mined masks: best-match mask IoU and CorLoc against ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdistill.backbone import last_block_qk, patch_size
from maskdistill.images import to_tensor
from maskdistill.storage import box_iou, decode_segmentation, key_of_file, read_json, read_mask_shard


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _gt_objects(coco: dict[str, Any]) -> dict[str, list[tuple[np.ndarray, list[float]]]]:
    """Key (file name without extension) -> [(mask, box x0y0x1y1)] of its non-crowd objects."""
    images = {im["id"]: im for im in coco["images"]}
    out: dict[str, list[tuple[np.ndarray, list[float]]]] = {
        key_of_file(im["file_name"]): [] for im in coco["images"]}
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        im = images[ann["image_id"]]
        mask = decode_segmentation(ann["segmentation"], int(im["height"]), int(im["width"]))
        x, y, w, h = ann["bbox"]
        out[key_of_file(im["file_name"])].append((mask, [x, y, x + w, y + h]))
    return out


def mined_mask_quality(mask_shards: Sequence[Path], gt_instances: Path) -> dict[str, Any]:
    """Mean best-match IoU of each image's mined mask with a GT object, and CorLoc (share of
    images whose mined box has IoU >= 0.5 with some GT box). Images with objects but no mined mask
    (skipped) count as misses; images without objects are left out. Values in percent."""
    gt = _gt_objects(read_json(gt_instances))
    mined = {m.key: m for shard in mask_shards for m in read_mask_shard(shard)}
    ious, hits, rows = [], [], []
    for key in sorted(gt):
        objects = gt[key]
        if not objects:
            continue
        m = mined.get(key)
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
