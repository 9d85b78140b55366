"""The stage-by-stage figure: CLS attention, mined mask, Mask R-CNN masks, final segmentation."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.images import read_rgb
from maskdistill.report import colourise, draw_panel_row, palette
from maskdistill.storage import (
    MaskIndex,
    atomic_path,
    decode_segmentation,
    iter_json_items,
    key_of_file,
    read_label_png,
)


def attention_overlay(rgb: np.ndarray, affinity: np.ndarray) -> np.ndarray:
    """The patch-grid CLS affinity, min-max scaled, nearest-upsampled over the image (inferno)."""
    from matplotlib import colormaps

    a = affinity.astype(np.float64)
    a = (a - a.min()) / (np.ptp(a) or 1.0)
    rows = (np.arange(rgb.shape[0]) * a.shape[0] / rgb.shape[0]).astype(int)
    cols = (np.arange(rgb.shape[1]) * a.shape[1] / rgb.shape[1]).astype(int)
    heat = colormaps["inferno"](a[rows][:, cols])[..., :3] * 255.0
    return (0.35 * rgb + 0.65 * heat).astype(np.uint8)


def mask_overlay(rgb: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[int]) -> np.ndarray:
    """Image dimmed, each mask painted in its label's palette colour (later masks on top)."""
    out = rgb.astype(np.float64) * 0.4
    pal = palette().astype(np.float64)
    for mask, label in zip(masks, labels, strict=True):
        out[mask] = 0.3 * rgb[mask] + 0.7 * pal[int(label) % 255]
    return out.astype(np.uint8)


def _predictions_by_key(predictions: Path, min_score: float, keys: Collection[str]
                        ) -> dict[str, list[dict[str, Any]]]:
    """The predictions of the images ``keys`` with score >= ``min_score``, by ascending score (the
    file is streamed: the other images' predictions are never held)."""
    names = {im["id"]: key_of_file(im["file_name"]) for im in iter_json_items(predictions, "images.item")}
    out: dict[str, list[dict[str, Any]]] = {}
    for ann in iter_json_items(predictions, "annotations.item"):
        if names[ann["image_id"]] in keys and ann.get("score", 1.0) >= min_score:
            out.setdefault(names[ann["image_id"]], []).append(ann)
    return {key: sorted(anns, key=lambda a: a.get("score", 1.0)) for key, anns in out.items()}


def stage_figure(keys: Sequence[str], images_root: Path, mask_shards: Sequence[Path], predictions: Path,
                 segmentation_dir: Path, out: Path, min_score: float = 0.5,
                 ground_truth_dir: Path | None = None) -> None:
    """One row per image: image | CLS attention | mined mask | Mask R-CNN masks (score >=
    ``min_score``, coloured by cluster) | final segmentation | ground truth (optional)."""
    from matplotlib.figure import Figure

    with MaskIndex(mask_shards) as index:
        mined = {k: index.get(k) for k in keys if k in index}  # only the masks drawn are read
    preds = _predictions_by_key(predictions, min_score, set(mined))
    keys = [k for k in keys if k in mined]
    if not keys:
        raise ValueError("stage figure: none of the requested images has a mined mask")
    titles = ["image", "CLS attention", "mined mask", "Mask R-CNN", "segmentation"]
    if ground_truth_dir is not None:
        titles.append("ground truth")
    fig = Figure(figsize=(2.2 * len(titles), 2.2 * len(keys)), dpi=100)
    axes = fig.subplots(len(keys), len(titles), squeeze=False)
    for r, key in enumerate(keys):
        m = mined[key]
        rgb = read_rgb(images_root / m.file_name)
        h, w = rgb.shape[:2]
        det = preds.get(key, [])
        panels = [
            rgb,
            attention_overlay(rgb, m.cls_affinity),
            mask_overlay(rgb, [m.mask], [15]),
            mask_overlay(rgb, [decode_segmentation(a["segmentation"], h, w) for a in det],
                         [a["category_id"] for a in det]),
            colourise(read_label_png(segmentation_dir / f"{key}.png")),
        ]
        if ground_truth_dir is not None:
            panels.append(colourise(read_label_png(ground_truth_dir / f"{key}.png")))
        draw_panel_row(axes[r], panels, key, titles if r == 0 else None, title_size=9)
    fig.tight_layout()
    with atomic_path(out, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
