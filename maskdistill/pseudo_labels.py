"""Stage 3: confident Mask R-CNN predictions pasted into one label map per image."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.storage import annotation_groups, decode_segmentation, iter_json_items, write_label_png
from maskdistill.training import progress


def select_confident(anns: list[dict[str, Any]], tau: float) -> list[dict[str, Any]]:
    """Predictions with score >= tau, by descending score; the single best one when none pass."""
    ranked = sorted(anns, key=lambda a: -float(a.get("score", 1.0)))
    kept = [a for a in ranked if float(a.get("score", 1.0)) >= tau]
    return kept or ranked[:1]


def paste_masks(masks: list[np.ndarray], labels: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Paste masks in the given order; a pixel already taken is not overwritten. 0 = background."""
    out = np.zeros(shape, np.uint8)
    taken = np.zeros(shape, bool)
    for mask, label in zip(masks, labels, strict=True):
        free = mask & ~taken
        out[free] = label
        taken |= mask
    return out


def label_map(image: dict[str, Any], anns: list[dict[str, Any]], tau: float) -> np.ndarray:
    """The pseudo-label map of one COCO image entry from its predictions."""
    h, w = int(image["height"]), int(image["width"])
    chosen = select_confident(anns, tau)
    masks = [decode_segmentation(a["segmentation"], h, w) for a in chosen]
    labels = [int(a["category_id"]) for a in chosen]
    if any(not 1 <= lab <= 255 for lab in labels):
        raise ValueError(f"image {image.get('file_name')}: category ids must lie in 1..255")
    return paste_masks(masks, labels, (h, w))


def write_label_maps(instances: dict[str, Any], out_dir: Path, tau: float) -> dict[str, int]:
    """One ``{key}.png`` per image of a COCO instances/predictions dict; returns counts."""
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in instances["annotations"]:
        by_image[a["image_id"]].append(a)
    return _write_groups(instances["images"], by_image.items(), out_dir, tau)


def write_label_maps_file(instances: Path, out_dir: Path, tau: float) -> dict[str, int]:
    """:func:`write_label_maps` of a COCO instances/predictions file, read as a stream: memory holds
    the image entries and one image's annotations (files that list annotations image by image, as
    the detector and the clustering write them), not the whole file."""
    return _write_groups(list(iter_json_items(instances, "images.item")), annotation_groups(instances),
                         out_dir, tau)


def _write_groups(images: list[dict[str, Any]], groups: Iterable[tuple[Any, list[dict[str, Any]]]],
                  out_dir: Path, tau: float) -> dict[str, int]:
    """Write the label map of each image entry from ``groups`` (image id, its annotations), then an
    empty map for each image without annotations; returns the counts."""
    entries: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for im in images:
        entries[im["id"]].append(im)
    kept = total = 0
    done: set[Any] = set()

    def write(im: dict[str, Any], anns: list[dict[str, Any]]) -> int:
        key = im.get("key") or im["file_name"].rsplit(".", 1)[0]
        write_label_png(out_dir / f"{key}.png", label_map(im, anns, tau))
        return len(select_confident(anns, tau))

    for image_id, anns in progress(groups, total=len(entries), desc="label maps"):
        total += len(anns)
        for im in entries.get(image_id, []):
            kept += write(im, anns)
        done.add(image_id)
    for im in (im for image_id, ims in entries.items() if image_id not in done for im in ims):
        kept += write(im, [])
    return {"images": len(images), "masks_kept": kept, "masks_total": total}
